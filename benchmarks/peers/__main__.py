"""The peers benchmark (benchmarks/peers/run.py says what it measures and how):

make peers-venv bench-models
PYTHONPATH=. .venv/bin/python -m benchmarks.peers            # about 25 minutes on 2 cores
PYTHONPATH=. .venv/bin/python -m benchmarks.peers --quick    # smoke test, a few minutes
"""

from benchmarks.peers.run import main

main()
