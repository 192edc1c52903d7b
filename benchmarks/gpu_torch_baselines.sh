#!/usr/bin/env bash
# Torch baselines of one personalize step on a GPU, on an SD1.5-architecture pipeline with random
# weights (weights change neither memory nor speed). Meant for a machine without network:
#
#     bash benchmarks/gpu_torch_baselines.sh        # from the repo root, with .whl/py/ next to it
#
# .whl/py/*.whl: diffusers and optimum-quanto (the machine has torch, transformers, safetensors, ...);
# set-up shared with gpu_cuda_ep.sh in gpu_setup.sh.
# Each baseline runs in its own process (benchmarks/torch_steps.py --device cuda):
#   zo fp32, zo fp16 (the paper's setting), quanto int8 weights + fp16 activations, grad fp32,
#   and, if time is left, quanto int8 weights + fp32 activations.
# Writes one JSON line per run to $OUT/gpu_torch.jsonl (failures too), the runs' stderr to
# $OUT/gpu_torch.log, and prints a markdown table. Env knobs: STEPS (10), WARMUP (2),
# BUDGET_S (300: every run starts and ends within this many seconds of the start; one with
# under 30 s left is skipped, none runs over 180 s), SD (/tmp/sd15, reused if built).
set -u -o pipefail
STEPS=${STEPS:-10}
WARMUP=${WARMUP:-2}
BUDGET_S=${BUDGET_S:-300}
source benchmarks/gpu_setup.sh
JSONL=$OUT/gpu_torch.jsonl
: > "$JSONL"
: > "$OUT/gpu_torch.log"

echo "== install carried wheels"
install_py_wheels || { echo "wheel install failed: nothing can run"; exit 1; }
echo "install: $(elapsed) s"
echo "== machine"
machine_report
echo "== build SD1.5-architecture pipeline (random weights) in $SD"
build_sd15 || { echo '{"label": "build", "failed": true}' >> "$JSONL"; echo "build failed: nothing can run"; exit 1; }
echo "setup total: $(elapsed) s"

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
  run_recorded "$label" "$limit" "$JSONL" python3 benchmarks/torch_steps.py "$SD" --device cuda --steps "$STEPS" --warmup "$WARMUP" "$@"
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
