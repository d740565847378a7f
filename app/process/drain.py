"""HTTP/1.1 connections drained without a client-side error: uvicorn's HTTP protocol, changed in how
it stops (``shutdown``, which uvicorn calls on every connection once the stop signal came).

uvicorn closes a connection that is idle at that moment at once. A keep-alive client may be writing
its next request on it just then; the request meets a closed socket, and the client gets a read
error: it cannot know whether the request was computed, so it cannot safely retry. Envoy and nginx
avoid that by answering with ``Connection: close`` before they close. Here:

- a connection answering a request keeps it, and the answer carries ``Connection: close``;
- an idle connection is kept for ``IDLE_GRACE_S``: a request that arrives is answered (the server
  is draining, so an inference request gets 503 ``shutting_down`` with ``Retry-After``) with
  ``Connection: close``; one that is still idle after it is closed then. A client that sends its
  next request within the grace window (a closed-loop client does, in milliseconds) always gets an
  answer; one idle for longer finds the connection closed before it writes, which it sees as a
  closed keep-alive connection and reopens, as after any keep-alive timeout.
"""

from __future__ import annotations

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

# Long enough for a keep-alive client to send its next request and get its answer with
# "Connection: close"; short against shutdown_timeout_s (default 30 s), which bounds it.
IDLE_GRACE_S = 1.0


class DrainingHttpToolsProtocol(HttpToolsProtocol):
    _draining = False
    _receiving = False  # a request's first bytes came, its headers are not complete yet

    def shutdown(self) -> None:
        self._draining = True
        if self.cycle is None or self.cycle.response_complete:
            self._unset_keepalive_if_required()
            self.loop.call_later(IDLE_GRACE_S, self._close_if_idle)
        else:
            self.cycle.keep_alive = False

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._receiving = True

    def on_headers_complete(self) -> None:
        self._receiving = False
        super().on_headers_complete()
        if self._draining and self.cycle is not None:
            self.cycle.keep_alive = False  # answered, then closed

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if self._draining:  # no keep-alive timer while draining: the grace timer closes it
            self._unset_keepalive_if_required()

    def _close_if_idle(self) -> None:
        if self.transport.is_closing():
            return
        if self._receiving:  # a request is arriving: answer it first
            self.loop.call_later(0.05, self._close_if_idle)
        elif self.cycle is None or self.cycle.response_complete:
            self.transport.close()
        # else a request came in the window: its answer says Connection: close and closes it
