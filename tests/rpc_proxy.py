"""A real HTTP JSON-RPC proxy in front of anvil that injects provider faults anvil cannot produce itself:
"too many results" refusals (by window size, or by the number of logs the node really returns), rate limiting
(429) and a provider that dies halfway through a range. It records every getLogs window it was asked for."""

from __future__ import annotations

import json
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import requests

Fault = Callable[[dict, int], tuple[int, dict] | None]
# A fault that sees the node's answer: (request, upstream JSON answer) -> the answer to give instead, or None.
AnswerFault = Callable[[dict, dict], tuple[int, dict] | None]


class RpcProxy:
    def __init__(self, upstream: str, fault: Fault | None = None, answer_fault: AnswerFault | None = None):
        self.upstream = upstream
        self.fault = fault or (lambda _req, _n: None)
        self.answer_fault = answer_fault
        self.calls: dict[str, int] = {}
        # (blocks asked for, refused?) per eth_getLogs over a block range, in order
        self.windows: list[tuple[int, bool]] = []
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
                if injected is None:
                    r = requests.post(proxy.upstream, data=body, headers={"Content-Type": "application/json"},
                                      timeout=30)
                    status, out = r.status_code, r.content
                    if proxy.answer_fault is not None and not isinstance(req, list) and status == 200:
                        injected = proxy.answer_fault(first, r.json())
                if injected is not None:
                    status, payload = injected
                    out = json.dumps({"jsonrpc": "2.0", "id": first.get("id"), **payload}).encode()
                p = first.get("params") or [{}]
                if first["method"] == "eth_getLogs" and isinstance(p[0], dict) and "fromBlock" in p[0]:
                    with proxy.lock:
                        proxy.windows.append((int(p[0]["toBlock"], 16) - int(p[0]["fromBlock"], 16) + 1,
                                              injected is not None))
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


def too_many_results_over(max_logs: int) -> AnswerFault:
    """Refuse a getLogs answer holding more than `max_logs` logs, as providers do (a result-count cap, not a
    block-count one): whether a window is refused depends on how busy its blocks really are."""

    def fault(req: dict, answer: dict) -> tuple[int, dict] | None:
        if req["method"] == "eth_getLogs" and len(answer.get("result") or []) > max_logs:
            return 200, {"error": {"code": -32005, "message": f"query returned more than {max_logs} results"}}
        return None

    return fault
