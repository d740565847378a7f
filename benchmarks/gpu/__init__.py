"""The GPU benchmark (``python -m benchmarks.gpu``); ``make gpu-check`` runs it on a GPU machine."""
