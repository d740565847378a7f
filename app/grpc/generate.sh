#!/usr/bin/env bash
# Regenerates app/grpc/inference_pb2.py, .pyi and inference_pb2_grpc.py from inference.proto with the
# grpcio-tools of the dev venv (make venv). tests/integration/test_grpc_stubs_process.py generates them
# into a temporary folder (the first argument, default: here) and fails while the committed ones differ.
set -euo pipefail
cd "$(dirname "$0")/../.."
out=${1:-.}
python=${PYTHON:-.venv/bin/python}
mkdir -p "$out/app/grpc"
"$python" -m grpc_tools.protoc --proto_path=. --python_out="$out" --pyi_out="$out" \
  --grpc_python_out="$out" app/grpc/inference.proto
# A pool of its own: tritonclient.grpc (or KServe's client) registers the same "inference.*" names in
# protobuf's default pool, and a process that imports both would fail with "duplicate symbol".
sed -i 's/_descriptor_pool\.Default()\.AddSerializedFile/_descriptor_pool.DescriptorPool().AddSerializedFile/' \
  "$out/app/grpc/inference_pb2.py"
