"""The process: uvicorn server, workers, cores, logging, metrics, key files."""
