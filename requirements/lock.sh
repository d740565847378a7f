#!/usr/bin/env bash
# Regenerate the hashed lock files from pyproject.toml (run after changing a dependency):
#   bash requirements/lock.sh             # uv from .venv or PATH; CPU torch from /opt/wheels or PyTorch's CPU index
#   bash requirements/lock.sh --upgrade   # also move every pin to its newest allowed release
# One lock per install: dev.txt (make run / make test / CI), build.txt (the image's model builder),
# serve-cpu.txt and serve-gpu.txt (the API images). Linux x86_64, CPython 3.11: the images and CI.
# torch is left out of every lock (--no-emit-package) but resolved as the CPU build, so its own
# dependencies are locked without CUDA wheels; it is installed next to the lock, pinned by version.
set -euo pipefail
cd "$(dirname "$0")/.."

uv=${UV:-$(command -v .venv/bin/uv || command -v uv || true)}
[ -n "$uv" ] || { echo "uv not found: pip install uv" >&2; exit 1; }
torch_source=(--find-links /opt/wheels)
[ -d /opt/wheels ] || torch_source=(--index https://download.pytorch.org/whl/cpu --index-strategy unsafe-best-match)

lock() {
  local name=$1 extras=$2
  local args=()
  for extra in ${extras//,/ }; do args+=(--extra "$extra"); done
  "$uv" pip compile pyproject.toml "${args[@]}" \
    --python-version 3.11 --python-platform x86_64-manylinux_2_28 \
    "${torch_source[@]}" --constraint requirements/torch-cpu.txt --no-emit-package torch \
    --generate-hashes --custom-compile-command "bash requirements/lock.sh" \
    --quiet --output-file "requirements/$name.txt" "${@:3}"
}

lock dev cpu,train,dev,bench "$@"
lock build cpu,train "$@"
lock serve-cpu cpu "$@"
lock serve-gpu gpu "$@"
