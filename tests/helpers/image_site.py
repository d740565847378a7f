"""A local image server on 127.0.0.1 for the tests of images by URL: the only address they fetch
from, and the servers under test allow it explicitly (``url_allow='["127.0.0.1"]'``)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from tests.helpers.models import image_bytes

PNG = image_bytes(3)  # at /digit.png


class Images(BaseHTTPRequestHandler):
    """What the tests fetch: an image, redirects, a slow, a huge and a wrong answer."""

    def do_GET(self) -> None:
        if self.path == "/digit.png":
            self._answer(200, PNG, "image/png")
        elif self.path.startswith("/to/"):  # /to/<where>: a redirect
            self.send_response(302)
            self.send_header("Location", self.path.removeprefix("/to/"))
            self.end_headers()
        elif self.path == "/slow.png":
            time.sleep(3)
            self._answer(200, PNG, "image/png")
        elif self.path == "/huge.png":  # no Content-Length: cut while it streams
            self.send_response(200)
            self.send_header("Content-Type", "image/png")
            self.end_headers()
            for _ in range(40):
                self.wfile.write(b"\0" * 64_000)
        elif self.path == "/notes.txt":
            self._answer(200, b"not an image", "text/plain")
        else:
            self._answer(404, b"no", "text/plain")

    def _answer(self, status: int, body: bytes, kind: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", kind)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class _Quiet(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: object, client_address: object) -> None:
        pass  # a fetch the server cut (too large, too slow) breaks the pipe: that is the point


@contextmanager
def image_site() -> Iterator[str]:
    """The site's base URL, ``http://127.0.0.1:<port>``."""
    httpd = _Quiet(("127.0.0.1", 0), Images)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{httpd.server_address[1]}"
    finally:
        httpd.shutdown()
        httpd.server_close()
