"""Slow-loris protection for uvicorn: a deadline for a request's headers.

uvicorn bounds idle keep-alive connections (`timeout_keep_alive`) and header size (h11/httptools: 16 KiB
incomplete-event limit) but not the *time* a client may take to send headers: a client that trickles one byte
per second keeps a connection (and a file descriptor) forever. This protocol starts a timer when a connection
opens and after each response, and closes the connection if the next request's headers are not complete
when it fires. WebSocket upgrades complete their headers first, so they are unaffected.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol

HEADER_TIMEOUT_S = 10.0


class HeaderDeadlineProtocol(HttpToolsProtocol):
    """One timer per connection, not one per request: the timer only checks a timestamp that requests set
    (`loop.call_later` + cancel per request is a measurable share of a cached /api/depth answer)."""

    header_timeout_s: float = HEADER_TIMEOUT_S
    _header_timer: asyncio.TimerHandle | None = None
    _waiting_since: float | None = None  # loop time since which the next request's headers are awaited

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._waiting_since = self.loop.time()
        self._header_timer = self.loop.call_later(self.header_timeout_s, self._check_header_deadline)

    def on_headers_complete(self) -> None:
        self._waiting_since = None
        super().on_headers_complete()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing():
            self._waiting_since = self.loop.time()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        super().connection_lost(exc)

    def _check_header_deadline(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        since = self._waiting_since
        now = self.loop.time()
        if since is not None and now - since >= self.header_timeout_s:
            self.transport.close()
            return
        wait = self.header_timeout_s - (now - since) if since is not None else self.header_timeout_s
        self._header_timer = self.loop.call_later(wait, self._check_header_deadline)
