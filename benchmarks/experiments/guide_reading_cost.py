"""What one ``guide_encoder`` reading costs on a toy model, against a training step, and what its
d x d Gram matrix costs in float32 (the runtime's) against float64 column blocks (0.12.0's).

    python -m benchmarks.experiments.guide_reading_cost --model toy-768 --threads 1

Prints, from one process: the time of the reading's text-encoder passes, of each Gram form on the
same Jacobians, of a whole reading and of a training step, and how far apart the two forms' top-k
directions are (the smallest cosine between the subspaces' principal angles).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from benchmarks.common import header
from zoodip_edge.demo import parse_concept
from zoodip_edge.runtime.personalize import GUIDE_H, GUIDE_PROMPTS, TEMPLATES, Personalizer, Settings
from zoodip_edge.runtime.sensitivity import response_jacobian, top_directions
from zoodip_edge.toy import shipped_path, toy_model
from zoodip_edge.toy.world import GENERIC, concept_photos


def gram_float64_blocks(jac: np.ndarray) -> np.ndarray:
    gram = np.zeros((jac.shape[0],) * 2)
    for a in range(0, jac.shape[1], 8192):
        block = jac[:, a:a + 8192].astype(np.float64)
        gram += block @ block.T
    return gram


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="toy-768", choices=["toy-64", "toy-768"])
    ap.add_argument("--concept", default="pink-circle")
    ap.add_argument("--k", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--steps", type=int, default=50, help="training steps timed")
    a = ap.parse_args()

    from zoodip_edge.profiles import resolve_profile

    profile = dataclasses.replace(resolve_profile("cpu"), intra_op_threads=a.threads)
    toy = toy_model(a.model)
    print(header(sys.argv))
    with tempfile.TemporaryDirectory() as tmp:
        color, shape = parse_concept(a.concept, toy.world)
        photos = concept_photos(Path(tmp) / a.concept, color, shape, count=5, seed=0)
        p = Personalizer(shipped_path(toy.bundle), photos, f"<{a.concept}>", GENERIC, profile=profile,
                         settings=Settings(guide_encoder=a.k, guide_alpha=0.1, search_init=False, batch_perturbations=True))
        prompts = [c.replace("{}", p.token) for c in TEMPLATES[p.settings.templates][:GUIDE_PROMPTS]]
        t0 = time.perf_counter()
        jacs = [response_jacobian(lambda th, q=q: p.conditions_of(q, th), p.theta, GUIDE_H) for q in prompts]
        passes = time.perf_counter() - t0
        timed = {}
        for name, form in (("float64 column blocks", gram_float64_blocks),
                           ("float32 product", lambda j: (j @ j.T).astype(np.float64))):
            t0 = time.perf_counter()
            grams = [form(j) for j in jacs]
            timed[name] = (time.perf_counter() - t0, top_directions(sum(grams), a.k))
        (t64, b64), (t32, b32) = timed.values()
        cosines = np.linalg.svd(b64 @ b32.T, compute_uv=False)
        p.read_guide()  # warm
        t0 = time.perf_counter()
        p.read_guide()
        reading = time.perf_counter() - t0
        p.step()
        t0 = time.perf_counter()
        for _ in range(a.steps):
            p.step()
        step = (time.perf_counter() - t0) / a.steps
    print(f"{a.model}, {len(prompts)} prompts, d = {p.theta.size}, k = {a.k}, {a.threads} thread(s)")
    print(f"  encoder passes: {passes:.2f} s ({len(prompts) * (p.theta.size + 1)} rows)")
    print(f"  Gram, float64 column blocks: {t64:.2f} s; float32 product: {t32:.2f} s ({t64 / t32:.1f}x)")
    print(f"  top-{a.k} subspaces of the two forms: smallest principal cosine {cosines.min():.8f}")
    print(f"  a whole reading (runtime): {reading:.2f} s; a training step: {step * 1e3:.1f} ms; "
          f"a reading = {reading / step:.0f} steps")


if __name__ == "__main__":
    main()
