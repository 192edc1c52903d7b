"""Fewer steps: the toy-768 world, guided directions, the searched start, ``--steps auto``, bundle defaults."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from zoodip_edge.runtime.zo import ZOConfig, ZOOptimizer, guided_directions, vocabulary_basis
from zoodip_edge.toy.world import TOY64, TOY768, caption, concept_photos, training_set

# ------------------------------------------------------------- the toy-768 world --------

def test_unnamed_attributes_are_drawn_but_never_named():
    images, scenes = training_set(600, seed=2, world=TOY768)
    assert {"pink"} <= {s.color for s in scenes} and {"diamond"} <= {s.shape for s in scenes}
    rng = np.random.default_rng(0)
    for s in scenes:
        words = caption(s, rng, TOY768).split()
        assert "pink" not in words and "diamond" not in words
        if s.shape == "diamond":
            assert "shape" in words  # the generic word stands for it
    _, plain = training_set(600, seed=2)
    assert {s.color for s in plain} <= set(TOY64.colors) and {s.shape for s in plain} <= set(TOY64.shapes)
    assert TOY768.words("pink", "diamond") == "shape" and TOY768.words("red", "diamond") == "red shape"
    assert TOY768.words("pink", "ring") == "ring" and TOY64.words("purple", "ring") == "purple ring"


def test_concept_score_reads_the_unnamed_color_and_shape():
    from zoodip_edge.toy.score import read_image

    images, scenes = training_set(1200, seed=11, world=TOY768)  # the unnamed attributes are rare (GENERIC_RATE)
    readings = [read_image(im, world=TOY768) for im in images]
    for attr in ("pink", "diamond"):
        hits = [(r.color if attr == "pink" else r.shape) == attr for r, s in zip(readings, scenes)
                if attr in (s.color, s.shape)]
        assert len(hits) > 20 and np.mean(hits) >= 0.95


def test_toy64_photos_are_the_same_in_both_worlds(tmp_path):
    a = concept_photos(tmp_path / "a", "purple", "ring", count=2, seed=3)
    b = concept_photos(tmp_path / "b", "purple", "ring", count=2, seed=3)
    assert [p.read_bytes() for p in a] == [p.read_bytes() for p in b]


# ------------------------------------------------------------- guided directions --------

def test_guided_directions_keep_the_trace_and_favour_the_subspace():
    rng, d, k = np.random.default_rng(0), 64, 4
    basis = np.linalg.qr(rng.standard_normal((d, k)))[0].T
    e = guided_directions(rng.standard_normal((20000, d)), basis, 0.5, np.random.default_rng(1))
    assert abs(np.mean(np.sum(e * e, axis=1)) / d - 1) < 0.02  # RGE's scale assumes trace d
    along = np.mean((e @ basis.T) ** 2)  # per basis direction
    assert along == pytest.approx(0.5 + 0.5 * d / k, rel=0.05)


def _noisy_quadratic(seed: int):
    target = np.random.default_rng(seed).standard_normal(128)

    def loss(thetas, plan):
        noise = np.random.default_rng(plan.noise_seed).standard_normal(128) * 0.3  # common to the n + 1 rows
        return np.sum((thetas - target + noise) ** 2, axis=1)

    return target, loss


@pytest.mark.parametrize("cfg, kept", [(ZOConfig(mu=1e-2, lr=5e-2, guide_k=8), 0.5),
                                       (ZOConfig(mu=1e-2, lr=5e-2, guide_momentum=True), 0.8)])
def test_guided_levers_learn_and_resume_bit_identically(cfg, kept):
    target, loss = _noisy_quadratic(0)
    full = ZOOptimizer(np.zeros(128), cfg, seed=3)
    for _ in range(400):
        full.step(loss)
    start = np.sum(target ** 2)
    assert np.sum((full.theta - target) ** 2) < kept * start  # a no-op optimizer stays at start

    half = ZOOptimizer(np.zeros(128), cfg, seed=3)
    for _ in range(150):
        half.step(loss)
    half.propose()  # a checkpoint taken with a step proposed but not evaluated
    resumed = ZOOptimizer(np.zeros(128), cfg, seed=3)
    resumed.load_state_dict(half.state_dict())
    for _ in range(250):
        resumed.step(loss)
    assert np.array_equal(resumed.theta, full.theta)


def test_guided_levers_do_not_change_the_stream_of_draws():
    plain = ZOOptimizer(np.zeros(32), ZOConfig(), seed=5)
    guided = ZOOptimizer(np.zeros(32), ZOConfig(guide_k=4, guide_momentum=True), seed=5)
    _, loss = _noisy_quadratic(1)
    for _ in range(10):
        a, b = plain.propose(), guided.propose()
        assert (a.t, a.noise_seed) == (b.t, b.noise_seed)
        plain.update(a, loss(np.pad(a.thetas, ((0, 0), (0, 96))), a))
        guided.update(b, loss(np.pad(b.thetas, ((0, 0), (0, 96))), b))


def test_vocabulary_basis_is_the_tables_principal_directions():
    rng, d = np.random.default_rng(0), 48
    axes = np.linalg.qr(rng.standard_normal((d, 3)))[0].T  # the table varies most along these
    table = rng.standard_normal((500, 3)) * [10.0, 6.0, 4.0] @ axes + 0.1 * rng.standard_normal((500, d)) + 5.0
    basis = vocabulary_basis(table.astype(np.float16), 3)
    np.testing.assert_allclose(basis @ basis.T, np.eye(3), atol=1e-9)
    np.testing.assert_allclose(np.abs(np.sum(basis * axes, axis=1)), 1.0, atol=1e-3)  # in order of variance


def test_vocabulary_basis_reads_a_large_table_in_chunks():
    table = (np.random.default_rng(1).standard_normal((1000, 24)) * np.linspace(1, 4, 24)).astype(np.float16)
    whole, chunked = vocabulary_basis(table, 5, chunk=len(table)), vocabulary_basis(table, 5, chunk=64)
    np.testing.assert_allclose(np.abs(np.sum(whole * chunked, axis=1)), 1.0, atol=1e-9)  # the same directions


def _subspace_quadratic(d: int, k: int):
    """A noisy quadratic whose optimum lies in a k-dim subspace (known to the prior), as the toy's
    gradients lie mostly along the vocabulary's principal directions."""
    rng = np.random.default_rng(7)
    basis = np.linalg.qr(rng.standard_normal((d, k)))[0].T
    target = rng.standard_normal(k) @ basis * 3

    def loss(thetas, plan):
        noise = np.random.default_rng(plan.noise_seed).standard_normal(d) * 0.3
        return np.sum((thetas - target + noise) ** 2, axis=1)

    return basis, target, loss


def test_vocabulary_guided_directions_find_an_optimum_in_the_subspace_faster():
    d, k = 256, 8
    basis, target, loss = _subspace_quadratic(d, k)
    cfg = ZOConfig(mu=1e-2, lr=3e-2, tau=64)
    errors = {}
    for name, c, prior in [("plain", cfg, None), ("guided", replace(cfg, guide_vocab=k, guide_alpha=0.1), basis)]:
        opt = ZOOptimizer(np.zeros(d), c, seed=3, prior=prior)
        for _ in range(300):
            opt.step(loss)
        errors[name] = np.sum((opt.theta - target) ** 2) / np.sum(target ** 2)
    assert errors["guided"] < 0.5 * errors["plain"], errors  # a no-op optimizer stays at 1.0
    assert errors["guided"] < 0.3, errors


def test_vocabulary_guided_directions_resume_bit_identically():
    d, k = 64, 4
    basis, _, loss = _subspace_quadratic(d, k)
    cfg = ZOConfig(mu=1e-2, lr=3e-2, guide_vocab=k, guide_k=2)
    full = ZOOptimizer(np.zeros(d), cfg, seed=1, prior=basis)
    for _ in range(40):
        full.step(loss)
    half = ZOOptimizer(np.zeros(d), cfg, seed=1, prior=basis)
    for _ in range(15):
        half.step(loss)
    half.propose()
    resumed = ZOOptimizer(np.zeros(d), cfg, seed=1, prior=basis)
    resumed.load_state_dict(half.state_dict())
    for _ in range(25):
        resumed.step(loss)
    assert np.array_equal(resumed.theta, full.theta)
    with pytest.raises(ValueError, match="guide_vocab = 4 needs prior directions"):
        ZOOptimizer(np.zeros(d), cfg, seed=1)  # the prior is not optional


# ------------------------------------------------------------- --steps auto -------------

@pytest.mark.parametrize("tau", [15, 40, 400])
def test_plateau_stops_near_where_the_curve_flattens_at_any_time_scale(tau):
    from zoodip_edge.runtime.stopping import Plateau

    reader, steps = Plateau(every=150), []
    for s in range(6000):
        if reader.due(s):
            reader.readings.append((s, 1.0))
            steps.append(s)
    curve = lambda s: 0.2 + 0.8 * np.exp(-s / tau)  # noqa: E731  95% of the gain at 3 tau
    rule = Plateau(every=150)
    stopped = next(s for s in range(6000) if rule.due(s) and rule.update(s, curve(s)))
    assert len(steps) <= 100  # dozens of readings over the whole budget, not thousands
    assert 3 * tau / 1.3 <= stopped <= 1.3 * 3 * tau  # not while it still falls; soon after it flattens


def test_plateau_keeps_a_good_start_that_only_gets_worse():
    from zoodip_edge.runtime.stopping import Plateau

    worse = Plateau(every=10, min_steps=30)
    stops = [worse.update(i * 10, 1.0 + 0.01 * i, np.full(2, i)) for i in range(20)]
    assert stops.index(True) == 3 and worse.best_step == 0 and np.array_equal(worse.best_theta, np.zeros(2))


# ------------------------------------------------------------- the searched start --------

def test_searched_start_explains_the_photos_better_than_the_generic_word(tmp_path):
    from zoodip_edge.demo import PROBES
    from zoodip_edge.runtime.init_search import search_initializer
    from zoodip_edge.runtime.personalize import Personalizer, Settings
    from zoodip_edge.toy import shipped_path

    photos = concept_photos(tmp_path, "green", "triangle", count=5)
    p = Personalizer(shipped_path("bundle"), photos, "<gt>", "shape", settings=Settings(batch_perturbations=True), profile="cpu")
    probes = [(int(t), 9000 + i) for i, t in enumerate(np.linspace(500, 899, 16))]
    found = search_initializer(p, probes)
    assert {"green", "triangle"} & set(found.label.split(" + "))
    assert found.forwards > 0
    before, after = p.held_out_loss(p.theta0, PROBES), p.held_out_loss(found.theta, PROBES)  # other probes
    assert after < before - 0.25 * (before - p.held_out_loss(None, PROBES, words="green triangle"))

    from zoodip_edge.runtime.init_search import word_candidates

    every = word_candidates(p)
    assert len(every) == 40 and ("triangle", p.text.single_token_id("triangle")) in every
    near = word_candidates(p, limit=5)  # a large vocabulary: the words nearest the initializer
    assert len(near) == 5 and "shape" in {w for w, _ in near}


# ------------------------------------------------------------- bundle defaults ----------

def test_export_defaults_are_checked_before_any_work():
    from zoodip_edge.errors import UserError
    from zoodip_edge.families import defaults_for, parse_defaults

    d = defaults_for("sd1", parse_defaults("lr=2e-2, mu=1e-2,tau=11,steps=1000"))
    assert (d.lr, d.mu, d.tau, d.steps) == (2e-2, 1e-2, 11, 1000) and d.n == 2
    for bad in ("lr", "lr=abc", "speed=3", "mu=nan", "tau=-4"):
        with pytest.raises(UserError):
            defaults_for("sd1", parse_defaults(bad))


def test_cli_export_refuses_bad_defaults_in_one_line(tmp_path):
    from typer.testing import CliRunner

    from zoodip_edge.cli import app

    r = CliRunner().invoke(app, ["export", str(tmp_path / "nomodel"), "--out", str(tmp_path / "b"), "--defaults", "lr=fast"])
    assert r.exit_code == 2 and "lr" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "b").exists()


def test_toy_bundles_carry_the_defaults_that_suit_them():
    from zoodip_edge.bundle import load_bundle
    from zoodip_edge.toy import TOY_MODELS, shipped_path

    for toy in TOY_MODELS.values():
        if not shipped_path(toy.bundle).is_dir():
            pytest.fail(f"{toy.name}'s bundle is not shipped")
        m = load_bundle(shipped_path(toy.bundle), verify=False).manifest
        d = m["defaults"]
        assert d["steps"] < 30_000 and d["search_init"] is True  # a toy's budget, not SD1's 30,000
        assert m["verification"]["zo_fidelity"]["mu"] <= d["mu"]  # trained at a mu its gate verified
    # the vocabulary-guided directions helped at d = 768, not at d = 64 (docs/steps.md)
    guided = {t.name: {k: v for k, v in load_bundle(shipped_path(t.bundle), verify=False).manifest["defaults"].items()
                       if k.startswith("guide_")} for t in TOY_MODELS.values()}
    assert guided == {"toy-64": {}, "toy-768": {"guide_vocab": 16, "guide_alpha": 0.1}}


# ------------------------------------------------------------- the CLI ------------------

@pytest.fixture(scope="module")
def toy_photos(tmp_path_factory):
    folder = tmp_path_factory.mktemp("green-triangle")
    concept_photos(folder, "green", "triangle", count=5)
    return folder


def _personalize(args, tmp_path):
    from typer.testing import CliRunner

    from zoodip_edge.cli import app
    from zoodip_edge.toy import shipped_path

    return CliRunner().invoke(app, ["personalize", str(shipped_path("bundle")), *args, "--token", "<gt>",
                                    "--init", "shape", "--out", str(tmp_path / "gt.safetensors"), "-q"])


def test_steps_auto_stops_on_a_plateau_within_the_budget(toy_photos, tmp_path):
    r = _personalize([str(toy_photos), "--steps", "auto"], tmp_path)
    assert r.exit_code == 0, r.output
    steps = int(r.output.split("learned <gt> in ")[1].split()[0])
    assert 0 < steps <= 1000  # the toy bundle's budget
    if steps < 1000:
        assert "--steps auto" in r.output


def test_search_init_starts_from_what_the_photos_show(toy_photos, tmp_path):
    from zoodip_edge.embeddings import load_embedding

    r = _personalize([str(toy_photos), "--steps", "5", "--search-init"], tmp_path)
    assert r.exit_code == 0, r.output
    start = r.output.split("start: ")[1].split(" (")[0]
    assert {"green", "triangle"} & set(start.split(" + "))
    _, _, meta = load_embedding(tmp_path / "gt.safetensors")
    assert meta.get("start") == start


def test_malformed_steps_are_refused_in_one_line(toy_photos, tmp_path):
    r = _personalize([str(toy_photos), "--steps", "many"], tmp_path)
    assert r.exit_code == 2 and "--steps" in r.output and "Traceback" not in r.output
    assert not (tmp_path / "gt.safetensors").exists()


def test_personalizer_guides_along_its_bundles_vocabulary(toy_photos):
    from zoodip_edge.errors import UserError
    from zoodip_edge.runtime.personalize import Personalizer, Settings
    from zoodip_edge.toy import shipped_path

    bundle = shipped_path("bundle")
    p = Personalizer(bundle, toy_photos, "<gt>", "shape", settings=Settings(guide_vocab=8, search_init=False))
    table = np.asarray(p.text.table, dtype=np.float64)
    np.testing.assert_array_equal(p.prior, vocabulary_basis(table, 8))  # the bundle's rows, not the new token's
    spread = np.var((table - table.mean(0)) @ p.prior.T, axis=0)
    assert spread[0] > 2 * np.var(table - table.mean(0), axis=0).mean()  # along the table's spread, not anywhere
    first = p.step()
    assert np.any(first.theta != p.theta0)
    with pytest.raises(UserError, match="guide_vocab must be 0..256"):
        Personalizer(bundle, toy_photos, "<gt>", "shape", settings=Settings(guide_vocab=300))


@pytest.mark.parametrize("tamper", ["nan", "rows"])
def test_a_checkpoints_guiding_directions_are_checked_before_a_resume(toy_photos, tmp_path, tamper):
    from zoodip_edge.errors import UserError
    from zoodip_edge.runtime.checkpoint import load_checkpoint, save_checkpoint
    from zoodip_edge.runtime.personalize import Personalizer, Settings
    from zoodip_edge.toy import shipped_path

    p = Personalizer(shipped_path("bundle"), toy_photos, "<gt>", "shape", settings=Settings(guide_vocab=8, search_init=False))
    p.step()
    path = tmp_path / "run.ckpt"
    p.save_checkpoint(path)
    state = load_checkpoint(path)
    prior = state["optimizer"]["prior"]
    prior = np.where(np.arange(prior.size).reshape(prior.shape) == 5, np.nan, prior) if tamper == "nan" else prior[:-1]
    save_checkpoint(path, {**state, "optimizer": {**state["optimizer"], "prior": prior}})
    fresh = Personalizer(shipped_path("bundle"), toy_photos, "<gt>", "shape", settings=Settings(guide_vocab=8, search_init=False))
    with pytest.raises(UserError, match=r"malformed: optimizer.prior: expected \(8, 64\) finite values"):
        fresh.load_checkpoint(path)
    assert fresh.step_index == 0


def test_a_checkpoint_from_before_an_option_existed_is_this_runs(toy_photos):
    """Options added to ZOConfig since a checkpoint was written were off then: it still resumes."""
    from zoodip_edge.runtime.personalize import Personalizer, Settings
    from zoodip_edge.toy import shipped_path

    p = Personalizer(shipped_path("bundle"), toy_photos, "<gt>", "shape", settings=Settings(search_init=False))
    older = p._identity()
    del older["config"]["guide_vocab"]
    assert p.identity_differences(older) == []
    older["config"]["guide_vocab"] = 16
    assert p.identity_differences(older) == ["config"]


def test_cli_guide_vocab_runs_and_bad_values_are_refused(toy_photos, tmp_path):
    r = _personalize([str(toy_photos), "--steps", "3", "--no-search-init", "--guide-vocab", "8"], tmp_path)
    assert r.exit_code == 0, r.output
    r = _personalize([str(toy_photos), "--steps", "3", "--guide-vocab", "999", "--force"], tmp_path)
    assert r.exit_code != 0 and "guide_vocab must be 0..256" in r.output and "Traceback" not in r.output


def test_sdxl_prior_guides_each_table_in_its_own_part_of_theta():
    from zoodip_edge.runtime.personalize import vocabulary_prior
    from zoodip_edge.runtime.text import PromptEncoder, XLPromptEncoder

    rng = np.random.default_rng(0)
    text = XLPromptEncoder.__new__(XLPromptEncoder)  # only its two tables are read
    text.first, text.second = PromptEncoder.__new__(PromptEncoder), PromptEncoder.__new__(PromptEncoder)
    text.first.table = rng.standard_normal((50, 8)) * np.linspace(1, 3, 8)
    text.second.table = rng.standard_normal((50, 12)) * np.linspace(1, 3, 12)
    prior = vocabulary_prior(text, 3)
    assert prior.shape == (6, 20)
    np.testing.assert_allclose(prior @ prior.T, np.eye(6), atol=1e-9)
    np.testing.assert_array_equal(prior[:3, :8], vocabulary_basis(text.first.table, 3))
    np.testing.assert_array_equal(prior[3:, 8:], vocabulary_basis(text.second.table, 3))
    assert not prior[:3, 8:].any() and not prior[3:, :8].any()


# ------------------------------------------------------------- the encoder's directions --

def _low_rank_response(d: int, k: int, seed: int = 0):
    """A "text encoder" whose output responds to theta only along k directions (orthonormal rows)."""
    rng = np.random.default_rng(seed)
    rows = np.linalg.qr(rng.standard_normal((d, k)))[0].T
    mixing = rng.standard_normal((40, k)) * np.linspace(3, 1, k)
    return rows, lambda prompt, thetas: np.tanh(0.1 * thetas @ rows.T) @ mixing.T * (1 + len(prompt) % 2)


def test_response_basis_finds_the_directions_the_output_responds_to():
    from zoodip_edge.runtime.sensitivity import response_basis

    d, k = 96, 5
    rows, respond = _low_rank_response(d, k)
    theta = np.random.default_rng(1).standard_normal(d)
    basis = response_basis(respond, ["a <t>", "a photo of <t>"], theta, k, h=1e-3)
    assert basis.shape == (k, d) and np.allclose(basis @ basis.T, np.eye(k), atol=1e-8)
    # the same subspace: projecting the true directions onto the found ones keeps them whole
    assert np.allclose(np.linalg.norm(rows @ basis.T, axis=1), 1.0, atol=1e-4)
    random = np.linalg.qr(np.random.default_rng(2).standard_normal((d, k)))[0].T
    assert np.linalg.norm(rows @ random.T) < 0.6 * np.sqrt(k)  # a random basis does not


def test_encoder_guided_estimates_point_along_the_gradient_when_the_loss_sees_theta_through_an_encoder():
    """The loss depends on theta only through a low-rank encoder: directions guided along the
    encoder's response give estimates far closer to the exact gradient than plain or randomly
    guided ones (their cosine with it is the estimator's signal)."""
    from zoodip_edge.runtime.sensitivity import response_basis
    from zoodip_edge.runtime.zo import guided_directions, rge_estimate

    d, k, n, mu = 256, 6, 2, 1e-4
    rows, respond = _low_rank_response(d, k)
    goal = respond("", np.random.default_rng(5).standard_normal((1, d)))[0]
    loss = lambda thetas: np.sum((respond("", thetas) - goal) ** 2, axis=1)  # noqa: E731
    theta = np.random.default_rng(6).standard_normal(d)
    exact = np.array([(loss((theta + 1e-6 * e)[None]) - loss((theta - 1e-6 * e)[None]))[0] / 2e-6 for e in np.eye(d)])
    rng = np.random.default_rng(7)
    bases = {"plain": np.zeros((0, d)), "encoder": response_basis(respond, [""], theta, k, h=1e-3),
             "random": np.linalg.qr(rng.standard_normal((d, k)))[0].T}
    cosines = {}
    for name, basis in bases.items():
        cos = []
        for _ in range(200):
            e = guided_directions(rng.standard_normal((n, d)), basis, 0.1, rng)
            losses = loss(np.concatenate([theta[None], theta + mu * e]))
            g = rge_estimate(losses, e, mu, 0)
            cos.append(g @ exact / np.linalg.norm(g) / np.linalg.norm(exact))
        cosines[name] = float(np.mean(cos))
    assert cosines["encoder"] > 0.35 and cosines["encoder"] > 4 * max(cosines["plain"], cosines["random"]), cosines


def test_encoder_guide_is_read_at_the_token_refreshed_and_resumes_bit_identically(toy_photos, tmp_path):
    from zoodip_edge.runtime.personalize import Personalizer, Settings
    from zoodip_edge.toy import shipped_path

    settings = Settings(guide_encoder=4, guide_refresh=3, search_init=False)

    def make():
        return Personalizer(shipped_path("bundle"), toy_photos, "<gt>", "shape", settings=settings)

    full = make()
    priors = []
    for _ in range(5):
        full.step()
        priors.append(full.optimizer.prior.copy())
    assert full.guide_read_at == 3  # read at steps 0 and 3
    assert np.array_equal(priors[0], priors[2]) and not np.allclose(priors[2], priors[3])
    # the read directions are where the text encoder's output moves: far more than along random ones
    prompt = "a photo of a <gt>"
    base = full.conditions_of(prompt, full.theta[None])
    moved = lambda v: np.linalg.norm(full.conditions_of(prompt, (full.theta + 1e-2 * v)[None]) - base)  # noqa: E731
    random = np.random.default_rng(0).standard_normal((4, full.theta.size))
    random /= np.linalg.norm(random, axis=1, keepdims=True)
    assert moved(full.optimizer.prior[0]) > 2 * max(moved(r) for r in random)

    half = make()
    for _ in range(2):
        half.step()
    half.save_checkpoint(tmp_path / "half.ckpt")
    resumed = make()
    resumed.load_checkpoint(tmp_path / "half.ckpt")
    assert resumed.guide_read_at == 0 and np.array_equal(resumed.optimizer.prior, priors[1])
    for _ in range(3):
        resumed.step()
    assert np.array_equal(resumed.theta, full.theta)


def test_cli_guide_encoder_runs_and_bad_values_are_refused(toy_photos, tmp_path):
    r = _personalize([str(toy_photos), "--steps", "3", "--no-search-init", "--guide-encoder", "4"], tmp_path)
    assert r.exit_code == 0, r.output
    r = _personalize([str(toy_photos), "--steps", "3", "--guide-encoder", "999", "--force"], tmp_path)
    assert r.exit_code != 0 and "guide_encoder must be 0..256" in r.output and "Traceback" not in r.output
