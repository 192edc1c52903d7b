"""Where the diffusion loss's gradient in the token lives, on a toy model: exact gradients (torch fp32).

    python -m benchmarks.experiments.gradient_geometry --model toy-768 --concepts pink-circle purple-ring

For each concept: per-draw gradients at the start (the generic word) and after a short gradient
textual inversion run, on the steps benchmark's stream of draws (benchmarks/zo_steps.py). Printed:
how far their mean sticks out of the per-draw noise, how many directions hold 90% / 99% of the
gradients' energy, and the share of it (and of the TI run's displacement) along the top-k
principal directions of the token table (what the ``guide_vocab`` lever assumes) and along the
top-k directions of the text encoder's response read at that token (``guide_encoder``, read as
the runtime reads it: forward differences through the int8 bundle's text encoder), and, after TI,
along the encoder's directions read at the start (what a reading that is never refreshed keeps).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
from pathlib import Path

import numpy as np

from benchmarks.common import header
from zoodip_edge.demo import parse_concept
from zoodip_edge.runtime.personalize import GUIDE_H, GUIDE_PROMPTS, TEMPLATES, Personalizer, Settings
from zoodip_edge.runtime.sensitivity import response_basis
from zoodip_edge.runtime.zo import vocabulary_basis
from zoodip_edge.toy import shipped_path, toy_model
from zoodip_edge.toy.world import GENERIC, concept_photos

KS = (8, 16, 64)


def share(v: np.ndarray, basis: np.ndarray) -> float:
    """Fraction of ``v``'s squared norm along the rows of ``basis``."""
    return float(np.sum((basis @ v) ** 2) / np.sum(v ** 2))


def describe(grads: np.ndarray) -> str:
    mean = grads.mean(axis=0)
    sticks_out = np.linalg.norm(mean) / np.sqrt(np.mean(np.sum(grads ** 2, axis=1)))
    energy = np.cumsum(np.linalg.svd(grads, compute_uv=False) ** 2)
    energy /= energy[-1]
    return (f"|mean| / rms = {sticks_out:.2f}; directions for 90% / 99% of the energy: "
            f"{int(np.searchsorted(energy, 0.9)) + 1} / {int(np.searchsorted(energy, 0.99)) + 1} of {len(grads)} draws")


def shares(label: str, grads: np.ndarray, bases: dict[int, np.ndarray], moved: np.ndarray | None = None) -> str:
    """Share of each draw's gradient (and of their mean, and of TI's displacement) along each basis."""
    mean = grads.mean(axis=0)
    return (f"    {label}: per draw " + ", ".join(f"k={k} {np.mean([share(g, b) for g in grads]):.2f}" for k, b in bases.items())
            + "; mean gradient " + ", ".join(f"{share(mean, b):.2f}" for b in bases.values())
            + ("" if moved is None else "; TI's displacement " + ", ".join(f"{share(moved, b):.2f}" for b in bases.values())))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="toy-768", choices=["toy-64", "toy-768"])
    ap.add_argument("--concepts", nargs="+", default=["pink-circle", "purple-ring"])
    ap.add_argument("--draws", type=int, default=48)
    ap.add_argument("--ti-steps", type=int, default=300)
    ap.add_argument("--ti-lr", type=float, default=2e-2)
    a = ap.parse_args()

    import torch

    from benchmarks.zo_steps import TorchLoss
    from zoodip_edge.profiles import resolve_profile

    torch.set_num_threads(1)
    profile = dataclasses.replace(resolve_profile("cpu"), intra_op_threads=1)
    toy = toy_model(a.model)
    bundle, model = shipped_path(toy.bundle), shipped_path(toy.model)
    print(header(sys.argv))
    with tempfile.TemporaryDirectory() as tmp:
        for concept in a.concepts:
            color, shape = parse_concept(concept, toy.world)
            photos = concept_photos(Path(tmp) / concept, color, shape, count=5, seed=0)
            p = Personalizer(bundle, photos, f"<{concept}>", GENERIC, settings=Settings(seed=0, search_init=False),
                             profile=profile)
            table = np.asarray(p.text.table, dtype=np.float64)
            ks = [k for k in KS if k < table.shape[1]]
            vocab = {k: vocabulary_basis(table, k) for k in ks}
            prompts = [c.replace("{}", p.token) for c in TEMPLATES[p.settings.templates][:GUIDE_PROMPTS]]

            def encoder(theta: np.ndarray) -> dict[int, np.ndarray]:
                basis = response_basis(p.conditions_of, prompts, theta, max(ks), GUIDE_H)
                return {k: basis[:k] for k in ks}
            loss_fn, opt = TorchLoss(model, p), p.optimizer

            def draw():
                plan = opt.propose()
                opt.update(plan, np.zeros(p.config.n + 1))  # advances the stream
                return plan

            def gradients(theta: np.ndarray) -> np.ndarray:
                out = []
                for _ in range(a.draws):
                    plan = draw()
                    x = torch.tensor(theta, requires_grad=True)
                    (g,) = torch.autograd.grad(loss_fn(x, plan.t, plan.noise_seed), x)
                    out.append(g.numpy())
                return np.array(out)

            print(f"\n{concept} ({table.shape[0]} tokens of {table.shape[1]} values)")
            start_grads, start_encoder = gradients(p.theta0), encoder(p.theta0)
            print(f"  at the start: {describe(start_grads)}")
            print(shares("the table's top-k", start_grads, vocab))
            print(shares("the encoder's top-k", start_grads, start_encoder))
            theta = torch.nn.Parameter(torch.tensor(p.theta0))
            adam = torch.optim.Adam([theta], lr=a.ti_lr)
            for _ in range(a.ti_steps):
                plan = draw()
                loss = loss_fn(theta, plan.t, plan.noise_seed)
                adam.zero_grad()
                loss.backward()
                adam.step()
            after = theta.detach().numpy()
            moved, grads = after - p.theta0, gradients(after)
            print(f"  after gradient TI, {a.ti_steps} steps (moved {np.linalg.norm(moved):.2f}): {describe(grads)}")
            print(shares("the table's top-k", grads, vocab, moved))
            print(shares("the encoder's top-k, read there", grads, encoder(after), moved))
            print(shares("the encoder's top-k, read at the start", grads, start_encoder, moved))


if __name__ == "__main__":
    main()
