"""Runs the live service for real (uvicorn on a loopback port, in a thread) and a verifying WebSocket client.

Waiting is by condition, never by a quiet period: `wait_until_current` returns once the follower has applied the
chain head, finished its step and the service's event loop has handled every update it was handed;
`drain` reads until the client holds, for each of its channels, the sequence number the service last sent on
it (coalesced channels flushed), then up to the answer to a ping (what was queued without a new sequence number).
A slow machine makes these waits longer, never wrong.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import threading
import time
import zlib
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import uvicorn
from websockets.sync.client import ClientConnection, connect

from orderbook_pipelines.devchain.anvil import free_port
from orderbook_pipelines.live.hub import Limits
from orderbook_pipelines.live.service import LiveService, ServiceOptions, server_settings
from orderbook_pipelines.storage.db import engine_for
from tests.conftest import DevChain


@contextmanager
def running_service(chain: DevChain, db: str, limits: Limits | None = None, redis_url: str | None = None,
                    admin_token: str | None = None, redis_prefix: str = "obp:", cluster: bool = False,
                    worker_id: str | None = None, options: ServiceOptions | None = None,
                    ) -> Iterator[tuple[LiveService, str]]:
    """The service under uvicorn with the production settings (`server_settings`), in a thread."""
    options = options or ServiceOptions(poll_s=0.5, admin_token=admin_token, markets_refresh_s=0.5)
    service = LiveService(chain.config, engine_for(db), limits, options, redis_url=redis_url,
                          redis_prefix=redis_prefix, cluster=cluster, worker_id=worker_id)
    _STEPS[id(service)] = _Steps(service)
    port = free_port()
    server = uvicorn.Server(uvicorn.Config(service.app(), **server_settings(service, "127.0.0.1", port)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("live service did not start")
        time.sleep(0.05)
    url = f"127.0.0.1:{port}"
    _SERVICES[url] = service
    try:
        yield service, url
    finally:
        _SERVICES.pop(url, None)
        _STEPS.pop(id(service), None)
        server.should_exit = True
        thread.join(timeout=20)


class _Steps:
    """Counts the follower's steps as they start and finish: between two equal readings with nothing running,
    every update of the blocks it applied has been handed to the service (the follower's callback runs inside
    the step that applied the block)."""

    def __init__(self, service: LiveService):
        self.started = self.finished = 0
        inner = service.follower.step

        def step(max_blocks: int = 500) -> int:
            self.started += 1
            try:
                return inner(max_blocks)
            finally:
                self.finished += 1

        service.follower.step = step  # type: ignore[method-assign]

    def reading(self) -> tuple[int, int]:
        return self.started, self.finished


_SERVICES: dict[str, LiveService] = {}  # by "host:port", for the clients' drain
_PINGS = itertools.count()
_STEPS: dict[int, _Steps] = {}


def _on_loop(service: LiveService, fn: Any) -> Any:
    """Run `fn()` on the service's event loop, after every callback already scheduled there (FIFO)."""
    assert service.loop is not None

    async def call() -> Any:
        return fn()

    return asyncio.run_coroutine_threadsafe(call(), service.loop).result(timeout=30)


def wait_until_current(service: LiveService, chain: DevChain, timeout: float = 60) -> None:
    """Until the live books are at the chain's head block (number and hash), no follower step is running or
    started since that was read, and the event loop has handled every update handed to it."""
    steps = _STEPS[id(service)]
    deadline = time.monotonic() + timeout
    while True:
        head = chain.anvil.w3.eth.block_number
        chain_hash = chain.anvil.w3.eth.get_block(head)["hash"].to_0x_hex()
        before = steps.reading()
        applied = service.follower.books.head
        if (service.started.is_set() and before[0] == before[1] and applied is not None
                and applied.number == head and applied.hash == chain_hash and steps.reading() == before):
            _on_loop(service, lambda: None)
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"live books at {applied} while the chain is at {head}")
        time.sleep(0.02)


def reference_checksum(bids: list[tuple[int, int]], asks: list[tuple[int, int]], depth: int) -> int:
    """The checksum as docs/websocket-protocol.md defines it, written independently of the server code."""
    parts = []
    for i in range(min(depth, 25)):
        if i < len(bids):
            parts.append(f"{bids[i][0]}:{bids[i][1]}")
        if i < len(asks):
            parts.append(f"{asks[i][0]}:{asks[i][1]}")
    return zlib.crc32(":".join(parts).encode())


class _Client:
    """Reading a WebSocket until it holds what the service sent; subclasses say what a frame means (`on_frame`),
    which book channels they follow and the last sequence number they applied on each."""

    ws: Any
    url: str

    def on_frame(self, raw: str) -> Any:
        raise NotImplementedError

    def channel_seqs(self) -> dict[tuple[str, int, int], int]:
        """(market, depth, interval_ms) -> seq of the last snapshot or delta applied (-1 while resyncing)."""
        raise NotImplementedError

    def drain(self, quiet_s: float = 0.5, timeout: float = 60) -> None:
        """Read until, on every followed channel, this client has applied the sequence number the service last
        sent there (read on the service's loop after the updates already handed to it, coalesced channels
        flushed). `quiet_s` is only used for a service this harness did not start, or a cluster API process
        (fed through Redis): then read until the server has been quiet that long."""
        service = _SERVICES.get(self.url)
        if service is None or service.node is not None:
            self._drain_quiet(quiet_s)
            return
        hub = service.hub
        keys = list(self.channel_seqs())

        def sent() -> dict[tuple[str, int, int], int] | None:
            out = {}
            for market, depth, interval in keys:
                ch = hub.channels.get((hub.by_name.get(market, -1), depth, interval))
                if ch is None or ch.dirty or not ch.subscribers:  # subscription in flight, or a flush due
                    return None
                out[(market, depth, interval)] = ch.seq
            return out

        deadline = time.monotonic() + timeout
        target = None
        while True:
            if target is None:
                target = _on_loop(service, sent)
            mine = self.channel_seqs()
            if target is not None and all(mine[k] >= seq for k, seq in target.items()):
                self._barrier(deadline)
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"client at {mine}, the service sent {target}")
            try:
                raw = self.ws.recv(timeout=0.05)
            except TimeoutError:
                target = None  # nothing in flight: ask again (a resubscription or a flush may be pending)
                continue
            self.on_frame(raw)

    def _barrier(self, deadline: float) -> None:
        """Also read what the service queued without moving a sequence number (a resync snapshot after an
        overflow, errors): its answer to a ping comes after all of it on this connection."""
        token = f"drain-{next(_PINGS)}"
        self.ws.send(json.dumps({"op": "ping", "id": token}))
        while True:
            raw = self.ws.recv(timeout=max(0.01, deadline - time.monotonic()))
            decoded = json.loads(raw)
            self.on_frame(raw)
            msgs = decoded if isinstance(decoded, list) else [decoded]
            if any(m.get("type") == "pong" and m.get("id") == token for m in msgs):
                return

    def _drain_quiet(self, quiet_s: float) -> None:
        while True:
            try:
                raw = self.ws.recv(timeout=quiet_s)
            except TimeoutError:
                return
            self.on_frame(raw)

    def close(self) -> None:
        self.ws.close()


class BookClient(_Client):
    """A client that follows the documented sync rule: snapshot, then deltas whose prev_seq equals the last seq;
    on a gap or a checksum mismatch it resubscribes."""

    def __init__(self, url: str, market: str, depth: int = 100, interval_ms: int = 0):
        self.ws: ClientConnection = connect(f"ws://{url}/ws", max_size=2**22)
        self.url = url
        self.market, self.depth, self.interval_ms = market, depth, interval_ms
        self.bids: dict[int, int] = {}
        self.asks: dict[int, int] = {}
        self.seq = -1
        self.gaps = self.checksum_failures = self.resyncs = self.deltas = 0
        self.drop_next_delta = False
        self.stream: list[tuple] = []  # every book message as received, to compare streams across processes
        self._subscribe()

    def _sub_msg(self, op: str) -> str:
        return json.dumps({"op": op, "channel": "book", "market": self.market, "depth": self.depth,
                           "interval_ms": self.interval_ms})

    def _subscribe(self) -> None:
        self.ws.send(self._sub_msg("subscribe"))

    def _resubscribe(self) -> None:
        self.resyncs += 1
        self.seq = -1
        self.ws.send(self._sub_msg("unsubscribe"))
        self._subscribe()

    def channel_seqs(self) -> dict[tuple[str, int, int], int]:
        return {(self.market, self.depth, self.interval_ms): self.seq}

    def levels(self) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        bids = sorted(self.bids.items(), key=lambda x: -x[0])[: self.depth]
        asks = sorted(self.asks.items())[: self.depth]
        return bids, asks

    def handle(self, msg: dict[str, Any]) -> None:
        t = msg.get("type")
        if t in ("snapshot", "delta"):
            self.stream.append((t, msg["seq"], msg.get("prev_seq"), msg["block"]["number"], msg["bids"], msg["asks"]))
        if t == "snapshot" and msg["market"] == self.market:
            self.bids = {int(p): int(q) for p, q in msg["bids"]}
            self.asks = {int(p): int(q) for p, q in msg["asks"]}
            self.seq = msg["seq"]
            self._verify(msg)
        elif t == "delta" and msg["market"] == self.market:
            if self.seq < 0:
                return  # between unsubscribe and the new snapshot
            if self.drop_next_delta:
                self.drop_next_delta = False
                return
            if msg["prev_seq"] != self.seq:
                self.gaps += 1
                self._resubscribe()
                return
            self.deltas += 1
            for side, book in (("bids", self.bids), ("asks", self.asks)):
                for p, q in msg[side]:
                    if int(q) == 0:
                        book.pop(int(p), None)
                    else:
                        book[int(p)] = int(q)
            self.seq = msg["seq"]
            self._verify(msg)
        elif t == "error":
            raise AssertionError(f"server error: {msg}")

    def _verify(self, msg: dict[str, Any]) -> None:
        bids, asks = self.levels()
        if reference_checksum(bids, asks, self.depth) != msg["checksum"]:
            self.checksum_failures += 1
            self._resubscribe()

    def on_frame(self, raw: str) -> None:
        self.handle(json.loads(raw))


class BatchBookClient(_Client):
    """One connection, several book channels, following the sync rule per channel; with `batch` it opts into
    batched frames and records every frame, so tests can look at how messages were packed."""

    def __init__(self, url: str, channels: list[tuple[str, int, int]], batch: bool = True, **connect_kw: Any):
        self.ws: ClientConnection = connect(f"ws://{url}/ws", max_size=2**22, **connect_kw)
        self.url = url
        self.batch = batch
        self.books: dict[tuple[str, int, int], dict[str, Any]] = {}
        self.frames: list[str] = []
        self.gaps = self.checksum_failures = self.resyncs = self.deltas = 0
        self.cross_frame_deltas = 0  # deltas whose predecessor arrived in an earlier frame
        self.resync_snapshots = 0
        self.errors: list[dict[str, Any]] = []
        self.streams: dict[tuple[str, int, int], list[tuple]] = {}
        if batch:
            self.ws.send(json.dumps({"op": "options", "batch": True, "id": "opt"}))
            first = self.ws.recv(timeout=10)
            assert json.loads(first) == [{"type": "options", "id": "opt", "batch": True}], first
        for key in channels:
            self.books[key] = {"bids": {}, "asks": {}, "seq": -1, "frame": -1}
            self.streams[key] = []
            self._send_sub("subscribe", key)

    def _send_sub(self, op: str, key: tuple[str, int, int]) -> None:
        market, depth, interval = key
        self.ws.send(json.dumps({"op": op, "channel": "book", "market": market, "depth": depth,
                                 "interval_ms": interval}))

    def channel_seqs(self) -> dict[tuple[str, int, int], int]:
        return {key: b["seq"] for key, b in self.books.items()}

    def levels(self, key: tuple[str, int, int]) -> tuple[list[tuple[int, int]], list[tuple[int, int]]]:
        b, depth = self.books[key], key[1]
        return sorted(b["bids"].items(), key=lambda x: -x[0])[:depth], sorted(b["asks"].items())[:depth]

    def on_frame(self, raw: str) -> list[dict[str, Any]]:
        self.frames.append(raw)
        decoded = json.loads(raw)
        msgs = decoded if isinstance(decoded, list) else [decoded]
        if self.batch:
            assert isinstance(decoded, list) and decoded, raw[:200]
        for msg in msgs:
            self._handle(msg)
        return msgs

    def _handle(self, msg: dict[str, Any]) -> None:
        t = msg.get("type")
        if t == "error":
            self.errors.append(msg)
            return
        if t not in ("snapshot", "delta"):
            return
        key = (msg["market"], msg["depth"], msg["interval_ms"])
        b = self.books.get(key)
        if b is None:
            return  # a channel the test does not track
        self.streams[key].append((t, msg["seq"], msg.get("prev_seq"), msg["block"]["number"], msg["bids"],
                                  msg["asks"], msg["checksum"]))
        if t == "snapshot":
            b["bids"] = {int(p): int(q) for p, q in msg["bids"]}
            b["asks"] = {int(p): int(q) for p, q in msg["asks"]}
            self.resync_snapshots += bool(msg.get("resync"))
        else:
            if b["seq"] < 0:
                return
            if msg["prev_seq"] != b["seq"]:
                self.gaps += 1
                self._resubscribe(key)
                return
            self.deltas += 1
            self.cross_frame_deltas += b["frame"] < len(self.frames) - 1
            for side in ("bids", "asks"):
                for p, q in msg[side]:
                    if int(q) == 0:
                        b[side].pop(int(p), None)
                    else:
                        b[side][int(p)] = int(q)
        b["seq"], b["frame"] = msg["seq"], len(self.frames) - 1
        bids, asks = self.levels(key)
        if reference_checksum(bids, asks, key[1]) != msg["checksum"]:
            self.checksum_failures += 1
            self._resubscribe(key)

    def _resubscribe(self, key: tuple[str, int, int]) -> None:
        self.resyncs += 1
        self.books[key]["seq"] = -1
        self._send_sub("unsubscribe", key)
        self._send_sub("subscribe", key)

