"""The `batch` connection option on a real service and a real chain: batched clients receive exactly the
messages unbatched ones do (packed as JSON arrays), keep per-market seq continuity across frames, end equal to
the contract, stay under the frame bound, and are still conflated / disconnected as slow consumers."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path

import pytest
from websockets.exceptions import ConnectionClosed

from orderbook_pipelines.devchain.simulator import Simulator
from orderbook_pipelines.live import metrics
from orderbook_pipelines.live.hub import Limits
from tests.conftest import Anvil, DevChain, make_devchain
from tests.live_harness import BatchBookClient, running_service, wait_until_current
from tests.test_live_service import GEN1, GEN2, contract_levels

MARKETS = GEN1 + GEN2


@pytest.fixture
def chain(anvil_factory: type[Anvil], tmp_path: Path) -> DevChain:
    return make_devchain(anvil_factory(), tmp_path, GEN1, GEN2, confirmations=2, range_size=25)


def _counter(c) -> float:  # type: ignore[no-untyped-def]
    return c._value.get()


def test_batched_client_gets_the_same_messages_as_an_unbatched_one_and_ends_equal_to_the_contract(
        chain: DevChain, database: str) -> None:
    anvil = chain.anvil
    Simulator(anvil.w3, chain.dep, seed=31).run_batches(150, per_block=20)
    channels = [(m, 100, 0) for m in MARKETS] + [(m, 20, 100) for m in MARKETS]
    with running_service(chain, database) as (service, url):
        wait_until_current(service, chain)  # both subscribe at the same book (the last blocks follow the cold start)
        batched = BatchBookClient(url, channels)
        plain = BatchBookClient(url, channels, batch=False)
        batched.drain(0.3)
        plain.drain(0.3)
        for round_ in range(2):
            Simulator(anvil.w3, chain.dep, seed=40 + round_).run_batches(120, per_block=15)
            snapshot = anvil.rpc("evm_snapshot")
            Simulator(anvil.w3, chain.dep, seed=50 + round_).run_batches(45, per_block=15)
            wait_until_current(service, chain)
            anvil.rpc("evm_revert", snapshot)  # reorganised away by a longer branch
            Simulator(anvil.w3, chain.dep, seed=60 + round_).run_batches(75, per_block=15)
        wait_until_current(service, chain)
        batched.drain()
        plain.drain()
        assert service.follower.stats.reorgs >= 2
        for key in channels:
            assert batched.levels(key) == contract_levels(chain, key[0], key[1]), key
            assert plain.levels(key) == batched.levels(key), key
            # The same channel string, packed differently: identical per-channel streams, message for message.
            assert batched.streams[key] == plain.streams[key], key
        for c in (batched, plain):
            assert (c.gaps, c.checksum_failures, c.resyncs, c.errors) == (0, 0, 0, []), c.batch
        assert batched.deltas == plain.deltas > 50
        per_frame = [len(json.loads(f)) for f in batched.frames]  # every batched frame is an array (harness)
        assert max(per_frame) > 1 and len(batched.frames) < sum(per_frame) == len(plain.frames)
        assert batched.cross_frame_deltas > 50  # prev_seq chains to a delta of an earlier frame
        assert not any(f.startswith("[") for f in plain.frames)  # the default stays one object per frame
        batched.close()
        plain.close()


def test_a_batch_frame_never_exceeds_max_batch_bytes(chain: DevChain, database: str) -> None:
    anvil = chain.anvil
    Simulator(anvil.w3, chain.dep, seed=32).run_batches(300, per_block=30)  # deep books: big snapshots
    limit = 700
    limits = Limits(max_batch_bytes=limit, messages_per_second=100)
    channels = [(m, d, 0) for m in MARKETS for d in (20, 50, 100)] + [(m, 20, 100) for m in MARKETS]
    with running_service(chain, database, limits) as (service, url):
        c = BatchBookClient(url, channels)
        Simulator(anvil.w3, chain.dep, seed=33).run_batches(240, per_block=30)
        wait_until_current(service, chain)
        c.drain()
        frames = [(len(json.loads(f)), len(f.encode())) for f in c.frames]
        assert all(size <= limit for n, size in frames if n > 1), max(frames, key=lambda x: x[1])
        assert any(n > 1 for n, _ in frames)
        assert any(size > limit for n, size in frames if n == 1)  # a bigger snapshot goes alone, unsplit
        assert c.deltas > 50 and (c.gaps, c.checksum_failures, c.errors) == (0, 0, [])
        for key in channels:
            assert c.levels(key) == contract_levels(chain, key[0], key[1]), key
        c.close()


def test_slow_batched_consumer_is_resynced_counting_messages_then_disconnected(chain: DevChain,
                                                                                  database: str) -> None:
    anvil = chain.anvil
    Simulator(anvil.w3, chain.dep, seed=34).run_batches(200, per_block=25)
    queue_size = 16
    limits = Limits(queue_size=queue_size, max_conflations=3, messages_per_second=10_000)
    channels = [(m, d, 0) for m in MARKETS for d in (20, 50, 100)]
    with running_service(chain, database, limits) as (service, url):
        host, port = url.split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # before connect: it sets the TCP window
        sock.connect((host, int(port)))
        # While stalled the client reads nothing: a tiny receive buffer and frame queue make the server's sends
        # block, so its per-connection queue fills.
        c = BatchBookClient(url, channels, sock=sock, max_queue=1, ping_interval=None)
        c.drain(0.3)
        seed = 100
        spam = json.dumps({"op": "subscribe", "channel": "book", "market": "SILVER_V1", "depth": 100,
                           "interval_ms": 1000})

        conn = next(iter(service.hub.channels[(service.hub.by_name["SILVER_V1"], 20, 0)].subscribers))

        def stall_until(cond) -> None:  # type: ignore[no-untyped-def]
            """Ask for more than is read (snapshots of an untracked channel) until the socket is stuck and the
            queue half full, then mine one block at a time (at most one overflow each) until `cond`."""
            nonlocal seed
            deadline = time.monotonic() + 120
            while not cond():
                assert time.monotonic() < deadline, "the server never found the client slow"
                if conn.queue.qsize() < queue_size // 2:
                    for _ in range(4):  # 12 messages: from < queue_size/2, at most one overflow
                        c.ws.send(spam)
                        c.ws.send(spam.replace('"subscribe"', '"unsubscribe"'))
                    time.sleep(0.02)
                else:
                    Simulator(anvil.w3, chain.dep, seed=seed).run_batches(60, per_block=60)  # one block
                    seed += 1
                    time.sleep(0.2)

        conflations, dropped = _counter(metrics.CONFLATIONS), _counter(metrics.MESSAGES_DROPPED)
        disconnects = _counter(metrics.SLOW_CONSUMER_DISCONNECTS)  # process-wide: other tests count too
        stall_until(lambda: _counter(metrics.CONFLATIONS) > conflations)
        # Each overflow happened at queue_size pending *messages* (not frames): exactly that many were dropped.
        overflows = _counter(metrics.CONFLATIONS) - conflations
        assert 1 <= overflows <= 3 and _counter(metrics.SLOW_CONSUMER_DISCONNECTS) == disconnects
        assert _counter(metrics.MESSAGES_DROPPED) == dropped + queue_size * overflows
        wait_until_current(service, chain)
        c.drain(1.0)  # reads again: what was in flight, then a resync snapshot per channel, then deltas
        assert c.resync_snapshots >= len(channels)
        assert (c.gaps, c.checksum_failures, c.errors) == (0, 0, [])
        for key in channels:
            assert c.levels(key) == contract_levels(chain, key[0], key[1]), key
        # Stalled again: more than max_conflations overflows in 30 s disconnect with 4008.
        stall_until(lambda: _counter(metrics.SLOW_CONSUMER_DISCONNECTS) > disconnects)
        last: list = []
        with pytest.raises(ConnectionClosed) as closed:
            while True:
                last = c.on_frame(c.ws.recv(timeout=10))
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 4008
        assert [m.get("code") for m in last] == ["slow_consumer"]  # the error, alone in its array
        assert c.errors[-1]["code"] == "slow_consumer"


def test_options_are_validated_and_batch_can_be_switched_off(chain: DevChain, database: str) -> None:
    with running_service(chain, database) as (_service, url):
        c = BatchBookClient(url, [], batch=False)
        ws = c.ws
        for req in ({"op": "options", "batch": "yes", "id": 1}, {"op": "options", "batch": 1, "id": 2},
                    {"op": "options", "id": 3}, {"op": "options", "batch": True, "compress": True, "id": 4}):
            ws.send(json.dumps(req))
            err = json.loads(ws.recv(timeout=5))
            assert (err["type"], err["code"], err["id"]) == ("error", "invalid_option", req["id"]), req
        ws.send(json.dumps({"op": "ping", "id": 5}))
        assert json.loads(ws.recv(timeout=5)) == {"type": "pong", "id": 5}  # a refused option changed nothing
        ws.send(json.dumps({"op": "options", "batch": True, "id": 6}))
        assert json.loads(ws.recv(timeout=5)) == [{"type": "options", "id": 6, "batch": True}]
        ws.send(json.dumps({"op": "ping", "id": 7}))
        assert json.loads(ws.recv(timeout=5)) == [{"type": "pong", "id": 7}]
        ws.send(json.dumps({"op": "options", "batch": False, "id": 8}))
        assert json.loads(ws.recv(timeout=5)) == {"type": "options", "id": 8, "batch": False}
        ws.send(json.dumps({"op": "ping", "id": 9}))
        assert json.loads(ws.recv(timeout=5)) == {"type": "pong", "id": 9}
        c.close()
