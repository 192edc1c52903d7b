"""Steps to quality: zeroth-order personalization against gradient textual inversion, on a toy model.

    python -m benchmarks.zo_steps --model toy-768 --steps 1500 --every 100 --out zo_steps_768.json
    python -m benchmarks.zo_steps --report zo_steps_768.json

Every arm learns the same token from the same five photos on the same stream of draws: step k of
seed s uses the same image, caption, t, latent sample and noise in every arm (the ZO optimizer's
stream; arms that do not perturb draw it too and discard the directions). Arms:

- ``ti``: gradient textual inversion, torch fp32 on the model's diffusers weights, autograd on
  the one embedding row, Adam (``--ti-lr``);
- ``zoodip``: ZOODiP as published on the int8 bundle through ONNX Runtime (n = 2, RGE, ZOAdam,
  SG at tau = 128, PUTS), lr and mu from the bundle's manifest unless given;
- ``oracle``: the same optimizer fed the exact directional derivatives (torch fp32 autograd) instead
  of finite differences: what is left is the random directions' noise, not the loss's own;
- levers: ``momentum`` (one direction along ZOAdam's first moment), ``guided`` (directions mixed with
  the span of the last k estimates), ``search`` (the start searched among vocabulary tokens, its
  forward passes counted), and their combinations.

Scored every ``--every`` steps by one ORT evaluator on the int8 bundle: held-out diffusion loss on
16 fixed (image, t, eps) probes and the concept score of 16 generated images (pixels only).
Forward passes: ZO arms n + 1 per step (plus the search's), gradient arms 3 (forward + backward).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from benchmarks.common import header, recorded_argv
from zoodip_edge.demo import PROBES, generate_with, parse_concept
from zoodip_edge.runtime.personalize import Personalizer, Settings
from zoodip_edge.runtime.stopping import Plateau, auto_every, auto_rule, stop_probes
from zoodip_edge.toy import shipped_path, toy_model
from zoodip_edge.toy.score import concept_score
from zoodip_edge.toy.world import GENERIC, concept_photos

EVAL_IMAGES, EVAL_SEED = 16, 1234
PROFILE = "cpu"  # or a copy with fewer threads (--threads), so that runs can share the cores
CONCEPTS = {
    "toy-768": ["purple-ring", "green-triangle", "blue-cross", "orange-cross", "pink-circle", "red-diamond", "pink-diamond"],
    "toy-64": ["purple-ring", "green-triangle", "blue-cross", "orange-cross"],
}


@dataclass(frozen=True)
class Arm:
    kind: str  # "zo", "oracle" or "ti"
    settings: Settings = Settings()
    search: bool = False
    drift: bool = False  # an experiment: the guiding basis also holds the direction theta has moved since the start


ARMS = {
    "ti": Arm("ti"),
    "zoodip": Arm("zo"),
    "oracle": Arm("oracle"),
    "momentum": Arm("zo", Settings(guide_momentum=True)),
    "guided": Arm("zo", Settings(guide_k=8)),
    "search": Arm("zo", search=True),
    "search+momentum": Arm("zo", Settings(guide_momentum=True), search=True),
    "search+guided": Arm("zo", Settings(guide_k=8), search=True),
    "no-sg": Arm("zo", Settings(subspace=False)),
    "search-lr1e-3": Arm("zo", Settings(lr=1e-3), search=True),  # smaller steps from a good start
}


def arm(name: str) -> Arm:
    """An arm of ARMS, or a lever spelled out: ``[search+]{vocab|enc}<k>[-a<alpha>][-lr<lr>][-r<refresh>][-n<n>][-drift]``
    (directions mixed with the vocabulary's k principal directions, or with the k directions the text
    encoder responds to most read every ``refresh`` steps; full-space share alpha, ZO learning rate lr,
    n directions a step;
    ``-drift`` adds the direction theta has moved since its start to that basis, an experiment)."""
    if name in ARMS:
        return ARMS[name]
    m = re.fullmatch(r"(search\+)?(vocab|enc)(\d+)(?:-a([\d.e-]+?))?(?:-lr([\d.e-]+?))?(?:-r(\d+))?(?:-n(\d+))?(-drift)?", name)
    if not m:
        raise argparse.ArgumentTypeError(f"unknown method {name!r}: one of {', '.join(ARMS)} or "
                                         "[search+]{vocab|enc}<k>[-a<alpha>][-lr<lr>][-r<refresh>][-n<n>][-drift]")
    search, basis, k, alpha, lr, refresh, n, drift = m.groups()
    guide = {"guide_vocab": int(k)} if basis == "vocab" else {"guide_encoder": int(k)}
    return Arm("zo", Settings(**guide, guide_alpha=float(alpha) if alpha else None, lr=float(lr) if lr else None,
                              guide_refresh=int(refresh) if refresh else None, n=int(n) if n else None), search=bool(search), drift=bool(drift))


class Evaluator:
    """Scores any theta of one concept the same way (ORT, int8 bundle)."""

    def __init__(self, bundle: Path, photos: list[Path], token: str, color: str, shape: str, world):
        self.p = Personalizer(bundle, photos, token, GENERIC, settings=Settings(batch_perturbations=True), profile=PROFILE)
        self.color, self.shape, self.world = color, shape, world
        self.l_init = self.p.held_out_loss(self.p.theta0, PROBES)
        words = world.words(color, shape)
        self.l_words = self.p.held_out_loss(None, PROBES, words=words) if words != GENERIC else float("nan")
        self.stop = stop_probes(self.p.config.t_low, self.p.config.t_high)  # what --steps auto reads

    def losses(self, theta: np.ndarray) -> dict:
        """The held-out loss and what ``--steps auto`` reads: no images, cheap enough to read often."""
        return {"loss": self.p.held_out_loss(theta, PROBES), "stop_loss": self.p.held_out_loss(theta, self.stop)}

    def __call__(self, theta: np.ndarray) -> dict:
        images = generate_with(self.p, theta, EVAL_IMAGES, EVAL_SEED)
        return {**self.losses(theta), "norm": float(np.linalg.norm(theta)),
                **concept_score(images, self.color, self.shape, self.world)}


class TorchLoss:
    """The diffusion loss of one draw in torch fp32 on the diffusers weights, differentiable in theta."""

    def __init__(self, model: Path, p: Personalizer):
        import torch
        from diffusers import UNet2DConditionModel
        from transformers import CLIPTextModel

        from zoodip_edge.export.graphs import TextEncoderFromEmbeddings

        self.torch, self.p = torch, p
        self.text = TextEncoderFromEmbeddings(CLIPTextModel.from_pretrained(model / "text_encoder")).eval()
        self.unet = UNet2DConditionModel.from_pretrained(model / "unet").eval()
        for m in (self.text, self.unet):
            m.requires_grad_(False)

    def __call__(self, theta, t: int, noise_seed: int):
        torch = self.torch
        prompt, zt, target = self.p.draw(t, noise_seed)  # the same draw the ZO arms see
        base = self.p.text.embed(prompt, np.zeros((1, self.p.theta0.size)))
        is_new = torch.from_numpy(self.p.text.ids(prompt) == self.p.text.token_id)
        embeds = torch.where(is_new[None, :, None], theta.float()[None, None, :], torch.from_numpy(base))
        pred = self.unet(torch.from_numpy(zt), torch.tensor([t]), self.text(embeds)[0]).sample
        return torch.mean((pred.double() - torch.from_numpy(target).double()) ** 2)


def run_arm(name: str, arm: Arm, bundle: Path, model: Path, photos, token: str, seed: int, steps: int, every: int,
            evaluate: Evaluator, ti_lr: float, lr: float | None, mu: float | None, probe_every: int) -> dict:
    """One arm's run: scored every ``every`` steps, held-out losses read on ``--steps auto``'s schedule
    (at most ``probe_every`` apart)."""
    settings = replace(arm.settings, seed=seed, lr=lr if arm.settings.lr is None else arm.settings.lr,
                       mu=arm.settings.mu if mu is None else mu, batch_perturbations=True, search_init=arm.search)
    p = Personalizer(bundle, photos, token, GENERIC, settings=settings, profile=PROFILE)
    forwards, label = 0, GENERIC
    if arm.search:
        found = p.search_start()
        forwards, label = found.forwards, found.label
    per_step = p.config.n + 1 if arm.kind == "zo" else 3
    curve = [{"step": 0, "forwards": forwards, "seconds": 0.0, **evaluate(p.theta)}]
    probes = [{"step": 0, **{k: curve[0][k] for k in ("loss", "stop_loss")}}]
    schedule = Plateau(every=probe_every, readings=[(0, curve[0]["stop_loss"])])  # only its due() is used
    train_s = 0.0

    def read(step: int, theta: np.ndarray) -> None:
        if schedule.due(step):
            probes.append({"step": step, **evaluate.losses(theta)})
            schedule.readings.append((step, probes[-1]["stop_loss"]))
        if step % every == 0:
            curve.append({"step": step, "forwards": forwards + per_step * step, "seconds": train_s, **evaluate(theta)})

    if arm.kind == "zo":
        prior, start = p.optimizer.prior, p.theta.copy()
        while p.step_index < steps:
            t0 = time.perf_counter()
            moved = p.theta - start
            if arm.drift and np.any(moved):
                p.optimizer.set_prior(np.concatenate([prior, moved[None] / np.linalg.norm(moved)]))
            p.step()
            train_s += time.perf_counter() - t0
            read(p.step_index, p.theta)
    else:
        import torch

        loss_fn = TorchLoss(model, p)
        theta = torch.nn.Parameter(torch.tensor(p.theta0, dtype=torch.float64))
        adam = torch.optim.Adam([theta], lr=ti_lr) if arm.kind == "ti" else None
        opt = p.optimizer  # its stream draws t and noise (and, for the oracle, the directions)
        for step in range(1, steps + 1):
            t0 = time.perf_counter()
            plan = opt.propose()
            if adam is not None:
                loss = loss_fn(theta, plan.t, plan.noise_seed)
                adam.zero_grad()
                loss.backward()
                adam.step()
                opt.update(plan, np.zeros(p.config.n + 1))  # advances the stream; its theta is unused
            else:
                x = torch.tensor(opt.theta, requires_grad=True)
                (grad,) = torch.autograd.grad(loss_fn(x, plan.t, plan.noise_seed), x)
                exact = plan.directions @ grad.numpy()  # exact directional derivatives
                opt.update(plan, np.concatenate([[0.0], p.config.mu * exact]))
            train_s += time.perf_counter() - t0
            read(step, theta.detach().numpy() if adam is not None else opt.theta)
    return {"method": name, "seed": seed, "init": label, "config": p.config.__dict__, "curve": curve,
            "probes": probes}


# ------------------------------------------------------------------ report ---------------

def reach(curve: list[dict], target: float) -> dict | None:
    return next((c for c in curve if c["score"] >= target), None)


def _med(values: list[float]) -> str:
    if not values:
        return "—"
    v = np.asarray(values, dtype=float)
    return f"{np.median(v):.0f} [{v.min():.0f}–{v.max():.0f}]"


def summarize(runs: list[dict], methods: list[str]) -> str:
    ti_final = {}
    for r in runs:
        if r["method"] == "ti":
            ti_final.setdefault(r["concept"], []).append(r["curve"][-1]["score"])
    ti_loss = {(r["concept"], r["seed"]): r["curve"][-1]["loss"] for r in runs if r["method"] == "ti"}
    lines = ["| method | runs | final score | gap closed to TI's loss | 80% of TI: reached, median steps [range] | forwards | "
             "95% of TI: reached, median steps [range] | forwards |", "|---|---|---|---|---|---|---|---|"]
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        if not rs:
            continue
        fin = np.array([r["curve"][-1]["score"] for r in rs])
        gaps = [(r["curve"][0]["loss"] - r["curve"][-1]["loss"]) / (r["curve"][0]["loss"] - ti_loss[(r["concept"], r["seed"])])
                for r in rs if (r["concept"], r["seed"]) in ti_loss
                and r["curve"][0]["loss"] - ti_loss[(r["concept"], r["seed"])] > 1e-9]
        cells = []
        for frac in (0.8, 0.95):
            hits = [reach(r["curve"], frac * np.mean(ti_final[r["concept"]])) for r in rs if r["concept"] in ti_final]
            got = [h for h in hits if h]
            cells += [f"{len(got)}/{len(hits)}, {_med([h['step'] for h in got])}", _med([h["forwards"] for h in got])]
        gap = f"{np.mean(gaps):.2f} ± {np.std(gaps):.2f}" if gaps else "—"
        lines.append(f"| {m} | {len(rs)} | {fin.mean():.2f} ± {fin.std():.2f} | {gap} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def by_step(runs: list[dict], methods: list[str]) -> str:
    steps = sorted({c["step"] for r in runs for c in r["curve"]})
    show = [s for s in steps if s in (0, 100, 200, 300, 500, 1000, 1500, 2000, 3000) or s == steps[-1]]
    lines = ["| method | " + " | ".join(f"{s}" for s in show) + " |", "|---|" + "---|" * len(show)]
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        if rs:
            cells = [f"{np.mean([c['score'] for r in rs for c in r['curve'] if c['step'] == s]):.2f}" for s in show]
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def at_95(readings: list[dict]) -> int | None:
    """The first step whose held-out loss has 95% of the run's final gain (final: the mean of the last
    three readings, so that one noisy reading does not set it); None when the run never gained."""
    losses = np.array([c["loss"] for c in readings])
    gain = losses[0] - losses[-3:].mean()
    if gain <= 0:
        return None
    return next(c["step"] for c in readings if losses[0] - c["loss"] >= 0.95 * gain)


def auto_stop(runs: list[dict], methods: list[str], rule: dict | None = None) -> str:
    """``--steps auto`` replayed on each run's held-out readings (``probes``; older files: the scored steps)."""
    lines = ["| method | runs | stop step / step at 95% of the held-out gain, median [range] | within 1.3x either way | "
             "score kept - score at the end of the budget, mean |", "|---|---|---|---|---|"]
    for m in methods:
        ratios, drops = [], []
        for r in (r for r in runs if r["method"] == m):
            readings = r.get("probes") or r["curve"]
            plateau, stop, seen = auto_rule(r["curve"][-1]["step"], **(rule or {})), readings[-1], []
            for c in readings:  # recorded on the rule's schedule (or coarser, in older files)
                seen.append(c)
                if plateau.update(c["step"], c["stop_loss"]):
                    stop = c
                    break
            kept_step = min(seen, key=lambda c: c["stop_loss"])["step"]  # the token a stopped run keeps
            scored = [c for c in r["curve"] if c["step"] <= kept_step]  # its score: the last scored step before it
            at95 = at_95(readings)
            if at95 is not None:
                ratios.append(stop["step"] / at95)
            drops.append(scored[-1]["score"] - r["curve"][-1]["score"])
        if drops:
            v = np.asarray(ratios) if ratios else np.full(1, np.nan)
            lines.append(f"| {m} | {len(drops)} ({len(drops) - len(ratios)} never gained) | {np.median(v):.2f} "
                         f"[{v.min():.2f}–{v.max():.2f}] | {np.mean((v <= 1.3) & (v >= 1 / 1.3)):.0%} | "
                         f"{np.mean(drops):+.3f} |")
    return "\n".join(lines)


def report(runs: list[dict], methods: list[str], unnamed: set[str], rule: dict | None = None) -> None:
    groups = [("all concepts", runs), ("named concepts", [r for r in runs if r["concept"] not in unnamed]),
              ("unnamed concepts", [r for r in runs if r["concept"] in unnamed])]
    for title, rs in groups:
        if rs:
            print(f"\n**{title}** ({len({r['concept'] for r in rs})} concepts):\n")
            print(summarize(rs, methods))
    print("\nConcept score by step (mean over all runs):\n")
    print(by_step(runs, methods))
    print(f"\n`--steps auto` (Plateau {rule or 'defaults'}) replayed on the probe readings:\n")
    print(auto_stop(runs, methods, rule))
    inits = {(r["method"], r["concept"]): r["init"] for r in runs if r["init"] != GENERIC}
    if inits:
        print("\nSearched starts: " + "; ".join(f"{c}: {i}" for (m, c), i in sorted(inits.items()) if m == "search"))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="toy-768", choices=["toy-64", "toy-768"])
    ap.add_argument("--concepts", nargs="+")
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=1500)
    ap.add_argument("--every", type=int, default=100, help="score (generate and read pixels) every N steps")
    ap.add_argument("--probe-every", type=int, help="read the held-out losses every N steps (default: what "
                    "`--steps auto` reads at a budget of --steps)")
    ap.add_argument("--methods", nargs="+", default=["ti", "zoodip", "oracle", "momentum", "guided", "search"],
                    help=f"arms: {', '.join(ARMS)}, or [search+]{{vocab|enc}}<k>[-a<alpha>][-lr<lr>][-r<refresh>][-n<n>][-drift]")
    ap.add_argument("--lr", type=float, help="ZO learning rate (default: the bundle's)")
    ap.add_argument("--mu", type=float, help="ZO perturbation size (default: the bundle's)")
    ap.add_argument("--ti-lr", type=float, default=5e-3)
    ap.add_argument("--threads", type=int, default=2, help="threads for torch and ONNX Runtime (1: two runs share 2 cores)")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--report", type=Path, nargs="+", help="print the tables of saved --out files and exit")
    ap.add_argument("--rule", default="", help="replay --steps auto with other Plateau settings, e.g. window=1.5,min_gain=0.02")
    a = ap.parse_args()
    try:
        [arm(m) for m in a.methods]
    except argparse.ArgumentTypeError as e:
        ap.error(str(e))
    if a.report:
        saved = [json.loads(path.read_text()) for path in a.report]
        runs = [r for s in saved for r in s["runs"]]
        print(f"Report of {' '.join(map(str, a.report))}; commands: " + "; ".join(f"`{' '.join(s['argv'])}`" for s in saved))
        rule = {k: float(v) for k, v in (kv.split("=") for kv in a.rule.split(",") if kv)}
        report(runs, list(dict.fromkeys(r["method"] for r in runs)), {c for s in saved for c in s.get("unnamed", [])}, rule)
        return

    import dataclasses

    import torch

    from zoodip_edge.profiles import resolve_profile

    global PROFILE
    torch.set_num_threads(a.threads)
    PROFILE = dataclasses.replace(resolve_profile("cpu"), intra_op_threads=a.threads)
    toy = toy_model(a.model)
    bundle, model = shipped_path(toy.bundle), shipped_path(toy.model)
    concepts = a.concepts or CONCEPTS[a.model]
    unnamed = [c for c in concepts if not all(toy.world.named(x) for x in parse_concept(c, toy.world))]
    runs: list[dict] = []
    with tempfile.TemporaryDirectory() as tmp:
        for concept in concepts:
            color, shape = parse_concept(concept, toy.world)
            token = f"<{concept}>"
            photos = concept_photos(Path(tmp) / concept, color, shape, count=5, seed=0)
            evaluate = Evaluator(bundle, photos, token, color, shape, toy.world)
            for seed in a.seeds:
                for method in a.methods:
                    t = time.perf_counter()
                    r = run_arm(method, arm(method), bundle, model, photos, token, seed, a.steps, a.every, evaluate,
                                a.ti_lr, a.lr, a.mu, a.probe_every or auto_every(a.steps))
                    runs.append({"concept": concept, "l_words": evaluate.l_words, **r})
                    f = r["curve"][-1]
                    print(f"{concept} seed {seed} {method}: score {r['curve'][0]['score']:.2f} -> {f['score']:.2f}, "
                          f"loss {r['curve'][0]['loss']:.4f} -> {f['loss']:.4f} ({time.perf_counter() - t:.0f} s)",
                          file=sys.stderr, flush=True)
                    if a.out:
                        a.out.write_text(json.dumps({"argv": recorded_argv(sys.argv), "machine": header(sys.argv), "unnamed": unnamed,
                                                     "runs": runs}, indent=0))
    print(header(sys.argv))
    print(f"{a.model}: {len(concepts)} concepts x {len(a.seeds)} seeds, {a.steps} steps, scored every {a.every}; "
          f"gradient TI Adam lr {a.ti_lr}; ZO lr {a.lr or 'bundle'}, mu {a.mu or 'bundle'}")
    report(runs, a.methods, set(unnamed))


if __name__ == "__main__":
    main()
