"""uvicorn's HTTP protocol with a header-read timeout, against slow clients (slowloris).

uvicorn closes idle keep-alive connections (``timeout_keep_alive``) and caps connections
(``limit_concurrency``, 503 beyond), but it has no limit on how long a client may take to send a request's
headers: a socket that sends one byte every few seconds is held open for ever, and enough of them take
every connection the cap allows. :func:`header_timeout_protocol` adds that limit: from the moment a
connection opens, or a keep-alive connection's next request starts, its headers must be complete within
``seconds``, or the connection is closed. The body is the application's to time (``body_timeout_s``).
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol


def header_timeout_protocol(seconds: float) -> type[asyncio.Protocol]:
    """A subclass of uvicorn's httptools protocol that closes a connection whose request headers have
    not all arrived ``seconds`` after it opened (or after its previous response)."""
    if not 0 < seconds < float("inf"):
        raise ValueError(f"the header timeout must be a finite number > 0, got {seconds!r}")

    class HeaderTimeoutProtocol(HttpToolsProtocol):
        _header_timer: asyncio.TimerHandle | None = None

        def _arm(self) -> None:
            if self._header_timer is None:
                self._header_timer = self.loop.call_later(seconds, self._headers_too_slow)

        def _disarm(self) -> None:
            if self._header_timer is not None:
                self._header_timer.cancel()
                self._header_timer = None

        def _headers_too_slow(self) -> None:
            self._header_timer = None
            if not self.transport.is_closing():
                self.transport.close()

        def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
            super().connection_made(transport)
            self._arm()

        def on_message_begin(self) -> None:
            super().on_message_begin()
            self._arm()  # the next request on a kept-alive connection: its headers are timed too

        def on_headers_complete(self) -> None:
            self._disarm()
            super().on_headers_complete()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            super().connection_lost(exc)

    return HeaderTimeoutProtocol
