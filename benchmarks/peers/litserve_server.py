"""LitServe with its dynamic batching.

    PEER_MODEL_PATH=model.onnx PEER_PORT=8002 \
        .venv-peers/bin/python -m benchmarks.peers.litserve_server

Follows LitServe's batching guide (https://lightning.ai/docs/litserve/features/batching):
``max_batch_size`` and ``batch_timeout`` on the ``LitAPI`` (the place 0.2.x documents; passing
them to ``LitServer`` is deprecated), ``decode_request`` per request, the default ``batch``
(``np.stack`` of numpy inputs) and ``unbatch`` (one row per request), ``encode_response`` per
request. The upload arrives as a multipart form field, read as LitServe's file-upload docs show
(https://lightning.ai/docs/litserve/features/request-response-format). ``accelerator="cpu"``
with LitServe's default one inference worker and default request timeout.
"""

import litserve as ls
import numpy as np

from benchmarks.peers.common import Classifier, PeerConfig

CONFIG = PeerConfig.from_env()


class ClassifierAPI(ls.LitAPI):
    def setup(self, device: str) -> None:
        self.classifier = Classifier(CONFIG.model_path)

    # No annotations on decode_request's argument or encode_response's result: LitServe builds
    # the endpoint from them, and an unannotated ``request`` is the raw form (as in its docs).
    def decode_request(self, request):  # type: ignore[no-untyped-def]
        return self.classifier.decode(request["image"].file.read())

    def predict(self, crops: np.ndarray) -> np.ndarray:
        return self.classifier.predict(crops)

    def encode_response(self, probabilities):  # type: ignore[no-untyped-def]
        return self.classifier.answer(probabilities)


if __name__ == "__main__":
    api = ClassifierAPI(max_batch_size=CONFIG.max_batch_size, batch_timeout=CONFIG.batch_wait_s)
    server = ls.LitServer(api, accelerator="cpu")
    server.run(host="127.0.0.1", port=CONFIG.port, log_level="warning", generate_client_file=False)
