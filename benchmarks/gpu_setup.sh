# Sourced by the GPU scripts (from the repo root) on a GPU machine without network:
# packages travel as files under .whl/ (ignored by git; see docs/performance.md, "GPU details"):
#   .whl/py/*.whl        pure-Python wheels the machine lacks (diffusers, optimum-quanto)
#   .whl/ort.NN + .whl/ort.sha256   onnxruntime-gpu as a split tar.xz of its installed files (its
#                        wheel is 255 MB, over the 64 MiB a call carries, so it travels over several calls)
# Preparing them here (2026-11-27: onnxruntime-gpu 1.31.1 is a CUDA 13 build, as the image is):
#   pip download --no-deps --only-binary=:all: --python-version 3.12 --platform manylinux_2_28_x86_64 \
#       -d .whl/py diffusers==0.42.1 optimum-quanto==0.2.7
#   pip download --no-deps ... -d /tmp/ortgpu onnxruntime-gpu==1.31.1 && cd /tmp/ortgpu && unzip -q *.whl -d x \
#       && tar -C x -cf - . | xz -T2 -7 > ort.tar.xz      # 255 MB wheel -> 204 MB
#   split ort.tar.xz into .whl/ort.00 (44 MiB) and .whl/ort.01-03 (50 MiB each), `sha256sum ort.tar.xz > .whl/ort.sha256`
#   (a call carries 64 MiB with the ~12 MiB checkout: the first call also carries .whl/py and the sha).
# Defines: OUT, SD, T0, PYTHONPATH, and the functions below.
OUT=${OUT:-/tmp/out}
SD=${SD:-/tmp/sd15}
T0=${T0:-$(date +%s)}
mkdir -p "$OUT"
export HF_HUB_OFFLINE=1 HF_HUB_DISABLE_TELEMETRY=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
export PYTHONPATH=/tmp/site:$PWD

elapsed() { echo $(( $(date +%s) - T0 )); }

# run_recorded LABEL TIMEOUT JSONL CMD...: run CMD under a timeout; append one JSON line to JSONL, the
# command's last JSON line plus label, rc, wall time and the command (or, failed, its stderr's tail);
# append the stderr to $OUT/<JSONL's name>.log. Both GPU scripts record every row this way.
run_recorded() {
  local label=$1 limit=$2 jsonl=$3; shift 3
  local t; t=$(date +%s.%N)
  timeout "$limit" "$@" > "$OUT/run.out" 2> "$OUT/run.err"
  local rc=$?
  { echo "---- $label (rc $rc)"; tail -40 "$OUT/run.err"; } >> "${jsonl%.jsonl}.log"
  python3 - "$label" "$rc" "$t" "$*" "$OUT/run.out" "$OUT/run.err" >> "$jsonl" <<'PY'
import json, sys, time
label, rc, t, cmd, out, err = sys.argv[1:]
lines = [x for x in open(out).read().splitlines() if x.startswith("{")]
res = {"label": label, "cmd": cmd, "rc": int(rc), "wall_s": round(time.time() - float(t), 1)}
if int(rc) == 0 and lines:
    res.update(json.loads(lines[-1]))
else:
    res["failed"] = True
    res["stderr_tail"] = open(err, errors="replace").read()[-1500:] + ("\n[killed by timeout]" if int(rc) == 124 else "")
print(json.dumps(res))
PY
  tail -1 "$jsonl"
}

install_py_wheels() {  # once per machine
  [ -f /tmp/site/.installed ] && return 0
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/py/*.whl \
    || python3 -c 'import glob, zipfile; [zipfile.ZipFile(w).extractall("/tmp/site") for w in glob.glob(".whl/py/*.whl")]' \
    || return 1
  touch /tmp/site/.installed
}

keep_ort_parts() {  # this call's onnxruntime-gpu parts, gathered outside the checkout copy
  mkdir -p /tmp/ortparts && cp .whl/ort.* /tmp/ortparts/ 2>/dev/null
  echo "onnxruntime-gpu parts so far: $(cd /tmp/ortparts && ls ort.[0-9]* 2>/dev/null | tr '\n' ' ')"
}

install_ort_gpu() {  # into the interpreter's own site-packages, next to its nvidia-* CUDA packages
  [ "${SKIP_ORT_GPU:-0}" = 1 ] && { echo "SKIP_ORT_GPU=1: onnxruntime left as it is (rehearsal)"; return 0; }
  python3 -c 'import onnxruntime as o, sys; sys.exit("CUDAExecutionProvider" not in o.get_available_providers())' 2>/dev/null \
    && return 0
  keep_ort_parts
  cat /tmp/ortparts/ort.[0-9]* > /tmp/ort.tar.xz
  if [ "$(sha256sum /tmp/ort.tar.xz | cut -d' ' -f1)" != "$(cut -d' ' -f1 /tmp/ortparts/ort.sha256)" ]; then
    echo "onnxruntime-gpu: parts incomplete or corrupt (sha256 differs)"; return 1
  fi
  local site
  site=$(python3 -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')
  python3 -m pip uninstall -y -q onnxruntime 2>/dev/null
  tar -xJf /tmp/ort.tar.xz -C "$site" || return 1
  python3 -c 'import onnxruntime as o; print("onnxruntime", o.__version__, o.get_available_providers())'
}

build_sd15() {
  if [ -f "$SD/model_index.json" ]; then echo "$SD exists, reused"; return 0; fi
  python3 benchmarks/build_sd15.py "$SD" && du -sh "$SD"
}

machine_report() {
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader || true
  python3 - <<'PY'
import importlib, os, platform
import torch
print(f"python {platform.python_version()}, torch {torch.__version__} (CUDA {torch.version.cuda}, cuDNN "
      f"{torch.backends.cudnn.version()}), {os.cpu_count()} CPUs")
for name in ("onnxruntime", "onnx", "onnxscript", "onnx_ir", "transformers", "diffusers", "optimum.quanto", "numpy",
             "tokenizers", "safetensors", "typer", "PIL", "pynvml"):
    try:
        m = importlib.import_module(name)
        print(f"  {name} {getattr(m, '__version__', '?')}")
    except Exception as e:  # noqa: BLE001 - report; the runs say whether it mattered
        print(f"  {name}: NOT importable ({type(e).__name__}: {e})")
PY
}
