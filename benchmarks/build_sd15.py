"""Save an SD1.5-architecture pipeline with random weights (weights change neither memory nor speed).

    python -m benchmarks.build_sd15 OUT

The pipeline the side-by-side and fidelity benchmarks run on, on a machine without network or model hub.
"""

from __future__ import annotations

import json
import os
import sys
import time
import traceback
from pathlib import Path

import torch

from zoodip_edge.export.tiny import build_sd15_architecture

if len(sys.argv) != 2 or sys.argv[1].startswith("-"):
    sys.exit(__doc__)
out = Path(sys.argv[1])
t = time.perf_counter()
try:
    build_sd15_architecture(out)
except Exception:
    # Only known way this could differ between transformers versions: CLIPTokenizer taking the
    # vocab.json / merges.txt paths. Retry once with the files read into a dict and a merge list.
    traceback.print_exc()
    print("retrying with CLIPTokenizer(vocab=dict, merges=list)")
    import transformers

    orig = transformers.CLIPTokenizer

    def tok(vocab, merges, **kw):
        if isinstance(vocab, str) and os.path.isfile(vocab):
            vocab = json.loads(Path(vocab).read_text(encoding="utf-8"))
        if isinstance(merges, str) and os.path.isfile(merges):
            merges = [tuple(x.split()) for x in Path(merges).read_text(encoding="utf-8").splitlines()[1:] if x.strip()]
        return orig(vocab=vocab, merges=merges, **kw)

    transformers.CLIPTokenizer = tok
    build_sd15_architecture(out)
print(f"built {out} in {time.perf_counter() - t:.1f} s (torch threads {torch.get_num_threads()})")
