"""The Open Inference Protocol (KServe v2 / Triton): its recipe once, served over REST here and
over gRPC by app.grpc."""
