#!/usr/bin/env bash
# Torch baselines of one personalize step on a GPU, on an SD1.5-architecture pipeline with random
# weights (weights change neither memory nor speed). Meant for a machine without network:
#
#     bash benchmarks/gpu_torch_baselines.sh        # from the repo root, with .whl/ next to it
#
# .whl/*.whl: diffusers and optimum-quanto (the machine has torch, transformers, safetensors, ...);
# .whl/fallback/*.whl: installed only if the machine lacks them (Pillow, requests & co., regex).
# Each baseline runs in its own process (benchmarks/torch_steps.py --device cuda):
#   zo fp32, zo fp16 (the paper's setting), quanto int8 weights + fp16 activations, grad fp32,
#   and, if time is left, quanto int8 weights + fp32 activations.
# Writes one JSON line per run to $OUT/gpu_torch.jsonl (failures too), the runs' stderr to
# $OUT/gpu_torch.log, and prints a markdown table. Env knobs: STEPS (10), WARMUP (2),
# BUDGET_S (300: every run starts and ends within this many seconds of the start; one with
# under 30 s left is skipped, none runs over 180 s), SD (/tmp/sd15, reused if built).
set -u -o pipefail
OUT=${OUT:-/tmp/out}
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-2}
BUDGET_S=${BUDGET_S:-300}
SD=${SD:-/tmp/sd15}
mkdir -p "$OUT"
JSONL=$OUT/gpu_torch.jsonl
LOG=$OUT/gpu_torch.log
: > "$JSONL"
: > "$LOG"
T0=$(date +%s)
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false

echo "== install carried wheels"
if python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl && export PYTHONPATH=/tmp/site:$PWD; then
  :
else
  echo "pip install failed: unpacking the wheels with zipfile instead (they are pure Python)"
  python3 -c 'import glob, zipfile; [zipfile.ZipFile(w).extractall("/tmp/site") for w in glob.glob(".whl/*.whl")]' || exit 1
  export PYTHONPATH=/tmp/site:$PWD
fi
fallback() {  # fallback MODULE WHEEL-GLOB...: install the wheels only if MODULE does not import
  local mod=$1; shift
  python3 -c "import $mod" 2>/dev/null && return 0
  echo "$mod missing: installing ${*} from .whl/fallback"
  local files=()
  for g in "$@"; do files+=(.whl/fallback/$g-*.whl); done
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site "${files[@]}" \
    || python3 -c 'import sys, zipfile; [zipfile.ZipFile(w).extractall("/tmp/site") for w in sys.argv[1:]]' "${files[@]}"
}
fallback PIL pillow
fallback requests requests urllib3 idna charset_normalizer certifi
fallback regex regex
echo "install: $(( $(date +%s) - T0 )) s"

echo "== machine"
nvidia-smi -L || true
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
python3 - <<'EOF' || { echo "imports failed: nothing can run"; exit 1; }
import importlib, platform, os
import torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, "
      f"cuDNN {torch.backends.cudnn.version()}), {os.cpu_count()} CPUs, GPU: "
      f"{torch.cuda.get_device_name(0) if torch.cuda.is_available() else 'none'}")
for name in ("transformers", "diffusers", "optimum.quanto", "huggingface_hub", "tokenizers", "safetensors",
             "accelerate", "numpy", "onnx", "PIL", "requests", "regex", "pynvml"):
    try:
        m = importlib.import_module(name)
        print(f"  {name} {getattr(m, '__version__', '?')} ({os.path.dirname(m.__file__)})")
    except Exception as e:  # report, the runs will say whether it mattered
        print(f"  {name}: NOT importable ({type(e).__name__}: {e})")
import diffusers  # noqa: F401  (every run needs it; quanto only the quanto runs)
EOF

echo "== build SD1.5-architecture pipeline (random weights) in $SD"
if [ -f "$SD/model_index.json" ]; then
  echo "exists, reused"
else
  python3 - "$SD" <<'EOF' || { echo '{"label": "build", "failed": true}' >> "$JSONL"; echo "build failed: nothing can run"; exit 1; }
import json, os, sys, time, traceback
from pathlib import Path
import torch
from zoodip_edge.export.tiny import build_sd15_architecture
t = time.perf_counter()
try:
    build_sd15_architecture(Path(sys.argv[1]))
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
    build_sd15_architecture(Path(sys.argv[1]))
print(f"built in {time.perf_counter() - t:.1f} s (torch threads {torch.get_num_threads()})")
EOF
  du -sh "$SD"
fi
echo "setup total: $(( $(date +%s) - T0 )) s"

run() {  # run LABEL ARGS...: one torch_steps.py process; appends one JSON line (result or failure)
  local label=$1; shift
  local left=$(( BUDGET_S - ($(date +%s) - T0) ))
  if (( left < 30 )); then
    echo "skip $label: time budget spent"
    python3 -c 'import json, sys; print(json.dumps({"label": sys.argv[1], "skipped": "time budget spent"}))' "$label" >> "$JSONL"
    return
  fi
  local limit=$(( left < 180 ? left : 180 ))
  echo "== $label (timeout ${limit} s): torch_steps.py $SD --device cuda --steps $STEPS --warmup $WARMUP $*"
  local t=$(date +%s.%N)
  timeout "$limit" python3 benchmarks/torch_steps.py "$SD" --device cuda --steps "$STEPS" --warmup "$WARMUP" "$@" \
    > "$OUT/run.out" 2> "$OUT/run.err"
  local rc=$?
  local wall; wall=$(python3 -c "import sys; print(round($(date +%s.%N) - $t, 1))")
  { echo "---- $label (rc $rc)"; cat "$OUT/run.err"; } >> "$LOG"
  python3 - "$label" "$rc" "$wall" "$OUT/run.out" "$OUT/run.err" "$*" >> "$JSONL" <<'EOF'
import json, sys
label, rc, wall, out, err, args = sys.argv[1:]
lines = [x for x in open(out).read().splitlines() if x.startswith("{")]
res = {"label": label, "args": args, "rc": int(rc), "wall_s": float(wall)}
if int(rc) == 0 and lines:
    res.update(json.loads(lines[-1]))
else:
    res["failed"] = True
    res["stderr_tail"] = open(err, errors="replace").read()[-1500:]
    if int(rc) == 124:
        res["stderr_tail"] += "\n[killed by timeout]"
print(json.dumps(res))
EOF
  tail -1 "$JSONL"
}

run "zo fp32" --mode zo --n 2 --dtype fp32
run "zo fp16 (paper)" --mode zo --n 2 --dtype fp16
run "quanto int8 w + fp16 act" --mode quanto --n 2 --dtype fp16
run "grad fp32" --mode grad --dtype fp32
run "quanto int8 w + fp32 act" --mode quanto --n 2 --dtype fp32

echo "== results ($JSONL), total $(( $(date +%s) - T0 )) s"
python3 - "$JSONL" <<'EOF'
import json, sys
rows = [json.loads(x) for x in open(sys.argv[1]) if x.strip()]
ok = [r for r in rows if "s_per_step" in r]
if ok:
    r0 = ok[0]
    print(f"\n{r0.get('device_name')}, torch {r0.get('torch')} (CUDA {r0.get('cuda')}); SD1.5 architecture, random weights, "
          f"512 px (64x64 latents); s/step = median of {r0['steps']} steps after {r0['warmup']} warm-up; "
          "peak CUDA MB during the steps (weights included); nvml = process memory as nvidia-smi sees it.\n")
f = lambda v, d=0: "-" if v is None else f"{v:.{d}f}"
print("| run | n | setup s | first step s | s/step (median) | peak CUDA allocated MB | peak CUDA reserved MB | "
      "weights on GPU MB | nvml MB | peak RSS MB | losses finite |")
print("|---|---|---|---|---|---|---|---|---|---|---|")
for r in rows:
    if "s_per_step" not in r:
        why = r.get("skipped") or (r.get("stderr_tail", "").strip().splitlines() or ["?"])[-1]
        print(f"| {r['label']} | failed or skipped: {why[:200]} |||||||||")
        continue
    print(f"| {r['label']} | {r['n'] if r['mode'] != 'grad' else 1} | {f(r['setup_s'], 1)} | {f(r['first_step_s'], 3)} | "
          f"{f(r['s_per_step'], 4)} | {f(r.get('peak_cuda_allocated_mb'))} | {f(r.get('peak_cuda_reserved_mb'))} | "
          f"{f(r.get('weights_cuda_allocated_mb'))} | {f(r.get('nvml_used_mb'))} | {f(r['peak_rss_mb'])} | {r['losses_finite']} |")
for r in rows:
    if "quanto_cuda_extension" in r:
        print(f"\n{r['label']}: quanto CUDA extension {r['quanto_cuda_extension']}", end="")
    if r.get("nvml_source") not in (None, "process"):
        print(f"\n{r['label']}: nvml source {r.get('nvml_source')}", end="")
print()
EOF
