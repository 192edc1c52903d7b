"""Quality on the toy world: ZOODiP (and its ablations) on the shipped INT8 bundle vs gradient
textual inversion in torch fp32, same photos, same step budget, same evaluator.

    python -m benchmarks.toy_quality --steps 2000 --seeds 0 1 2 --out docs/toy_quality.json

Methods: zoodip (SG + PUTS), no-sg, no-puts, naive (both off) — ORT, int8-cpu bundle, NumPy
optimizer — and gradient-ti (torch fp32 autograd on one embedding row, Adam, t ~ U{0..999}).
Every checkpoint of every run is scored by the same ORT evaluator:
  (a) held-out diffusion loss on fixed (image, t, eps) probes, as the fraction of the gap closed
      between the initializer token ("shape") and the concept in words ("purple ring");
  (b) concept score of 16 generated images, read from pixels (toy/score.py: color and shape);
  (c) steps and training seconds (evaluation excluded) to reach 80% of gradient TI's final score.
Prints a markdown report (machine, versions, command) and writes every curve to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import header, recorded_argv
from zoodip_edge.demo import PROBES, generate_with, parse_concept
from zoodip_edge.runtime.personalize import Personalizer, Settings
from zoodip_edge.runtime.text import OBJECT_TEMPLATES
from zoodip_edge.toy import shipped_path
from zoodip_edge.toy.score import concept_score
from zoodip_edge.toy.world import GENERIC, concept_photos

ZO_METHODS = {"zoodip": (True, True), "no-sg": (False, True), "no-puts": (True, False), "naive": (False, False)}
EVAL_IMAGES, EVAL_SEED = 16, 1234
TARGET = 0.8  # (c): fraction of gradient TI's final concept score


class Evaluator:
    """One ORT personalizer per concept, used only to score any θ the same way."""

    def __init__(self, photos: list[Path], token: str, color: str, shape: str, bundle: Path | None = None):
        self.p = Personalizer(bundle or shipped_path("bundle"), photos, token, GENERIC, settings=Settings(batch_perturbations=True), profile="cpu")
        self.color, self.shape = color, shape
        self.l_init = self.p.held_out_loss(self.p.theta0, PROBES)
        self.l_words = self.p.held_out_loss(None, PROBES, words=f"{color} {shape}")

    def __call__(self, theta: np.ndarray) -> dict:
        loss = self.p.held_out_loss(theta, PROBES)
        images = generate_with(self.p, theta, EVAL_IMAGES, EVAL_SEED)
        return {"loss": loss, "gap_closed": (self.l_init - loss) / (self.l_init - self.l_words),
                **concept_score(images, self.color, self.shape)}


def run_zo(method: str, photos, token: str, seed: int, steps: int, every: int, evaluate: Evaluator, lr: float, mu: float,
           tau: int | None = None, bundle: Path | None = None) -> list[dict]:
    sg, puts = ZO_METHODS[method]
    p = Personalizer(bundle or shipped_path("bundle"), photos, token, GENERIC, profile="cpu",
                     settings=Settings(seed=seed, lr=lr, mu=mu, tau=tau, subspace=sg, puts=puts, batch_perturbations=True))
    curve, train_s = [{"step": 0, "seconds": 0.0, **evaluate(p.theta0)}], 0.0
    while p.step_index < steps:
        t = time.perf_counter()
        for _ in range(every):
            p.step()
        train_s += time.perf_counter() - t
        curve.append({"step": p.step_index, "seconds": train_s, **evaluate(p.theta)})
    return curve


def run_gradient_ti(photos, token: str, seed: int, steps: int, every: int, evaluate: Evaluator, lr: float) -> list[dict]:
    """Textual inversion with autograd in torch fp32 on the shipped diffusers model (same data draws as ZO's)."""
    import torch
    from diffusers import AutoencoderKL, DDPMScheduler, UNet2DConditionModel
    from transformers import CLIPTextModel

    from zoodip_edge.export.graphs import TextEncoderFromEmbeddings
    from zoodip_edge.runtime.images import load_images

    model = shipped_path("model")
    torch.manual_seed(seed)
    text = TextEncoderFromEmbeddings(CLIPTextModel.from_pretrained(model / "text_encoder")).eval()
    unet = UNet2DConditionModel.from_pretrained(model / "unet").eval()
    vae = AutoencoderKL.from_pretrained(model / "vae").eval()
    abar = DDPMScheduler.from_pretrained(model / "scheduler").alphas_cumprod.float()
    for m in (text, unet, vae):
        m.requires_grad_(False)
    enc = evaluate.p.text  # the same tokenizer and table as the bundle (ids only)
    table = text.model.embeddings.token_embedding.weight
    with torch.no_grad():
        imgs = torch.from_numpy(np.stack([im for _, im in load_images(photos, evaluate.p.bundle.manifest["resolution"])]))
        post = vae.encode(imgs).latent_dist
        mean, std, scale = post.mean, post.std, vae.config.scaling_factor
    theta = torch.nn.Parameter(torch.tensor(evaluate.p.theta0, dtype=torch.float32))
    opt = torch.optim.Adam([theta], lr=lr)
    rng = np.random.default_rng(seed)
    curve, train_s = [{"step": 0, "seconds": 0.0, **evaluate(evaluate.p.theta0)}], 0.0
    for step in range(1, steps + 1):
        t0 = time.perf_counter()
        i = int(rng.integers(len(mean)))
        prompt = OBJECT_TEMPLATES[int(rng.integers(len(OBJECT_TEMPLATES)))].format(token)
        ids = torch.from_numpy(enc.ids(prompt))
        is_new = ids == enc.token_id
        rows = table[torch.where(is_new, 0, ids)]
        embeds = torch.where(is_new[:, None], theta[None, :], rows)[None]
        t = int(rng.integers(0, 1000))
        g = torch.Generator().manual_seed(int(rng.integers(2**31)))
        z = scale * (mean[i:i + 1] + std[i:i + 1] * torch.randn(mean[i:i + 1].shape, generator=g))
        eps = torch.randn(z.shape, generator=g)
        zt = abar[t].sqrt() * z + (1 - abar[t]).sqrt() * eps
        pred = unet(zt, torch.tensor([t]), text(embeds)[0]).sample
        loss = torch.nn.functional.mse_loss(pred, eps)
        opt.zero_grad()
        loss.backward()
        opt.step()
        train_s += time.perf_counter() - t0
        if step % every == 0:
            curve.append({"step": step, "seconds": train_s, **evaluate(theta.detach().double().numpy())})
    return curve


def first_reaching(curve: list[dict], target: float) -> dict | None:
    return next(({"step": c["step"], "seconds": c["seconds"]} for c in curve if c["score"] >= target), None)


def summarize(runs: list[dict], methods: list[str]) -> str:
    def ms(values):
        v = np.asarray(values, dtype=float)
        return f"{v.mean():.2f} ± {v.std():.2f}"

    gti_final = {}
    for r in runs:
        if r["method"] == "gradient-ti":
            gti_final.setdefault(r["concept"], []).append(r["curve"][-1]["score"])
    lines = ["| method | gap closed (a) | concept score (b) | color | shape | reached 80% of grad-TI score (c) | median steps / s to reach | s/step |",
             "|---|---|---|---|---|---|---|---|"]
    for method in methods:
        rs = [r for r in runs if r["method"] == method]
        if not rs:
            continue
        fin = [r["curve"][-1] for r in rs]
        hits = [first_reaching(r["curve"], TARGET * np.mean(gti_final[r["concept"]])) if r["concept"] in gti_final else None for r in rs]
        got = [h for h in hits if h]
        reach = f"{np.median([h['step'] for h in got]):.0f} / {np.median([h['seconds'] for h in got]):.1f}" if got else "—"
        s_step = np.mean([r["curve"][-1]["seconds"] / r["curve"][-1]["step"] for r in rs])
        lines.append(f"| {method} | {ms([f['gap_closed'] for f in fin])} | {ms([f['score'] for f in fin])} | "
                     f"{ms([f['color'] for f in fin])} | {ms([f['shape'] for f in fin])} | {len(got)}/{len(rs)} | {reach} | {s_step:.4f} |")
    start = [r["curve"][0] for r in runs if r["method"] == methods[0]]
    lines.append(f"| (initializer '{GENERIC}', step 0) | 0 | {ms([s['score'] for s in start])} | "
                 f"{ms([s['color'] for s in start])} | {ms([s['shape'] for s in start])} | | | |")
    return "\n".join(lines)


def curve_table(runs: list[dict], methods: list[str]) -> str:
    """Mean gap closed / concept score at a few step counts: how fast each method gets there."""
    steps = sorted({c["step"] for r in runs for c in r["curve"]})
    show = [s for s in steps if s in (100, 200, 300, 500) or s == steps[-1]]
    lines = ["| method | " + " | ".join(f"step {s}" for s in show) + " |", "|---|" + "---|" * len(show)]
    for m in methods:
        rs = [r for r in runs if r["method"] == m]
        if rs:
            cells = []
            for s in show:
                at = [c for r in rs for c in r["curve"] if c["step"] == s]
                cells.append(f"{np.mean([c['gap_closed'] for c in at]):.2f} / {np.mean([c['score'] for c in at]):.2f}")
            lines.append(f"| {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def report(runs: list[dict], methods: list[str], concepts: list[str]) -> None:
    print(summarize(runs, methods))
    print("\nGap closed / concept score, mean over all runs, by step:\n")
    print(curve_table(runs, methods))
    for concept in concepts:
        print(f"\n{concept}:\n")
        print(summarize([r for r in runs if r["concept"] == concept], methods))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--concepts", nargs="+", default=["purple-ring", "green-triangle", "blue-cross", "orange-cross"])
    ap.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    ap.add_argument("--steps", type=int, default=2000)
    ap.add_argument("--every", type=int, default=250)
    ap.add_argument("--methods", nargs="+", default=[*ZO_METHODS, "gradient-ti"])
    ap.add_argument("--lr", type=float, default=None, help="ZO learning rate (default: the bundle's, 2e-2)")
    ap.add_argument("--mu", type=float, default=None, help="ZO perturbation size (default: the bundle's, 1e-2)")
    ap.add_argument("--tau", type=int, default=128, help="SG buffer length (the bundle's default is 11)")
    ap.add_argument("--ti-lr", type=float, default=5e-3)
    ap.add_argument("--bundle", type=Path, help="bundle the ZO methods train on (default: the shipped one; "
                    "scoring uses the shipped bundle unless --score-on-bundle)")
    ap.add_argument("--score-on-bundle", action="store_true", help="score with --bundle too (the graph a user would "
                    "generate with), not the shipped one")
    ap.add_argument("--out", type=Path)
    ap.add_argument("--report", type=Path, nargs="+", help="print the tables of saved --out files (together) and exit")
    a = ap.parse_args()
    if a.report:
        runs = [r for path in a.report for r in json.loads(path.read_text())["runs"]]
        methods = list(dict.fromkeys(r["method"] for r in runs))
        print(f"Report of {' '.join(map(str, a.report))}\n")
        report(runs, methods, list(dict.fromkeys(r["concept"] for r in runs)))
        return

    import torch

    torch.set_num_threads(2)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for concept in a.concepts:
            color, shape = parse_concept(concept)
            token = f"<{concept}>"
            photos = concept_photos(Path(tmp) / concept, color, shape, count=5, seed=0)
            evaluate = Evaluator(photos, token, color, shape, a.bundle if a.score_on_bundle else None)
            for seed in a.seeds:
                for method in a.methods:
                    t = time.perf_counter()
                    if method == "gradient-ti":
                        curve = run_gradient_ti(photos, token, seed, a.steps, a.every, evaluate, a.ti_lr)
                    else:
                        curve = run_zo(method, photos, token, seed, a.steps, a.every, evaluate, a.lr, a.mu, a.tau, a.bundle)
                    runs.append({"concept": concept, "seed": seed, "method": method, "curve": curve,
                                 "l_init": evaluate.l_init, "l_words": evaluate.l_words})
                    f = curve[-1]
                    print(f"{concept} seed {seed} {method}: gap {f['gap_closed']:.2f} score {f['score']:.2f} "
                          f"({time.perf_counter() - t:.0f} s)", file=sys.stderr, flush=True)
                    if a.out:
                        a.out.write_text(json.dumps({"argv": recorded_argv(sys.argv), "runs": runs}, indent=0))
    import diffusers
    import onnxruntime

    print(header(sys.argv))
    print(f"torch {torch.__version__}, diffusers {diffusers.__version__}, onnxruntime {onnxruntime.__version__}; "
          f"ZO: lr {a.lr}, mu {a.mu}, n 2, tau {a.tau or 'bundle default'} (trained on {a.bundle or 'the shipped int8-cpu bundle'}, scored on {a.bundle if a.score_on_bundle else 'the shipped bundle'}); gradient TI: Adam lr {a.ti_lr}; "
          f"{len(a.concepts)} concepts x {len(a.seeds)} seeds, {a.steps} steps, scored every {a.every}\n")
    report(runs, a.methods, a.concepts)


if __name__ == "__main__":
    main()
