"""A real HTTP JSON-RPC proxy in front of anvil that injects provider faults anvil cannot produce itself:
"too many results" refusals, rate limiting (429) and a provider that dies halfway through a range."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

Fault = Callable[[dict, int], tuple[int, dict] | None]


class RpcProxy:
    def __init__(self, upstream: str, fault: Fault):
        self.upstream = upstream
        self.fault = fault
        self.calls: dict[str, int] = {}
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:
                pass

            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                req = json.loads(body)
                first = req[0] if isinstance(req, list) else req
                with proxy.lock:
                    n = proxy.calls.get(first["method"], 0) + 1
                    proxy.calls[first["method"]] = n
                injected = proxy.fault(first, n) if not isinstance(req, list) else None
                if injected is not None:
                    status, payload = injected
                    out = json.dumps({"jsonrpc": "2.0", "id": first.get("id"), **payload}).encode()
                else:
                    r = requests.post(proxy.upstream, data=body, headers={"Content-Type": "application/json"},
                                      timeout=30)
                    status, out = r.status_code, r.content
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(out)))
                self.end_headers()
                self.wfile.write(out)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> RpcProxy:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.server.shutdown()
        self.server.server_close()


def too_many_results_above(max_blocks: int) -> Fault:
    """Refuse getLogs windows wider than `max_blocks`, in the words Alchemy/Infura use."""

    def fault(req: dict, _n: int) -> tuple[int, dict] | None:
        if req["method"] != "eth_getLogs":
            return None
        p = req["params"][0]
        if int(p["toBlock"], 16) - int(p["fromBlock"], 16) + 1 > max_blocks:
            return 200, {"error": {"code": -32005, "message": "query returned more than 10000 results"}}
        return None

    return fault


def fail_get_logs_after(n_ok: int) -> Fault:
    """The provider answers `n_ok` getLogs calls, then fails every later one with HTTP 503."""

    def fault(req: dict, n: int) -> tuple[int, dict] | None:
        if req["method"] == "eth_getLogs" and n > n_ok:
            return 503, {"error": {"code": -32000, "message": "upstream unavailable"}}
        return None

    return fault


def rate_limited_first(n_limited: int) -> Fault:
    def fault(req: dict, n: int) -> tuple[int, dict] | None:
        if req["method"] == "eth_getLogs" and n <= n_limited:
            return 429, {"error": {"code": 429, "message": "rate limit exceeded"}}
        return None

    return fault
