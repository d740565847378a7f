"""The process: the uvicorn server and its draining connections, workers, cores, memory."""
