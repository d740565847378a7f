"""Runtimes behind one interface: ONNX Runtime and OpenVINO, registered, chosen by auto."""
