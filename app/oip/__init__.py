"""The Open Inference Protocol (KServe v2 / Triton HTTP REST), over the Classifier of /predict."""
