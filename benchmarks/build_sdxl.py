"""Save an SDXL-base-architecture pipeline with random weights (weights change neither memory nor speed).

    python -m benchmarks.build_sdxl OUT

The pipeline the SDXL export and personalize benchmarks run on, on a machine without network or
model hub. About 14 GB on disk; building peaks near the U-Net's 10 GB.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import torch

from zoodip_edge.export.tiny import build_sdxl_architecture

if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
    sys.exit(__doc__)
t = time.perf_counter()
build_sdxl_architecture(Path(sys.argv[1]))
print(f"built {sys.argv[1]} in {time.perf_counter() - t:.1f} s (torch threads {torch.get_num_threads()})")
