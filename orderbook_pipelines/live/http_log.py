"""Request ids and request logs of the live service, at a hot-path cost.

Binds a request id (HTTP) or connection id (WebSocket) and logs one line per request or connection (fields in
docs/observability.md); a well-formed incoming `X-Request-ID` is kept and echoed back; headers are never logged.
Two choices matter at thousands of requests/s: a *successful read* (GET/HEAD answered < 400) is logged at DEBUG,
since a rendered, redacted JSON log line costs more CPU than serving a cached depth body (per-route counts and
latency are in `obp_api_request_seconds`); errors, writes (admin) and WebSocket connections stay at INFO. And a
WebSocket's frames pass through without a per-frame wrapper once the connection is accepted.
"""

from __future__ import annotations

import logging
import re
import time
from typing import Any

from structlog.contextvars import bound_contextvars

from orderbook_pipelines.obs import new_id

_SAFE_ID = re.compile(r"^[A-Za-z0-9._\-]{1,64}$")
_log = logging.getLogger("obp.http")


class RequestLog:
    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        kind = scope["type"]
        if kind not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        given = ""
        for k, v in scope.get("headers") or ():
            if k == b"x-request-id":
                given = v.decode("latin-1")
        rid = given if given and _SAFE_ID.match(given) else new_id()
        t0 = time.perf_counter()
        state: dict[str, Any] = {"status": None}
        if kind == "http":
            rid_header = (b"x-request-id", rid.encode())

            async def send_wrapper(message: dict) -> None:
                if message["type"] == "http.response.start":
                    state["status"] = message["status"]
                    message = {**message, "headers": [*message.get("headers", []), rid_header]}
                await send(message)
        else:
            async def send_wrapper(message: dict) -> None:
                t = message["type"]
                if t == "websocket.send":
                    await send(message)
                    return
                if t == "websocket.accept":
                    state["status"] = 101
                elif t == "websocket.close":
                    state["close_code"] = message.get("code", 1000)
                await send(message)

        key = "request_id" if kind == "http" else "conn_id"
        with bound_contextvars(**{key: rid}):
            try:
                await self.app(scope, receive, send_wrapper)
            except Exception:
                state["status"] = 500
                _log.exception("request failed", extra={"method": scope.get("method"), **_fields(scope)})
                raise
            finally:
                status = state["status"]
                if kind == "http":
                    quiet = scope.get("method") in ("GET", "HEAD") and status is not None and status < 400
                    level = logging.DEBUG if quiet else logging.INFO
                    if _log.isEnabledFor(level):
                        q = scope.get("query_string", b"").decode("latin-1")
                        _log.log(level, "request", extra={
                            "method": scope.get("method"), "query": q or None, "status": status,
                            "duration_ms": round((time.perf_counter() - t0) * 1000, 3), **_fields(scope)})
                else:
                    _log.info("websocket closed", extra={
                        "status": status, "duration_ms": round((time.perf_counter() - t0) * 1000, 3),
                        "close_code": state.get("close_code"), **_fields(scope)})


def _fields(scope: dict) -> dict[str, Any]:
    client = scope.get("client")
    return {"client": client[0] if client else None, "path": scope.get("path")}
