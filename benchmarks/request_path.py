"""Which project modules one request runs code in: ``python -m benchmarks.request_path MODEL``.

Starts ``python -m app`` on MODEL under a profiler (``sys.setprofile`` on every thread, so the
decode threads and the lanes count too), warms it with a few requests, then records exactly one
``POST /predict`` of a 500x375 JPEG and prints each module of ``app/`` and ``core/`` whose code ran
for it, in the order they were first entered, and how often the request crossed from one module to
another. Start-up, warm-up and the client are not counted.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
PROJECT = (str(ROOT / "app") + os.sep, str(ROOT / "core") + os.sep)

# Run in the server's process: a profiler that records only between SIGUSR1 and SIGUSR2.
PROBE = """
import json, os, runpy, signal, sys, threading
root, out, functions = sys.argv[1], sys.argv[2], sys.argv[3] == "1"
project = (os.path.join(root, "app") + os.sep, os.path.join(root, "core") + os.sep)
state = {"on": False, "order": [], "crossings": 0, "last": {}}
def profile(frame, event, arg):
    if not state["on"] or event != "call":
        return
    name = frame.f_code.co_filename
    if not name.startswith(project):
        return
    path = os.path.relpath(name, root)
    listed = f"{path}:{frame.f_code.co_name}" if functions else path
    if listed not in state["order"]:
        state["order"].append(listed)
    thread = threading.get_ident()
    if state["last"].get(thread) not in (None, path):
        state["crossings"] += 1
    state["last"][thread] = path
def start(sig, frame):
    state["on"] = True
def stop(sig, frame):
    state["on"] = False
    with open(out, "w") as f:
        json.dump({"modules": state["order"], "crossings": state["crossings"]}, f)
signal.signal(signal.SIGUSR1, start)
signal.signal(signal.SIGUSR2, stop)
threading.setprofile(profile)
sys.setprofile(profile)
sys.argv = ["app"]
runpy.run_module("app", run_name="__main__", alter_sys=True)
"""


def jpeg() -> bytes:
    rng = np.random.default_rng(0)
    pixels = rng.integers(0, 256, (375, 500, 3), dtype=np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    return buffer.getvalue()


def trace(model: Path, port: int, warm: int, functions: bool) -> dict[str, object]:
    out = Path(tempfile.mkdtemp()) / "path.json"
    env = {
        **os.environ,
        "RESNET_SERVE_MODEL_PATH": str(model),
        "RESNET_SERVE_PORT": str(port),
        "RESNET_SERVE_HOST": "127.0.0.1",
        "RESNET_SERVE_GRPC_PORT": "0",
        "RESNET_SERVE_LOG_LEVEL": "warning",
    }
    server = subprocess.Popen([sys.executable, "-c", PROBE, str(ROOT), str(out)], cwd=ROOT, env=env)
    url = f"http://127.0.0.1:{port}"
    image = jpeg()
    try:
        with httpx.Client(base_url=url, timeout=60) as client:
            deadline = time.monotonic() + 300
            while True:
                try:
                    if client.get("/readyz").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline or server.poll() is not None:
                    raise SystemExit("the server did not get ready")
                time.sleep(0.5)
            files = {"files": ("photo.jpg", image, "image/jpeg")}
            for _ in range(warm):
                client.post("/predict", files=files).raise_for_status()
            time.sleep(0.5)  # nothing else in flight
            server.send_signal(signal.SIGUSR1)
            time.sleep(0.2)
            response = client.post("/predict", files=files)
            response.raise_for_status()
            time.sleep(0.5)  # the request's last bookkeeping (access log, metrics) is done
            server.send_signal(signal.SIGUSR2)
            while not out.exists():
                time.sleep(0.1)
            time.sleep(0.2)
    finally:
        server.terminate()
        server.wait(timeout=60)
    result: dict[str, object] = json.loads(out.read_text())
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model", type=Path, help="an exported ONNX file (make build's)")
    parser.add_argument("--port", type=int, default=8093)
    parser.add_argument("--warm", type=int, default=20, help="requests before the one traced")
    parser.add_argument("--functions", action="store_true", help="list module:function pairs")
    args = parser.parse_args()
    result = trace(args.model.resolve(), args.port, args.warm, args.functions)
    modules = result["modules"]
    assert isinstance(modules, list)
    for index, module in enumerate(modules, start=1):
        print(f"{index:3d}  {module}")
    print(f"{len(modules)} project modules; {result['crossings']} crossings between modules")


if __name__ == "__main__":
    main()
