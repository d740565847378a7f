#!/usr/bin/env bash
# make gpu-wheels: every wheel the GPU machine lacks, for CPython 3.12 on manylinux x86_64, at the
# versions of requirements/serve-gpu.txt, into .whl/ (git-ignored). That machine has Python 3.12
# with torch (CUDA 13, and the nvidia-* CUDA/cuDNN wheels), numpy, Pillow, onnx, onnxruntime (CPU),
# prometheus-client, uvloop, httpx, aiohttp, psutil and pytest, and reaches no registry.
#   .whl/small/          the small wheels, carried in the gpu-check call itself
#   .whl/parts/N/        onnxruntime-gpu (~255 MB) in pieces under one call's 64 MiB carry limit,
#                        each carried by its own call into /tmp/whl (docs/gpu-check.md)
#   .whl/small/onnxruntime-gpu.sha256   the whole wheel's name and checksum, for the reassembly
# SKIP_BIG=1 fetches the small wheels only.
set -euo pipefail
cd "$(dirname "$0")/../.."

PYTHON=${PYTHON:-python3}
PART_SIZE=${PART_SIZE:-56m}
SMALL=(annotated-types fastapi fastapi-offline httptools opentelemetry-api pydantic pydantic-core
       pydantic-settings python-dotenv python-multipart starlette typing-inspection uvicorn
       watchfiles websockets)
BIG=onnxruntime-gpu

pinned() {  # NAME -> NAME==VERSION from the lock, or fail loudly
  local line
  line=$(grep -E "^$1==" requirements/serve-gpu.txt | sed 's/ .*//') ||
    { echo "gpu-wheels: $1 is not pinned in requirements/serve-gpu.txt" >&2; exit 2; }
  echo "$line"
}

download() {  # DIR SPEC...
  local dir=$1; shift
  "$PYTHON" -m pip download --quiet --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d "$dir" "$@"
}

specs=()
for name in "${SMALL[@]}"; do specs+=("$(pinned "$name")"); done
mkdir -p .whl/small
download .whl/small "${specs[@]}"
echo "gpu-wheels: $(find .whl/small -name '*.whl' | wc -l) small wheels in .whl/small"

if [ "${SKIP_BIG:-0}" = 1 ]; then
  echo "gpu-wheels: SKIP_BIG=1, $BIG not fetched"
  exit 0
fi
mkdir -p .whl/big
download .whl/big "$(pinned "$BIG")"
wheel=$(find .whl/big -name 'onnxruntime_gpu-*.whl' | head -n 1)
rm -rf .whl/parts
mkdir -p .whl/parts
split -b "$PART_SIZE" -d -a 1 "$wheel" ".whl/parts/$(basename "$wheel").part-"
index=1
for part in .whl/parts/*.part-*; do
  mkdir -p ".whl/parts/$index"
  mv "$part" ".whl/parts/$index/"
  index=$((index + 1))
done
(cd .whl/big && sha256sum "$(basename "$wheel")") > .whl/small/onnxruntime-gpu.sha256
echo "gpu-wheels: $(basename "$wheel") split into $((index - 1)) parts under .whl/parts/1..$((index - 1))"
