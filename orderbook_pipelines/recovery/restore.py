"""Books at a block from snapshots plus the stored event stream: restore (the live cold start), new snapshots,
and verification against a full replay.

A market's latest verified snapshot at or before the block (its block hash must still be the stored one and
its orders must rebuild to its recorded state hash) plus the stored events since costs O(resting orders + new
events) instead of O(history). Anything doubtful falls back to a full replay of the stored stream, which is
the definition of the book; the orders projection is not used: it is the latest state, not the state at the
block. Every block asked for must be within the ingested frontier (storage/checkpoints.py)."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

from sqlalchemy import Connection, Engine, text

from orderbook_pipelines.book.model import BUY, SELL, Book
from orderbook_pipelines.book.replay import CanonicalEvent, MarketReplay, ReplayError, replay
from orderbook_pipelines.gc_pause import gc_paused
from orderbook_pipelines.recovery.snapshots import MarketSnapshot, checksum, replay_from_orders, snapshot_of
from orderbook_pipelines.recovery.store import latest_snapshots, load_orders, load_snapshot_books, read_parquet
from orderbook_pipelines.storage.checkpoints import NotIngested, within_frontier
from orderbook_pipelines.storage.events import stored_events
from orderbook_pipelines.storage.registry import market_names


@dataclass
class BooksAt:
    """Books of several markets at one block, and how each was obtained."""

    block: int
    books: dict[int, MarketReplay]
    base: dict[int, int | None]  # snapshot block used (None: full replay)
    events: int
    fallbacks: dict[int, str] = field(default_factory=dict)  # market -> why its snapshot(s) were not used


def books_at(conn: Connection, block: int, market_ids: list[int] | None = None, chain_id: int | None = None,
             use_snapshots: bool = True, strictly_before: bool = False, strict: bool = False,
             traders: bool = True) -> BooksAt:
    """Latest usable snapshot per market (verified) plus stored events after it, up to `block` inclusive.

    `traders=False` leaves `MarketReplay.traders` of restored orders empty: only new snapshots need them.
    """
    names = market_names(conn, chain_id, market_ids)
    ids = sorted(names)
    stored_hash: dict[int, str] = {}
    if use_snapshots and ids:
        snaps = latest_snapshots(conn, ids, block, strictly_before)
        blocks_needed = sorted({s.block_number for lst in snaps.values() for s in lst[:3]})
        stored_hash = dict(conn.execute(
            text("SELECT number, hash FROM blocks WHERE number = ANY(:n) "
                 "AND (CAST(:c AS bigint) IS NULL OR chain_id = :c)"),
            {"n": blocks_needed, "c": chain_id}).all())
    else:
        snaps = {}
    books: dict[int, MarketReplay] = {}
    base: dict[int, int | None] = {}
    fallbacks: dict[int, str] = {}
    candidates = {mid: snaps.get(mid, [])[:3] for mid in ids}  # the newest few: an older one beats a full replay
    first = {mid: s.block_number for mid, lst in candidates.items()
             for s in lst[:1] if stored_hash.get(s.block_number) == s.block_hash}
    with gc_paused():
        loaded = load_snapshot_books(conn, first, traders)
        for mid in ids:
            base[mid] = None
            books[mid] = MarketReplay(strict=strict)
            for s in candidates[mid]:
                if stored_hash.get(s.block_number) != s.block_hash:
                    fallbacks[mid] = f"snapshot at {s.block_number} is on block hash {s.block_hash[:10]}, " \
                                     f"stored block is {str(stored_hash.get(s.block_number))[:10]}"
                    continue
                mr = loaded.pop(mid, None) if first.get(mid) == s.block_number else None
                if mr is None:
                    try:
                        mr = replay_from_orders(load_orders(conn, mid, s.block_number), traders)
                    except ValueError as exc:  # InvalidEvent, or an amount that is not an integer
                        fallbacks[mid] = f"snapshot at {s.block_number} has an invalid order: {exc}"
                        continue
                if mr.book.state_hash() != s.state_hash:
                    fallbacks[mid] = f"snapshot at {s.block_number} does not rebuild to its state hash"
                    continue
                mr.strict = strict
                books[mid], base[mid] = mr, s.block_number
                break
            else:
                if snaps.get(mid):
                    fallbacks.setdefault(mid, "no usable snapshot")
    groups: dict[int, list[int]] = defaultdict(list)
    for mid in ids:
        groups[-1 if base[mid] is None else base[mid]].append(mid)  # type: ignore[index]
    events = 0
    for after, mids in sorted(groups.items()):
        by_name = {names[m]: books[m] for m in mids}
        res = replay(stored_events(conn, after_block=after, to_block=block, market_ids=mids, chain_id=chain_id),
                     strict=strict, books=by_name, hashes=False)
        events += res.events
        unknown = set(res.books) - set(by_name)
        if unknown:
            raise ReplayError(f"events of unexpected market(s) {sorted(unknown)}")
    return BooksAt(block, books, base, events, fallbacks)


def block_header(conn: Connection, block: int, chain_id: int | None = None) -> tuple[str, datetime]:
    row = conn.execute(
        text("SELECT hash, block_time FROM blocks WHERE number = :b AND (CAST(:c AS bigint) IS NULL OR chain_id = :c)"),
        {"b": block, "c": chain_id},
    ).first()
    if row is None:
        raise NotIngested(f"block {block} has no stored header: snapshots are taken at range boundaries "
                          "(run `orderbook snapshot create` without --block for the latest checkpoint)")
    return row.hash, row.block_time


def resolve_chain(conn: Connection, chain_id: int | None) -> int:
    if chain_id is not None:
        return chain_id
    ids = [r[0] for r in conn.execute(text("SELECT DISTINCT chain_id FROM ingestion_checkpoints"))]
    if len(ids) != 1:
        raise NotIngested(f"expected exactly one ingested chain, found {ids or 'none'}; pass the chain id")
    return int(ids[0])


def build_snapshots(engine: Engine, at_block: int | None = None, chain_id: int | None = None,
                    start_block: int | None = None, incremental: bool = True) -> tuple[list[MarketSnapshot], BooksAt]:
    """Every market's snapshot at `at_block` (default: the ingested frontier), not yet stored."""
    with engine.connect() as conn:
        cid = resolve_chain(conn, chain_id)
        at = within_frontier(conn, at_block, cid, start_block)
        block_hash, block_time = block_header(conn, at, cid)
        b = books_at(conn, at, chain_id=cid, use_snapshots=incremental, strictly_before=True)
        names = market_names(conn, cid)
    snaps = [snapshot_of(mr, mid, names[mid], at, block_hash, block_time, b.base[mid]) for mid, mr in b.books.items()]
    return snaps, b




# -- restore / verify -----------------------------------------------------------------------------------------
def restore_books(engine: Engine, at_block: int | None = None, chain_id: int | None = None,
                  market_ids: list[int] | None = None) -> dict[int, tuple[Book, int]]:
    """Cold start: per market, the book at `at_block` (default: the ingested frontier) and that block number.

    Built from the latest verified snapshot <= the block plus the stored events after it; a market without a
    usable snapshot is replayed from its first event.
    """
    books, _ = restore(engine, at_block, chain_id, market_ids, traders=False)
    return {m: (mr.book, b) for m, (mr, b) in books.items()}


def restore(engine: Engine, at_block: int | None = None, chain_id: int | None = None,
            market_ids: list[int] | None = None, strict: bool = False, use_snapshots: bool = True,
            traders: bool = True) -> tuple[dict[int, tuple[MarketReplay, int]], BooksAt]:
    with engine.connect() as conn:
        at = within_frontier(conn, at_block, chain_id)
        b = books_at(conn, at, market_ids, chain_id, use_snapshots=use_snapshots, strict=strict, traders=traders)
    return {m: (mr, at) for m, mr in b.books.items()}, b


@dataclass
class VerifyReport:
    snapshots: int = 0
    objects: int = 0
    markets: int = 0
    block: int | None = None
    problems: list[str] = field(default_factory=list)


def verify(engine: Engine, root: Path, at_block: int | None = None) -> VerifyReport:
    """Every stored snapshot (row and object) against one strict full replay, and the restored books at the
    frontier (or `at_block`) against the full replay there."""
    rep = VerifyReport()
    with engine.connect() as conn:
        frontier = within_frontier(conn, None)
        at = frontier if at_block is None else min(at_block, frontier)
        rep.block = at
        names = market_names(conn)
        rows = conn.execute(
            text("SELECT market_id, block_number, state_hash, checksum, parquet_key FROM depth_snapshots "
                 "WHERE block_number <= :b ORDER BY block_number, market_id"), {"b": at}).all()
        pending = list(rows)
        books: dict[str, MarketReplay] = {}

        def check_upto(block: int) -> None:
            while pending and pending[0].block_number <= block:
                r = pending.pop(0)
                mr = books.get(names[r.market_id]) or MarketReplay()
                n = len(mr.book.orders) + 1
                want_hash, want_ck = mr.book.state_hash(), checksum(mr.book.levels(BUY, n), mr.book.levels(SELL, n))
                rep.snapshots += 1
                where = f"snapshot market {names[r.market_id]} block {r.block_number}"
                if (r.state_hash, int(r.checksum)) != (want_hash, want_ck):
                    rep.problems.append(f"{where}: stored {r.state_hash[:12]}/{r.checksum}, "
                                        f"replay gives {want_hash[:12]}/{want_ck}")
                if r.parquet_key:
                    path = root / r.parquet_key
                    if not path.exists():
                        rep.problems.append(f"{where}: object {path} is missing")
                        continue
                    meta, orders = read_parquet(path)
                    got = replay_from_orders(orders).book.state_hash()
                    rep.objects += 1
                    if got != want_hash or meta.get("state_hash") != want_hash or meta.get("checksum") != str(want_ck):
                        rep.problems.append(f"{where}: object {r.parquet_key} differs from the replay")

        last_block = -1
        stream = stored_events(conn, to_block=at)

        def with_checks() -> Iterable[CanonicalEvent]:
            nonlocal last_block
            for ev in stream:
                if ev.block_number != last_block:
                    if last_block >= 0:
                        for mr in books.values():  # end the previous block before comparing state
                            mr.end_block(last_block)
                    check_upto(ev.block_number - 1)
                    last_block = ev.block_number
                yield ev

        full = replay(with_checks(), strict=True, books=books)
        check_upto(at)
        restored, _ = restore(engine, at)
        rep.markets = len(restored)
        for mid, (mr, _b) in restored.items():
            want = full.books[names[mid]].book.state_hash() if names[mid] in full.books else Book().state_hash()
            if mr.book.state_hash() != want:
                rep.problems.append(f"market {names[mid]}: restored state {mr.book.state_hash()[:12]} != full replay "
                                    f"{want[:12]} at block {at}")
    return rep
