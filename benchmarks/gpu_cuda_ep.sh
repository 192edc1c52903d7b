#!/usr/bin/env bash
# zoodip-edge's CUDA EP path on a GPU machine without network, next to the torch baselines, in
# phases that fit separate remote calls (onnxruntime-gpu arrives in parts over several calls; see gpu_setup.sh):
#
#   bash benchmarks/gpu_cuda_ep.sh start     # wheels, SD1.5-architecture pipeline (random weights),
#                                            # then `zoodip-edge export --recipe int8-gpu` in the background
#   bash benchmarks/gpu_cuda_ep.sh torchfid  # the gate's measurement in torch (gpu_zo_fidelity.py)
#   bash benchmarks/gpu_cuda_ep.sh parts     # only gathers this call's onnxruntime-gpu part
#   bash benchmarks/gpu_cuda_ep.sh measure   # installs onnxruntime-gpu, waits for the export, then:
#       does CUDA EP start without/with preload_dlls; personalize steps on CUDA EP (cuda profile,
#       batched; cuda-lowvram, one by one); torch fp32 ZO and torch + quanto fp16 ZO (the paper)
#       in the same call; the ZO fidelity gate on CUDA EP (fidelity_by_mu.py --profile cuda).
#   bash benchmarks/gpu_cuda_ep.sh variants  # after the parts (waits for the exports), same machine: profile variants not yet
#       measured (cuda one by one, cuda-lowvram with resident sessions) and, with EXPORT_FP16=1 at
#       start (an fp16 bundle exported after the int8-gpu one), the fp16 recipe on the cuda profile.
# Every phase gathers the parts it carries. Results: $OUT/*.jsonl, *.txt, *.log.
set -u -o pipefail
source benchmarks/gpu_setup.sh
PHASE=${1:?phase: start, torchfid, parts, measure or variants}
BUNDLE=${BUNDLE:-/tmp/sd15-int8-gpu}
keep_ort_parts

export_status() {
  local x
  for x in export export-fp16; do
    [ -f /tmp/$x.log ] || continue
    if [ -f /tmp/$x.rc ]; then echo "$x finished, rc $(cat /tmp/$x.rc), $(cat /tmp/$x.wall) s"; else echo "$x running"; fi
    tail -3 /tmp/$x.log
  done
}

one() {  # one LABEL TIMEOUT CMD...: a benchmark process; its last JSON line (or the failure) to $OUT/cuda_ep.jsonl
  local label=$1 limit=$2; shift 2
  echo "== $label ($(elapsed) s; timeout $limit s): $*"
  run_recorded "$label" "$limit" "$OUT/cuda_ep.jsonl" "$@"
}

# the rows every measuring phase takes as its baselines
row_ours_batched() { one "zoodip-edge int8-gpu, cuda profile, batched" 120 python3 benchmarks/personalize_steps.py "$BUNDLE" --profile cuda --profile-levers --batched --warmup 2 --steps 10; }
row_paper() { one "torch + quanto int8 w, fp16 act (paper)" 90 python3 benchmarks/torch_steps.py "$SD" --device cuda --mode quanto --n 2 --dtype fp16 --warmup 2 --steps 10; }

case "$PHASE" in
start)
  install_py_wheels || { echo "wheel install failed"; exit 1; }
  machine_report
  build_sd15 || exit 1
  rm -f /tmp/export.rc /tmp/export-fp16.rc
  # setsid: runs on between calls (the device tool ends a call's other processes when it returns).
  # With EXPORT_FP16=1 the fp16 bundle is exported at the same time (16 cores; each export's peak
  # is ~13 GB of the 128), so that both are ready within one call's wait.
  setsid nohup bash -c "t=\$(date +%s); python3 -m zoodip_edge.cli export $SD --out $BUNDLE --recipe int8-gpu --force \
      > /tmp/export.log 2>&1; echo \$? > /tmp/export.rc.tmp; echo \$(( \$(date +%s) - t )) > /tmp/export.wall; \
      mv /tmp/export.rc.tmp /tmp/export.rc" > /dev/null 2>&1 < /dev/null &
  if [ "${EXPORT_FP16:-0}" = 1 ]; then
    setsid nohup bash -c "t=\$(date +%s); python3 -m zoodip_edge.cli export $SD --out /tmp/sd15-fp16 --recipe fp16 --force \
        > /tmp/export-fp16.log 2>&1; echo \$? > /tmp/export-fp16.rc.tmp; echo \$(( \$(date +%s) - t )) > /tmp/export-fp16.wall; \
        mv /tmp/export-fp16.rc.tmp /tmp/export-fp16.rc" > /dev/null 2>&1 < /dev/null &
  fi
  sleep 5; export_status
  ;;
torchfid)
  install_py_wheels && build_sd15 || exit 1
  timeout "${FID_TIMEOUT:-240}" python3 benchmarks/gpu_zo_fidelity.py "$SD" 2> "$OUT/gpu_zo_fidelity.log" | tee "$OUT/gpu_zo_fidelity.txt"
  export_status
  ;;
parts)
  export_status
  ;;
measure)
  install_py_wheels || exit 1
  for _ in $(seq "${EXPORT_WAIT:-60}"); do [ -f /tmp/export.rc ] && break; sleep 5; done
  export_status; cp /tmp/export.log "$OUT/export.log" 2>/dev/null
  [ "$(cat /tmp/export.rc 2>/dev/null)" = 0 ] || { echo "no bundle: export not finished or failed"; exit 1; }
  python3 -c "import json; v = json.load(open('$BUNDLE/manifest.json'))['verification']; print('gates (CPU EP, at export):', json.dumps(v['zo_fidelity']))"
  install_ort_gpu || exit 1
  echo "== does CUDA EP start in a process without torch: plain onnxruntime, then zoodip-edge's create_session (preload_dlls)"
  python3 - "$BUNDLE" <<'PY' 2>&1 | tail -3
import json, sys, onnxruntime as ort
path = f"{sys.argv[1]}/" + json.load(open(f"{sys.argv[1]}/manifest.json"))["components"]["text_encoder"]["path"]
s = ort.InferenceSession(path, providers=["CUDAExecutionProvider", "CPUExecutionProvider"])
print("plain onnxruntime, no preload:", s.get_providers())
PY
  python3 - "$BUNDLE" <<'PY' 2>&1 | tail -3
import sys
from zoodip_edge.bundle import load_bundle
from zoodip_edge.profiles import resolve_profile
from zoodip_edge.runtime.sessions import create_session, preload_gpu_libraries
b = load_bundle(sys.argv[1], verify=False)
s = create_session(b.path("text_encoder"), resolve_profile("cuda"), b.manifest["session"]["config_entries"], warn=print)
print("zoodip-edge create_session:", s.get_providers(), "preload notes:", preload_gpu_libraries())
PY
  row_ours_batched
  one "torch fp32 forward-only ZO" 90 python3 benchmarks/torch_steps.py "$SD" --device cuda --mode zo --n 2 --dtype fp32 --warmup 2 --steps 10
  row_paper
  echo "== ZO fidelity gate on CUDA EP ($(elapsed) s)"
  timeout 150 python3 benchmarks/fidelity_by_mu.py "$SD" "$BUNDLE" --profile cuda --mu 1e-3,1e-2 2> "$OUT/fidelity_cuda.log" | tee "$OUT/fidelity_cuda.txt"
  one "zoodip-edge int8-gpu, cuda-lowvram profile, one by one" 90 python3 benchmarks/personalize_steps.py "$BUNDLE" --profile cuda-lowvram --profile-levers --sequential --warmup 1 --steps 3
  echo "measure done ($(elapsed) s)"
  ;;
variants)
  install_ort_gpu || exit 1
  for _ in $(seq "${EXPORT_WAIT:-60}"); do
    [ -f /tmp/export.rc ] && { [ ! -f /tmp/export-fp16.log ] || [ -f /tmp/export-fp16.rc ]; } && break; sleep 5
  done
  export_status; cp /tmp/export.log "$OUT/export.log" 2>/dev/null; cp /tmp/export-fp16.log "$OUT/export-fp16.log" 2>/dev/null
  sed -e 's/^batch_perturbations = true/batch_perturbations = false/' -e 's/^name = "cuda"/name = "cuda-one-by-one"/' \
    devices/cuda.toml > /tmp/cuda-seq.toml
  sed -e 's/^resident_sessions = false/resident_sessions = true/' -e 's/^name = "cuda-lowvram"/name = "cuda-lowvram-resident"/' \
    devices/cuda-lowvram.toml > /tmp/lowvram-resident.toml
  # the same call's baselines for the rows below
  row_ours_batched
  row_paper
  if [ "${FP16_ONLY:-0}" != 1 ]; then  # FP16_ONLY=1: only the baselines and the fp16 rows (measured int8 variants once)
    one "zoodip-edge int8-gpu, cuda profile, one by one" 120 python3 benchmarks/personalize_steps.py "$BUNDLE" --profile /tmp/cuda-seq.toml --profile-levers --sequential --warmup 2 --steps 10
    one "zoodip-edge int8-gpu, cuda-lowvram, resident sessions" 120 python3 benchmarks/personalize_steps.py "$BUNDLE" --profile /tmp/lowvram-resident.toml --profile-levers --sequential --warmup 2 --steps 10
  fi
  if [ -f /tmp/sd15-fp16/manifest.json ]; then
    one "zoodip-edge fp16, cuda profile, batched" 120 python3 benchmarks/personalize_steps.py /tmp/sd15-fp16 --profile cuda --profile-levers --batched --warmup 2 --steps 10
    timeout 150 python3 benchmarks/fidelity_by_mu.py "$SD" /tmp/sd15-fp16 --profile cuda --mu 1e-3 2>/dev/null | tee "$OUT/fidelity_cuda_fp16.txt"
  else
    echo "no /tmp/sd15-fp16 (start with EXPORT_FP16=1; or its export has not finished): fp16 rows skipped"
  fi
  ;;
*) echo "unknown phase $PHASE"; exit 2 ;;
esac
