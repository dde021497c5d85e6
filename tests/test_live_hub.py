"""Fan-out policy of the hub, exercised directly on the event loop: one serialization per delta, per-level
coalescing, pause/resume catch-up, and the slow-consumer ladder (conflate to a snapshot, then disconnect)."""

from __future__ import annotations

import asyncio
import json

from orderbook_pipelines.live.follower import Update
from orderbook_pipelines.live.hub import Conn, Hub, Limits
from orderbook_pipelines.live.state import MarketView


def view(seq: int, bids: list[tuple[int, int]], asks: tuple[tuple[int, int], ...] | list = ()) -> MarketView:
    return MarketView(1, seq, 100 + seq, f"0x{seq:064x}", tuple(bids), tuple(asks))


def drain(conn: Conn) -> list:
    out = []
    while not conn.queue.empty():
        out.append(conn.queue.get_nowait())
    return out


def make_hub(limits: Limits | None = None) -> Hub:
    hub = Hub(limits or Limits())
    hub.set_markets({1: "SILVER_V1"}, {1})
    hub.on_update(Update("reset", [view(0, [(100, 5)], [(101, 5)])]))
    return hub


def test_one_serialization_is_shared_by_every_subscriber() -> None:
    async def run() -> None:
        hub = make_hub()
        a, b = Conn(hub, "a", hub.limits), Conn(hub, "b", hub.limits)
        hub.subscribe_book(a, 1, 20, 0)
        hub.subscribe_book(b, 1, 20, 0)
        hub.on_update(Update("block", [view(1, [(100, 7)], [(101, 5)])]))
        (da,), (db,) = drain(a), drain(b)
        assert da is db  # the very same string object, serialized once
        msg = json.loads(da)
        assert (msg["type"], msg["seq"], msg["prev_seq"]) == ("delta", 1, 0)
        assert (msg["bids"], msg["asks"]) == ([["100", "7"]], [])

    asyncio.run(run())


def test_levels_leaving_the_window_are_removed_and_entering_ones_added() -> None:
    async def run() -> None:
        hub = make_hub()
        c = Conn(hub, "c", hub.limits)
        hub.subscribe_book(c, 1, 20, 0)
        bids = [(1000 - i, 1) for i in range(20)]
        hub.on_update(Update("block", [view(1, bids)]))
        drain(c)
        hub.on_update(Update("block", [view(2, [(2000, 3), *bids])]))  # a better bid pushes 981 out of the top 20
        msg = json.loads(drain(c)[0])
        assert sorted(msg["bids"]) == sorted([["2000", "3"], ["981", "0"]])

    asyncio.run(run())


def test_coalescing_merges_changes_per_level_within_the_window() -> None:
    async def run() -> None:
        hub = make_hub()
        c = Conn(hub, "c", hub.limits)
        hub.subscribe_book(c, 1, 20, 1000)
        drain(c)
        hub.on_update(Update("block", [view(1, [(100, 7)], [(101, 5)])]))
        hub.on_update(Update("block", [view(2, [(100, 9), (99, 1)], [(101, 5)])]))
        hub.on_update(Update("block", [view(3, [(100, 9)], [(101, 5)])]))  # 99 came and went inside the window
        assert drain(c) == []
        ch = hub.channels[(1, 20, 1000)]
        hub.flush_due(now=ch.flushed_at + 1.0)
        (text,) = drain(c)
        msg = json.loads(text)
        assert (msg["prev_seq"], msg["seq"], msg["bids"], msg["asks"]) == (0, 3, [["100", "9"]], [])

    asyncio.run(run())


def test_paused_market_publishes_nothing_then_one_catch_up_delta() -> None:
    async def run() -> None:
        hub = make_hub()
        c = Conn(hub, "c", hub.limits)
        hub.subscribe_book(c, 1, 20, 0)
        hub.set_paused(1, True)
        hub.on_update(Update("block", [view(1, [(100, 6)], [(101, 5)])]))
        hub.on_update(Update("block", [view(2, [(100, 8)], [(102, 1)])]))
        assert drain(c) == []
        hub.set_paused(1, False)
        (text,) = drain(c)
        msg = json.loads(text)
        assert (msg["prev_seq"], msg["seq"]) == (0, 2)
        assert sorted(msg["asks"]) == [["101", "0"], ["102", "1"]]

    asyncio.run(run())


def test_slow_consumer_is_conflated_to_a_snapshot_then_disconnected() -> None:
    async def run() -> None:
        hub = make_hub(Limits(queue_size=4, max_conflations=2))
        slow, fast = Conn(hub, "slow", hub.limits), Conn(hub, "fast", hub.limits)
        hub.subscribe_book(slow, 1, 20, 0)
        hub.subscribe_book(fast, 1, 20, 0)
        seq = 0

        def blocks(n: int) -> None:
            nonlocal seq
            for _ in range(n):
                seq += 1
                hub.on_update(Update("block", [view(seq, [(100, seq)], [(101, 5)])]))
            drain(fast)  # the fast client keeps up

        blocks(4)
        assert slow.queue.full()
        blocks(1)  # overflow 1: backlog dropped, a fresh snapshot queued instead
        (resync,) = drain(slow)
        snap = json.loads(resync)
        assert (snap["type"], snap["resync"], snap["seq"]) == ("snapshot", True, seq)
        blocks(5)  # overflow 2
        drain(slow)
        blocks(5)  # overflow 3 > max_conflations: disconnect
        assert slow.closing
        (close,) = drain(slow)
        assert close[:2] == ("slow_consumer", 4008)
        blocks(3)
        assert drain(slow) == []  # nothing more is queued for a closing client: memory stays bounded
        assert not fast.closing

    asyncio.run(run())


def test_batch_frame_packs_queued_messages_up_to_the_byte_bound_without_reserializing() -> None:
    async def run() -> None:
        hub = make_hub(Limits(max_batch_bytes=64))
        c = Conn(hub, "c", hub.limits)
        msgs = [f'{{"n":{i},"pad":"{"x" * 10}"}}' for i in range(9)] + ['{"big":"' + "y" * 100 + '"}', '{"é":1}']
        for m in msgs:
            c.send(m)
        frames, item = [], c.queue.get_nowait()
        while item is not None:
            frame, item = c.batch_frame(item)
            frames.append(frame)
            if item is None and not c.queue.empty():
                item = c.queue.get_nowait()
        assert [m for f in frames for m in json.loads(f)] == [json.loads(m) for m in msgs]  # order kept
        assert all(f == "[" + ",".join(msgs[i : i + len(json.loads(f))]) + "]" for i, f in  # joined, as sent
                   zip([sum(len(json.loads(g)) for g in frames[:k]) for k in range(len(frames))], frames, strict=True))
        sizes = [(len(json.loads(f)), len(f.encode())) for f in frames]
        assert all(size <= 64 for n, size in sizes if n > 1)
        assert (1, len(msgs[9]) + 2) in sizes  # the one message longer than the bound goes alone
        assert [n for n, _ in sizes] == [2, 2, 2, 2, 1, 1, 1]  # 25-byte messages: two per 64-byte frame

    asyncio.run(run())
