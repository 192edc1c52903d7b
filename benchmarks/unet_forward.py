"""One process: load a bundle's U-Net on CPU EP, time forwards at a batch size, print JSON.

    python benchmarks/unet_forward.py BUNDLE --batch 1 --repeat 2
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).parent))
from common import peak_rss_mb  # noqa: E402

from zoodip_edge.bundle import load_bundle  # noqa: E402
from zoodip_edge.profiles import resolve_profile  # noqa: E402
from zoodip_edge.runtime.sessions import create_session  # noqa: E402

ap = argparse.ArgumentParser()
ap.add_argument("bundle")
ap.add_argument("--batch", type=int, default=1)
ap.add_argument("--repeat", type=int, default=2)
a = ap.parse_args()
b = load_bundle(a.bundle, verify=False)
m = b.manifest
t0 = time.perf_counter()
sess = create_session(b.path("unet"), resolve_profile("cpu"), m["session"]["config_entries"])
load_s = time.perf_counter() - t0
rss_after_load = peak_rss_mb()
h, d = m["latent_size"], m["components"]["unet"]["inputs"][2]["shape"][2]
rng = np.random.default_rng(0)
feed = {"sample": rng.standard_normal((a.batch, 4, h, h), dtype=np.float32),
        "timestep": np.full((a.batch,), 700, np.float32),
        "encoder_hidden_states": rng.standard_normal((a.batch, 77, d), dtype=np.float32)}
sess.run(None, feed)  # warm-up (first run allocates and prepacks)
times = []
for _ in range(a.repeat):
    t = time.perf_counter()
    sess.run(None, feed)
    times.append(time.perf_counter() - t)
print(json.dumps({"batch": a.batch, "load_s": load_s, "s_per_forward": float(np.median(times)),
                  "rss_after_load_mb": rss_after_load, "peak_rss_mb": peak_rss_mb()}))
