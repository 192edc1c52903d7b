"""The device stage end to end on a tiny exported bundle (CPU EP)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import load_file
from typer.testing import CliRunner

from zoodip_edge.cli import app
from zoodip_edge.errors import UserError
from zoodip_edge.runtime.personalize import Personalizer, Settings
from zoodip_edge.runtime.zo import ZOConfig, replay

from conftest import run_cli_without_torch

runner = CliRunner()
TOKEN = "<red-ball>"


def make(bundle, photos, **kw) -> Personalizer:
    kw.setdefault("search_init", False)  # the optimizer from the initializer (the searched start: test_steps.py)
    return Personalizer(bundle, photos, TOKEN, "dog", settings=Settings(**kw), profile="cpu")


PROBES = [(int(t), 1000 + i) for i, t in enumerate(np.linspace(500, 899, 12))]


# Learning itself is tested on the trained toy model (tests/test_toy.py): on this random-weight
# bundle the held-out gain is a fraction of a percent and rests on the weights' draw.


def test_noop_update_cannot_pass_the_learning_check(sd1_bundle, photos):
    p = make(sd1_bundle, photos)
    p.optimizer.adam.lr = 0.0  # the optimizer still runs; the update does nothing
    base = p.held_out_loss(p.theta0, PROBES)
    for _ in p.run(50):
        pass
    assert p.held_out_loss(p.theta, PROBES) == base


def test_same_seed_same_theta_and_different_seed_differs(sd1_bundle, photos):
    runs = []
    for seed in (3, 3, 4):
        p = make(sd1_bundle, photos, seed=seed)
        for _ in p.run(15):
            pass
        runs.append(p.theta.copy())
    assert np.array_equal(runs[0], runs[1])
    assert not np.allclose(runs[0], runs[2])


def test_batched_and_sequential_perturbations_agree(sd1_bundle, photos):
    a, b = make(sd1_bundle, photos, batch_perturbations=True), make(sd1_bundle, photos, batch_perturbations=False)
    plan = a.optimizer.propose()
    la, lb = a.losses(plan.thetas, plan.t, plan.noise_seed), b.losses(plan.thetas, plan.t, plan.noise_seed)
    np.testing.assert_allclose(la, lb, rtol=1e-5)


def test_int8_cpu_personalizer_feeds_one_sample(sd1_bundle, photos, monkeypatch):
    """The default recipe's U-Net takes one sample for a batch of conditions (export/prefix.py):
    a batched step sends it one row."""
    p = make(sd1_bundle, photos, batch_perturbations=True)
    assert p.bundle.shared_prefix and p.bundle.manifest["recipe"]["graphs"]["unet"]["shared_prefix_nodes"] > 10
    seen = []
    real = p._run

    def spy(sess, feed, output, keep_on_device):
        if "sample" in feed:
            seen.append((feed["sample"].shape[0], feed["encoder_hidden_states"].shape[0]))
        return real(sess, feed, output, keep_on_device)

    monkeypatch.setattr(p, "_run", spy)
    plan = p.optimizer.propose()
    p.losses(plan.thetas, plan.t, plan.noise_seed)
    assert seen == [(1, p.config.n + 1)]


@pytest.mark.slow  # a full export or a trained run
def test_sd2_v_prediction_bundle_personalizes(sd2_pipeline, work, photos):
    from conftest import export_once

    bundle, _ = export_once(sd2_pipeline, "int8-cpu", work)
    p = Personalizer(bundle, photos, TOKEN, "dog", settings=Settings(), profile="cpu")
    assert p.config.mu == 1e-2
    for rec in p.run(5):
        assert np.isfinite(rec.losses).all()
    assert not np.array_equal(p.theta, p.theta0)


def _cli(bundle, photos, out, *extra):
    return ["personalize", str(bundle), str(photos), "--token", TOKEN, "--init", "dog", "--out", str(out),
            "--device", "cpu", "--quiet", *extra]


def test_cli_output_is_a_diffusers_embedding_with_provenance(sd1_bundle, photos, tmp_path, sd1_pipeline):
    out = tmp_path / "learned_embeds.safetensors"
    r = runner.invoke(app, _cli(sd1_bundle, photos, out, "--steps", "6"))
    assert r.exit_code == 0, r.output
    tensors = load_file(str(out))
    assert list(tensors) == [TOKEN] and tensors[TOKEN].shape == (1, 32) and tensors[TOKEN].dtype == np.float32
    from safetensors import safe_open

    with safe_open(str(out), "np") as f:
        meta = f.metadata()
    manifest_sha = __import__("hashlib").sha256((sd1_bundle / "manifest.json").read_bytes()).hexdigest()
    assert meta["bundle_manifest_sha256"] == manifest_sha and meta["steps"] == "6"
    assert json.loads(meta["hyperparameters"])["mu"] == 1e-3

    # diffusers loads it unchanged, and the token's row is ours
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(str(sd1_pipeline), safety_checker=None)
    pipe.load_textual_inversion(str(out))
    tid = pipe.tokenizer.convert_tokens_to_ids(TOKEN)
    row = pipe.text_encoder.get_input_embeddings().weight[tid].detach().numpy()
    np.testing.assert_array_equal(row, tensors[TOKEN][0])


def test_replay_from_jsonl_log_reproduces_theta(sd1_bundle, photos, tmp_path):
    out, log = tmp_path / "e.safetensors", tmp_path / "run.jsonl"
    assert runner.invoke(app, _cli(sd1_bundle, photos, out, "--steps", "12", "--log-jsonl", str(log))).exit_code == 0
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    head, steps = lines[0], lines[1:]
    assert head["type"] == "start" and [s["step"] for s in steps] == list(range(12))
    theta = replay(np.array(head["theta0"]), ZOConfig(**head["config"]), steps)
    np.testing.assert_array_equal(theta.astype(np.float32), load_file(str(out))[TOKEN][0])


def _subprocess_cli(args, env=None):
    # SIGINT back to Python's handler: a test run started as a background job inherits SIGINT
    # ignored, and the interrupt test would wait on a run that never sees its Ctrl-C
    code = ("import signal, sys; signal.signal(signal.SIGINT, signal.default_int_handler); "
            "from zoodip_edge.cli import main; sys.argv = ['zoodip-edge'] + sys.argv[1:]; main()")
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)


def _wait_for(path: Path, proc, timeout=120):
    t0 = time.time()
    while not path.exists():
        assert proc.poll() is None, proc.communicate()
        assert time.time() - t0 < timeout
        time.sleep(0.02)


@pytest.mark.slow
def test_sigkill_then_resume_equals_uninterrupted_run(sd1_bundle, photos, tmp_path):
    steps = "400"
    ref = tmp_path / "ref.safetensors"
    assert runner.invoke(app, _cli(sd1_bundle, photos, ref, "--steps", steps)).exit_code == 0
    out = tmp_path / "killed.safetensors"
    ckpt = Path(str(out) + ".ckpt")
    proc = _subprocess_cli(_cli(sd1_bundle, photos, out, "--steps", steps, "--checkpoint-every", "7"))
    _wait_for(ckpt, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the run was killed before the end"
    r = runner.invoke(app, _cli(sd1_bundle, photos, out, "--steps", steps, "--resume"))
    assert r.exit_code == 0, r.output
    np.testing.assert_array_equal(load_file(str(out))[TOKEN], load_file(str(ref))[TOKEN])


@pytest.mark.slow
def test_ctrl_c_saves_a_checkpoint_and_exits_cleanly(sd1_bundle, photos, tmp_path):
    out = tmp_path / "e.safetensors"
    ckpt = Path(str(out) + ".ckpt")
    # faulthandler: should the run outlive the interrupt, SIGABRT makes it print every thread's stack
    env = {**os.environ, "PYTHONFAULTHANDLER": "1"}
    proc = _subprocess_cli(_cli(sd1_bundle, photos, out, "--steps", "100000", "--checkpoint-every", "5"), env=env)
    _wait_for(ckpt, proc)
    proc.send_signal(signal.SIGINT)
    try:
        _, err = proc.communicate(timeout=60)
    except subprocess.TimeoutExpired:
        proc.send_signal(signal.SIGABRT)
        _, err = proc.communicate()
        pytest.fail(f"still running 60 s after SIGINT; its threads:\n{err[-6000:]}")
    assert proc.returncode == 130, err
    assert "checkpoint saved" in err and "Traceback" not in err
    assert not out.exists()
    from zoodip_edge.runtime.checkpoint import load_checkpoint

    assert load_checkpoint(ckpt)["optimizer"]["step"] > 0




@pytest.mark.slow
def test_runtime_never_imports_torch_diffusers_transformers(sd1_bundle, photos, tmp_path):
    out = tmp_path / "e.safetensors"
    r = run_cli_without_torch(_cli(sd1_bundle, photos, out, "--steps", "3"))
    assert r.returncode == 0, r.stderr
    assert out.exists()


@pytest.mark.skipif(sys.platform != "linux", reason="glibc tunables: Linux only")
def test_hugetlb_profile_restarts_the_cli_once(sd1_bundle, photos, tmp_path):
    """The cpu profile's malloc_hugetlb makes the CLI re-execute itself once with GLIBC_TUNABLES set
    (glibc reads it only at start); every interpreter start is logged by a sitecustomize."""
    from zoodip_edge.runtime.sessions import glibc_has_hugetlb

    if not glibc_has_hugetlb():
        pytest.skip("glibc >= 2.35 only")
    site = tmp_path / "site"
    site.mkdir()
    starts = tmp_path / "starts.txt"
    (site / "sitecustomize.py").write_text(
        f"import os\nwith open({str(starts)!r}, 'a') as f:\n    f.write(os.environ.get('GLIBC_TUNABLES', '-') + '\\n')\n")
    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"}
    env["PYTHONPATH"] = os.pathsep.join([str(site), env.get("PYTHONPATH", "")]).rstrip(os.pathsep)
    out = tmp_path / "e.safetensors"
    argv = _cli(sd1_bundle, photos, out, "--steps", "2", "--no-search-init")  # --device cpu; the restart is what counts
    r = subprocess.run([sys.executable, "-m", "zoodip_edge.cli", *argv], env=env, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert out.exists()
    assert starts.read_text().splitlines() == ["-", "glibc.malloc.hugetlb=1"]


# --------------------------------------------------------------------- bad input ------

def _bad(args, match):
    r = runner.invoke(app, args)
    assert r.exit_code == 2, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ") and match in lines[0], r.output


def test_bad_images_are_named(sd1_bundle, photos, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    _bad(_cli(sd1_bundle, empty, tmp_path / "o.safetensors"), "no image")
    _bad(_cli(sd1_bundle, tmp_path / "nowhere", tmp_path / "o.safetensors"), "nowhere")
    bad = tmp_path / "bad"
    bad.mkdir()
    (bad / "zero.png").write_bytes(b"")
    (bad / "notes.jpg").write_text("not an image")
    good = (photos / "ball0.png").read_bytes()
    (bad / "cut.png").write_bytes(good[: len(good) // 2])
    r = runner.invoke(app, _cli(sd1_bundle, bad, tmp_path / "o.safetensors"))
    assert r.exit_code == 2 and all(n in r.output for n in ("zero.png", "notes.jpg", "cut.png")), r.output
    assert not (tmp_path / "o.safetensors").exists()


def test_bad_tokens(sd1_bundle, photos, tmp_path):
    out = tmp_path / "o.safetensors"
    base = ["personalize", str(sd1_bundle), str(photos), "--out", str(out), "--device", "cpu", "-q", "--steps", "2"]
    _bad(base + ["--token", "dog", "--init", "dog"], "already in the vocabulary")
    _bad(base + ["--token", "<t>", "--init", "qzxv"], "exactly one token")
    _bad(base + ["--token", "two words", "--init", "dog"], "no spaces")
    assert not out.exists()


def test_onnxruntime_failures_are_one_line(sd1_bundle, photos, tmp_path, monkeypatch):
    """A failure inside ONNX Runtime mid-run (on a GPU: out of memory) is one line and exit 1, no output file."""
    import onnxruntime as ort

    from zoodip_edge.bundle import load_bundle

    te = load_bundle(sd1_bundle, verify=False).path("text_encoder")

    def wrong_shape(self):  # ORT's own exception class, raised from its bindings
        ort.InferenceSession(str(te)).run(None, {"inputs_embeds": np.zeros((1, 2, 3), np.float32)})

    # ORT's Python layer raises plain RuntimeErrors; this is the message CUDA EP gave on an H200.
    oom = compile("raise RuntimeError('Error in execution: Non-zero status code returned while running Conv node. "
                  "Status Message: bfc_arena.cc:360 Available memory of 2655300864 is smaller than requested bytes "
                  "of 6938787840')", str(Path("site-packages") / "onnxruntime" / "capi" / "session.py"), "exec")
    out = tmp_path / "o.safetensors"
    argv = ["personalize", str(sd1_bundle), str(photos), "--token", TOKEN, "--init", "dog", "--out", str(out),
            "--device", "cpu", "-q", "--steps", "2", "--no-search-init"]  # the failures are in the steps
    for step, expect in ((wrong_shape, "onnxruntime failed: "), (lambda self: exec(oom), "ran out of memory")):
        monkeypatch.setattr(Personalizer, "step", step)
        r = runner.invoke(app, argv)
        lines = r.output.strip().splitlines()
        assert r.exit_code == 1 and len(lines) == 1 and lines[0].startswith("error: onnxruntime failed: "), r.output
        assert expect in lines[0] and not out.exists()
    monkeypatch.setattr(Personalizer, "step", lambda self: exec("raise RuntimeError('a bug of ours')"))
    assert isinstance(runner.invoke(app, argv).exception, RuntimeError)  # not ORT's: not hidden


def test_bad_bundles(bundle_copy, photos, tmp_path):
    out = tmp_path / "o.safetensors"
    tok = bundle_copy / "tokenizer.json"
    data = bytearray(tok.read_bytes())
    data[len(data) // 2] ^= 0x01  # same size, different content
    tok.write_bytes(bytes(data))
    _bad(_cli(bundle_copy, photos, out), "sha256")
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["format_version"] = 7
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    _bad(_cli(bundle_copy, photos, out), "format_version")
    assert not out.exists()


def test_output_and_resume_refusals(sd1_bundle, photos, tmp_path):
    out = tmp_path / "o.safetensors"
    out.write_text("keep me")
    _bad(_cli(sd1_bundle, photos, out), "--force")
    assert out.read_text() == "keep me"
    _bad(_cli(sd1_bundle, photos, tmp_path / "x.safetensors", "--resume"), "no checkpoint")
    # a checkpoint from another run (different seed) is refused, not silently mixed in
    other = tmp_path / "y.safetensors"
    assert runner.invoke(app, _cli(sd1_bundle, photos, other, "--steps", "2", "--seed", "1", "--no-search-init")).exit_code == 0
    _bad(_cli(sd1_bundle, photos, other, "--steps", "4", "--seed", "2", "--no-search-init", "--resume"), "different run")


def test_missing_provider_warns_and_falls_back_or_refuses_with_strict(sd1_bundle, photos, tmp_path):
    import onnxruntime as ort

    if "CUDAExecutionProvider" in ort.get_available_providers():
        pytest.skip("this machine has CUDA EP")
    out = tmp_path / "o.safetensors"
    args = ["personalize", str(sd1_bundle), str(photos), "--token", TOKEN, "--init", "dog", "--out", str(out),
            "--device", "cuda", "-q", "--steps", "2", "--no-search-init"]
    r = runner.invoke(app, args)
    assert r.exit_code == 0 and r.output.count("warning:") == 1, r.output
    _bad(args + ["--strict", "--force"], "not available")


def test_io_binding_path_gives_the_same_losses(sd1_bundle, photos):
    """GPU profiles keep text-encoder outputs on the device via IOBinding; on CPU the path must agree."""
    import dataclasses

    from zoodip_edge.profiles import resolve_profile

    plain = make(sd1_bundle, photos)
    bound = Personalizer(sd1_bundle, photos, TOKEN, "dog", profile=dataclasses.replace(resolve_profile("cpu"), io_binding=True))
    plan = plain.optimizer.propose()
    np.testing.assert_array_equal(plain.losses(plan.thetas, plan.t, plan.noise_seed),
                                  bound.losses(plan.thetas, plan.t, plan.noise_seed))


def test_captions_file_is_used_and_checked(sd1_bundle, photos, tmp_path):
    caps = {f"ball{i}.png": "a photo of {} on a white background, {} again" for i in range(4)}
    good = tmp_path / "captions.json"
    good.write_text(json.dumps(caps))
    p = Personalizer(sd1_bundle, photos, TOKEN, "dog", captions=good, profile="cpu")
    prompt, _, _ = p.draw(700, 1)
    assert prompt == f"a photo of {TOKEN} on a white background, {TOKEN} again"
    assert (p.text.ids(prompt) == p.text.token_id).sum() == 2
    del caps["ball2.png"]
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps(caps))
    _bad(_cli(sd1_bundle, photos, tmp_path / "o.safetensors", "--captions", str(bad)), "ball2.png")


def test_devices_command_lists_profiles_and_marks_auto():
    r = runner.invoke(app, ["devices"])
    assert r.exit_code == 0, r.output
    for name in ("cpu", "cuda", "cuda-lowvram", "jetson-orin-nano", "tensorrt"):
        assert f" {name} " in r.output
    rows = r.output.strip().splitlines()[1:-1]
    assert sum(row.startswith("* ") for row in rows) == 1


def test_mu_below_the_verified_one_is_warned(sd1_bundle, photos):
    said: list[str] = []
    Personalizer(sd1_bundle, photos, TOKEN, "dog", settings=Settings(mu=1e-4), profile="cpu", warn=said.append)
    assert any("below the 0.001 this bundle's ZO fidelity gate verified" in s for s in said)
    said.clear()
    Personalizer(sd1_bundle, photos, TOKEN, "dog", settings=Settings(mu=1e-2), profile="cpu", warn=said.append)
    assert not any("fidelity" in s for s in said)


def test_a_bundle_that_failed_its_fidelity_gate_is_warned(bundle_copy, photos):
    m = json.loads((bundle_copy / "manifest.json").read_text())
    m["verification"]["zo_fidelity"].update(passed=False, pearson=0.2)
    (bundle_copy / "manifest.json").write_text(json.dumps(m))
    said: list[str] = []
    Personalizer(bundle_copy, photos, TOKEN, "dog", settings=Settings(), profile="cpu", warn=said.append)
    assert any("failed its ZO fidelity gate (pearson 0.20" in s for s in said)


def test_the_api_imports_from_the_runtime_package_and_starts_nothing_early():
    """The module docstring's example works, and a light module of the package does not load ORT."""
    import subprocess
    import sys

    from zoodip_edge.runtime import Generator, Personalizer, Settings
    from zoodip_edge.runtime.generate import Generator as G
    from zoodip_edge.runtime.personalize import Personalizer as P
    from zoodip_edge.runtime.personalize import Settings as S

    assert (Personalizer, Settings, Generator) == (P, S, G)
    code = "import sys, zoodip_edge.runtime.images; print('onnxruntime' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.strip() == "False"


@pytest.mark.slow
def test_train_is_the_whole_run_for_an_app(photos, tmp_path):
    """An app gets what the CLI gets from Personalizer.train: Ctrl-C writes the checkpoint, a resume
    continues it and its log, and the result equals an uninterrupted run's, replay included."""
    from zoodip_edge.toy import shipped_path

    def make():
        return Personalizer(shipped_path("bundle"), photos, "<red-ball>", "shape", settings=Settings(search_init=False),
                            profile="cpu")

    whole = make()
    whole.train(6, checkpoint=tmp_path / "whole.ckpt")

    def interrupt(record):
        if record.step == 2:
            raise KeyboardInterrupt

    ckpt, log = tmp_path / "run.ckpt", tmp_path / "run.jsonl"
    with pytest.raises(KeyboardInterrupt):
        make().train(6, checkpoint=ckpt, checkpoint_every=0, log=log, on_step=interrupt)
    with pytest.raises(UserError, match="pass --resume to continue"):
        make().train(6, checkpoint=ckpt, log=log)
    out = tmp_path / "e.safetensors"
    out.write_text("the user's")
    with pytest.raises(UserError, match="is not this run's embedding"):  # refused before any step
        make().train(6, checkpoint=ckpt, log=log, resume=True, out=out)
    out.unlink()
    resumed = make()
    resumed.train(6, checkpoint=ckpt, log=log, resume=True, out=out)
    assert resumed.step_index == 6 and resumed.wrote(out)
    np.testing.assert_array_equal(resumed.theta, whole.theta)
    lines = [json.loads(x) for x in log.read_text().splitlines()]
    assert [r["step"] for r in lines[1:]] == list(range(6))
    np.testing.assert_array_equal(replay(np.array(lines[0]["theta0"]), ZOConfig(**lines[0]["config"]), lines[1:]),
                                  resumed.theta)
