"""Ours against LitServe, BentoML, Ray Serve and a hand-written FastAPI script, in one run.

    make peers-venv bench-models
    PYTHONPATH=. .venv/bin/python -m benchmarks.peers            # about 25 minutes on 2 cores
    PYTHONPATH=. .venv/bin/python -m benchmarks.peers --quick    # smoke test, a few minutes

Each server on the same ONNX artifact: start-up time to the first 200, top-1 on the check
images (examples/ and the load photos) against ours, then one 500x375 JPEG per request at each
concurrency. By default each server runs alone, in turn, in two passes (``--passes``), the second
in reverse order, each point pooled over both, so that a drift in a shared machine's speed hits
them alike; with ``--rounds N`` all are up at once and each point is N windows per server, the
servers taking turns. Writes benchmarks/results/peers.{json,md,png}.
"""

from benchmarks.peers.run import main

main()
