#!/usr/bin/env bash
# make gpu-check: the one-command GPU proof, inside 8 minutes. On the GPU machine (docs/gpu-check.md):
#   1. wheels: reassemble onnxruntime-gpu from its parts (if carried there) and install every wheel
#      found in $WHEELS into /tmp/site, with no network; CUDA and cuDNN come from the nvidia-*
#      wheels already installed beside torch (LD_LIBRARY_PATH, as the Dockerfile's gpu stage).
#   2. the CUDA provider must be there and must initialise, else say so and exit 3 (or 4).
#   3. models: the digits demo and its fp16 variant (trained on the GPU), a random 224x224 ResNet-50.
#   4. pytest -m gpu, then python -m benchmarks.gpu: benchmarks/results/gpu-<device>.{json,md,png}
#      and gpu-tests.log, copied to $OUT too where the device tool sets it.
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
PARTS=${PARTS:-/tmp/whl}  # where the calls before this one left the parts of onnxruntime-gpu
WHEELS=${WHEELS:-.whl/small $PARTS}
SITE=${SITE:-/tmp/site}
MODELS=${MODELS:-artifacts/gpu}
RESULTS=benchmarks/results
say() { echo "gpu-check: $*" >&2; }

# 1. wheels
for dir in $WHEELS; do
  [ -f "$dir/onnxruntime-gpu.sha256" ] || continue
  sums=$(realpath "$dir/onnxruntime-gpu.sha256")
  wheel=$(awk '{print $2}' "$sums")
  mkdir -p "$PARTS"
  if [ ! -f "$PARTS/$wheel" ]; then
    # Earlier calls carried one part each into $PARTS; a local run finds them in .whl/parts.
    # find fails on a folder that is not there (.whl/parts off the machine that downloaded them).
    parts=$({ find "$PARTS" .whl/parts -name "$wheel.part-*" 2>/dev/null || true; } |
      awk -F/ '{print $NF "\t" $0}' | sort | awk -F'\t' '!seen[$1]++ {print $2}')
    [ -n "$parts" ] || { say "$wheel: no parts in $PARTS (carry .whl/parts/N there first)"; exit 2; }
    # shellcheck disable=SC2086  # one path per part, no spaces
    cat $parts >"$PARTS/$wheel"
  fi
  (cd "$PARTS" && sha256sum --quiet --check "$sums") ||
    { say "$wheel: checksum mismatch after reassembly (a part missing?)"; rm -f "$PARTS/$wheel"; exit 2; }
done
wheels=$(find $WHEELS -maxdepth 1 -name '*.whl' 2>/dev/null | sort -u || true)
if [ -n "$wheels" ]; then
  say "installing $(echo "$wheels" | wc -l) wheels into $SITE"
  # shellcheck disable=SC2086
  "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target "$SITE" $wheels
  export PYTHONPATH="$SITE:$PWD${PYTHONPATH:+:$PYTHONPATH}"
else
  export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
fi
nvidia_libs=$("$PYTHON" -c '
import glob, os, sys
dirs = {d for p in sys.path if p for d in glob.glob(os.path.join(p, "nvidia", "**", "lib"), recursive=True)}
print(":".join(sorted(dirs)))')
export LD_LIBRARY_PATH="${nvidia_libs}${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

# 2. the CUDA provider
"$PYTHON" - <<'PY' || exit $?
import sys, tempfile
from pathlib import Path
import onnxruntime as ort
cuda = "CUDAExecutionProvider"
have = ort.get_available_providers()
if cuda not in have:
    print(f"gpu-check: no {cuda} in onnxruntime {ort.__version__} at {ort.__file__} (have {have}): "
          "carry onnxruntime-gpu (make gpu-wheels; docs/gpu-check.md)", file=sys.stderr)
    sys.exit(3)
from tests.helpers.models import build_model
with tempfile.TemporaryDirectory() as tmp:
    session = ort.InferenceSession(str(build_model(Path(tmp) / "t.onnx")), providers=[cuda])
if session.get_providers()[0] != cuda:
    print(f"gpu-check: {cuda} failed to initialise (driver? CUDA/cuDNN libraries?)", file=sys.stderr)
    sys.exit(4)
print(f"gpu-check: onnxruntime {ort.__version__} with {have}", file=sys.stderr)
PY

# 3. models
mkdir -p "$MODELS" "$RESULTS"
timeout 150 "$PYTHON" -m model build --out "$MODELS/model.onnx" --also fp16
bench="$MODELS/resnet50-random-fp32.onnx"
if [ ! -f "$bench" ]; then
  "$PYTHON" -c "import torch; from model.resnet import resnet50; torch.save(resnet50().state_dict(), '$MODELS/resnet50-random.pth')"
  timeout 120 "$PYTHON" -m model export "$MODELS/resnet50-random.pth" --out "$bench"
fi

# 4. tests, then the benchmark
set +e
RESNET_GPU_TEST_MODEL="$MODELS/model.onnx" timeout 150 "$PYTHON" -m pytest -m gpu tests/integration/test_gpu.py \
  -p no:cacheprovider -W default::DeprecationWarning -q 2>&1 | tee "$RESULTS/gpu-tests.log"
tests=${PIPESTATUS[0]}
timeout 240 "$PYTHON" -m benchmarks.gpu --model "$bench"
bench_rc=$?
set -e
if [ -n "${OUT:-}" ]; then
  cp "$RESULTS"/gpu-* "$OUT"/ 2>/dev/null || true
fi
say "gpu tests exit $tests, benchmark exit $bench_rc"
[ "$tests" = 0 ] && [ "$bench_rc" = 0 ]
