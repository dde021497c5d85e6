"""New-head notifications: an `eth_subscribe("newHeads")` WebSocket that wakes the follower at once.

Only a wake-up signal: the follower still reads headers and logs through the one RPC client, so a lost or
duplicated notification cannot corrupt anything, and when the subscription is down the follower polls.
"""

from __future__ import annotations

import json
import logging
import threading

from websockets.exceptions import WebSocketException
from websockets.sync.client import connect

log = logging.getLogger(__name__)


def ws_url_for(rpc_url: str) -> str:
    """anvil and most nodes serve WebSocket JSON-RPC on the HTTP endpoint's address."""
    if rpc_url.startswith("https://"):
        return "wss://" + rpc_url[len("https://"):]
    if rpc_url.startswith("http://"):
        return "ws://" + rpc_url[len("http://"):]
    return rpc_url


class HeadWatcher:
    def __init__(self, ws_url: str, wake: threading.Event, retry_s: float = 2.0):
        self.ws_url = ws_url
        self.wake = wake
        self.retry_s = retry_s
        self.connected = False
        self.notifications = 0
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._run, name="heads", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self._stop.set()

    def _run(self) -> None:
        while not self._stop.is_set():
            try:
                with connect(self.ws_url, open_timeout=5, close_timeout=1) as ws:
                    ws.send(json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_subscribe", "params": ["newHeads"]}))
                    reply = json.loads(ws.recv(timeout=5))
                    if "result" not in reply:
                        raise RuntimeError(f"eth_subscribe refused: {reply.get('error')}")
                    self.connected = True
                    while not self._stop.is_set():
                        try:
                            ws.recv(timeout=1)
                        except TimeoutError:
                            continue
                        self.notifications += 1
                        self.wake.set()
            except (OSError, WebSocketException, RuntimeError, TimeoutError, json.JSONDecodeError) as exc:
                if self.connected:
                    log.warning("newHeads subscription lost (%s); polling until it is back", exc)
                self.connected = False
                self._stop.wait(self.retry_s)
