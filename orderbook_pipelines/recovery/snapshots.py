"""Depth snapshots: per market, the full book at a block-range boundary, in Postgres and as Parquet objects.

Built incrementally: the market's previous snapshot (verified: its block hash must still be the stored one
and its orders must rebuild to its recorded state hash) plus the stored events since, so a range costs
O(resting orders + new events) instead of O(history). Anything doubtful falls back to a full replay of the
stored stream, which is the definition of the book; the orders projection is not used because it reflects
the latest state, not the state at the snapshot block.

`restore_books` is the cold start for the live service: latest snapshot <= block plus replay of what follows.
"""

from __future__ import annotations

import io
import json
import os
import time
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

import polars as pl
import psycopg
from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import Connection, Engine, text

from orderbook_pipelines.book.checksum import book_checksum
from orderbook_pipelines.book.model import BUY, SELL, Book, Level, order_key
from orderbook_pipelines.book.replay import CanonicalEvent, MarketReplay, ReplayError, replay
from orderbook_pipelines.config import PROJECT_ROOT
from orderbook_pipelines.gc_pause import gc_paused
from orderbook_pipelines.storage.checkpoints import NotIngested, within_frontier
from orderbook_pipelines.storage.events import order_key_sql, stored_events
from orderbook_pipelines.storage.registry import market_names

CHECKSUM_DEPTH = 25


class SnapshotSettings(BaseSettings):
    """Where snapshot objects go and how many are kept (environment: OBP_SNAPSHOT_DIR, ..._KEEP_LAST, ...)."""

    model_config = SettingsConfigDict(env_prefix="OBP_SNAPSHOT_", extra="ignore")

    dir: Path = PROJECT_ROOT / ".run" / "objectstore"
    keep_last: int = 24
    keep_daily: bool = True


@dataclass(frozen=True)
class RetentionPolicy:
    """Keep the newest `keep_last` snapshots of a market, and of the older ones the last of each UTC day."""

    keep_last: int = 24
    keep_daily: bool = True


@dataclass(frozen=True, slots=True)
class SnapshotOrder:
    contract: str
    order_id: str
    trader: str | None
    side: int
    price: int
    quantity: int
    filled: int

    @property
    def remaining(self) -> int:
        return self.quantity - self.filled


@dataclass
class MarketSnapshot:
    market_id: int
    market: str
    block_number: int
    block_hash: str
    block_time: datetime
    orders: list[SnapshotOrder]
    bids: list[Level]
    asks: list[Level]
    state_hash: str
    base_block: int | None = None

    @property
    def checksum(self) -> int:
        return checksum(self.bids, self.asks)

    def levels_json(self) -> str:
        return json.dumps({"bids": [[str(lv.price), str(lv.quantity), lv.orders] for lv in self.bids],
                           "asks": [[str(lv.price), str(lv.quantity), lv.orders] for lv in self.asks]},
                          separators=(",", ":"))

    def parquet_key(self) -> str:
        return f"snapshots/market={self.market_id}/block={self.block_number}.parquet"


def checksum(bids: list[Level], asks: list[Level], depth: int = CHECKSUM_DEPTH) -> int:
    """The live protocol's checksum (book/checksum.py) of these levels."""
    return book_checksum([(lv.price, lv.quantity) for lv in bids], [(lv.price, lv.quantity) for lv in asks], depth)


def snapshot_of(mr: MarketReplay, market_id: int, market: str, block: int, block_hash: str, block_time: datetime,
                base_block: int | None) -> MarketSnapshot:
    book = mr.book
    orders = []
    for key, o in book.orders.items():
        if o.resting <= 0 or o.side is None or o.price is None or o.quantity is None:
            continue
        known = mr.traders.get(key)
        if known is not None:
            contract, order_id, trader = known
        else:  # restored without traders: the key still names the order (book.model.order_key)
            contract, _, order_id = key.partition(":")
            trader = None
        orders.append(SnapshotOrder(contract, order_id, trader, o.side, o.price, o.quantity, o.filled))
    orders.sort(key=lambda s: (s.contract, s.order_id))
    n = len(book.orders) + 1
    return MarketSnapshot(market_id, market, block, block_hash, block_time, orders, book.levels(BUY, n),
                          book.levels(SELL, n), book.state_hash(), base_block)


def replay_from_orders(orders: Iterable[SnapshotOrder], traders: bool = True) -> MarketReplay:
    """Rebuild a market's book from resting orders (bulk load: the same state as an open then a fill each)."""
    mr = MarketReplay(strict=False)
    orders = list(orders)
    mr.book.load_resting((order_key(o.contract, o.order_id), o.side, o.price, o.quantity, o.filled) for o in orders)
    if traders:
        mr.traders.update({order_key(o.contract, o.order_id): (o.contract, o.order_id, o.trader) for o in orders})
    return mr


# -- Postgres -------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoredSnapshot:
    market_id: int
    block_number: int
    block_hash: str
    state_hash: str
    checksum: int
    parquet_key: str | None


def load_orders(conn: Connection, market_id: int, block: int) -> list[SnapshotOrder]:
    # Amounts as text (int() of a string is far cheaper than of a Decimal) and positional rows: this is the
    # cold-start path, a million rows at scale.
    rows = conn.exec_driver_sql(
        "SELECT contract, order_id, trader, side, price::text, quantity::text, filled::text FROM snapshot_orders "
        "WHERE market_id = %(m)s AND block_number = %(b)s ORDER BY contract, order_id",
        {"m": market_id, "b": block},
    )
    return [SnapshotOrder(c, o, t, side, int(p), int(q), int(f)) for c, o, t, side, p, q, f in rows]


# One row per (market, snapshot): its orders as one space-separated string, so Postgres formats the amounts (on
# its own core, while Python parses the previous market) and Python splits a market with one C-level str.split
# instead of fetching a million rows. One aggregate per market keeps the fields of an order aligned; concat_ws
# with NOT NULL columns (the trader is coalesced to "+addr" / "-") yields exactly `width` fields per order;
# the order is load_orders', so both paths give the same book down to dict order.
_BULK_FIELDS = order_key_sql("o") + ", o.side, o.price, o.quantity, o.filled"
_BULK_TRADER_FIELDS = ", o.contract, o.order_id, COALESCE('+' || o.trader, '-')"
_BULK_SQL = """
    SELECT s.m, a.n, a.orders
    FROM unnest(%(m)s::integer[], %(b)s::bigint[]) AS s(m, b)
    CROSS JOIN LATERAL (
        SELECT count(*) AS n, string_agg(concat_ws(' ', {fields}), ' ' ORDER BY o.contract, o.order_id) AS orders
        FROM snapshot_orders o WHERE o.market_id = s.m AND o.block_number = s.b
    ) a
"""


def _bulk_rows(conn: Connection, sql: str, params: dict) -> Iterator[tuple[int, int, str | None]]:
    """Rows as the server produces them (psycopg single-row mode), so Python overlaps with the query. Not
    storage.db.stream_rows: a server-side cursor is planned for its first rows and made this load 1.6x slower
    (bench/live.py coldstart)."""
    raw = conn.connection.driver_connection  # psycopg 3, the one driver of the project (storage/db.py)
    assert isinstance(raw, psycopg.Connection), type(raw)
    with raw.cursor() as cur:
        yield from cur.stream(sql, params)


def load_snapshot_books(conn: Connection, snapshots: dict[int, int],
                        traders: bool = True) -> dict[int, MarketReplay | None]:
    """Books of many markets' snapshots ({market: block}) in one query: the cold-start path at a million orders.

    Equivalent to `replay_from_orders(load_orders(...))` per market (tests compare both); a market whose
    orders do not split into exactly the expected fields (a separator inside a key) maps to None, and the
    caller loads it the per-order way. `traders=False` skips what only new snapshots need (live cold start).
    """
    if not snapshots:
        return {}
    width = 8 if traders else 5
    sql = _BULK_SQL.format(fields=_BULK_FIELDS + (_BULK_TRADER_FIELDS if traders else ""))
    out: dict[int, MarketReplay | None] = {}
    for mid, n, blob in _bulk_rows(conn, sql, {"m": list(snapshots), "b": list(snapshots.values())}):
        mr = out[mid] = MarketReplay(strict=False)
        if not n:
            continue
        f = blob.split(" ") if blob else []
        if len(f) != n * width:
            out[mid] = None
            continue
        keys = f[0::width]
        try:
            mr.book.load_columns(keys, list(map(int, f[1::width])), list(map(int, f[2::width])),
                                 list(map(int, f[3::width])), list(map(int, f[4::width])))
        except ValueError:  # int() of an unexpected field, or InvalidEvent: the per-order path says which
            out[mid] = None
            continue
        if traders:
            who = [t[1:] if t[0] == "+" else None for t in f[7::width]]
            mr.traders.update(zip(keys, zip(f[5::width], f[6::width], who, strict=True), strict=True))
    return out


def latest_snapshots(conn: Connection, market_ids: list[int], at_most: int | None,
                     strictly_before: bool = False) -> dict[int, list[StoredSnapshot]]:
    """Per market, its snapshots at or before the bound, newest first (callers take the first valid one)."""
    op = "<" if strictly_before else "<="
    rows = conn.execute(
        text(f"""SELECT market_id, block_number, block_hash, state_hash, checksum, parquet_key FROM depth_snapshots
                 WHERE market_id = ANY(:ids) AND (CAST(:b AS bigint) IS NULL OR block_number {op} :b)
                 ORDER BY market_id, block_number DESC"""),
        {"ids": market_ids, "b": at_most},
    )
    out: dict[int, list[StoredSnapshot]] = defaultdict(list)
    for r in rows:
        out[r.market_id].append(StoredSnapshot(r.market_id, r.block_number, r.block_hash, r.state_hash,
                                               int(r.checksum), r.parquet_key))
    return out


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


# -- Parquet objects ------------------------------------------------------------------------------------------
_PARQUET_SCHEMA = {"contract": pl.String, "order_id": pl.String, "trader": pl.String, "side": pl.Int8,
                   "price": pl.String, "quantity": pl.String, "filled": pl.String, "remaining": pl.String}


def parquet_bytes(s: MarketSnapshot) -> bytes:
    """Resting orders as rows (amounts as decimal strings: uint256 exceeds Decimal(38)); header in metadata."""
    df = pl.DataFrame(
        [(o.contract, o.order_id, o.trader, o.side, str(o.price), str(o.quantity), str(o.filled), str(o.remaining))
         for o in s.orders],
        schema=_PARQUET_SCHEMA, orient="row",
    )
    buf = io.BytesIO()
    df.write_parquet(buf, metadata={
        "market_id": str(s.market_id), "market": s.market, "block_number": str(s.block_number),
        "block_hash": s.block_hash, "block_time": s.block_time.isoformat(), "checksum": str(s.checksum),
        "state_hash": s.state_hash, "levels": s.levels_json(), "format": "orderbook-depth-snapshot/1",
    })
    return buf.getvalue()


def read_parquet(path: Path) -> tuple[dict[str, str], list[SnapshotOrder]]:
    meta = pl.read_parquet_metadata(path)
    df = pl.read_parquet(path)
    orders = [SnapshotOrder(r["contract"], r["order_id"], r["trader"], r["side"], int(r["price"]), int(r["quantity"]),
                            int(r["filled"])) for r in df.iter_rows(named=True)]
    return meta, orders


def _write_object(root: Path, key: str, data: bytes) -> None:
    """Write-then-rename, so a reader (or a crash) never sees half an object."""
    path = root / key
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# -- store / retention ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class StoreReport:
    markets: int
    orders: int
    bytes: int
    incremental: int
    seconds: float


def store_snapshots(engine: Engine, snaps: list[MarketSnapshot], root: Path) -> StoreReport:
    """Objects first, then all rows in one transaction: rerunning a block replaces its snapshot exactly."""
    t0 = time.perf_counter()
    total = 0
    sizes = {}
    for s in snaps:
        data = parquet_bytes(s)
        _write_object(root, s.parquet_key(), data)
        sizes[s.market_id] = len(data)
        total += len(data)
    with engine.begin() as conn:
        for s in snaps:
            conn.execute(text("DELETE FROM depth_snapshots WHERE market_id = :m AND block_number = :b"),
                         {"m": s.market_id, "b": s.block_number})
            conn.execute(
                text("""INSERT INTO depth_snapshots (market_id, block_number, block_hash, block_time, checksum,
                            state_hash, orders, levels, base_block, parquet_key, parquet_bytes)
                        VALUES (:m, :b, :h, :t, :c, :s, :n, CAST(:l AS jsonb), :base, :k, :bytes)"""),
                {"m": s.market_id, "b": s.block_number, "h": s.block_hash, "t": s.block_time, "c": s.checksum,
                 "s": s.state_hash, "n": len(s.orders), "l": s.levels_json(), "base": s.base_block,
                 "k": s.parquet_key(), "bytes": sizes[s.market_id]},
            )
        raw = conn.connection.driver_connection
        assert raw is not None
        with raw.cursor() as cur, cur.copy(
            "COPY snapshot_orders (market_id, block_number, contract, order_id, trader, side, price, quantity, "
            "filled, remaining) FROM STDIN"
        ) as copy:
            for s in snaps:
                for o in s.orders:
                    copy.write_row((s.market_id, s.block_number, o.contract, o.order_id, o.trader, o.side,
                                    o.price, o.quantity, o.filled, o.remaining))
    return StoreReport(len(snaps), sum(len(s.orders) for s in snaps), total,
                       sum(1 for s in snaps if s.base_block is not None), time.perf_counter() - t0)


def expired(snapshots: list[tuple[int, datetime]], policy: RetentionPolicy) -> list[int]:
    """Blocks (of one market) the policy drops: all but the newest `keep_last` and, if `keep_daily`, the newest
    snapshot of each UTC day among the older ones."""
    ordered = sorted(snapshots, key=lambda s: s[0], reverse=True)
    # a day already represented by a recent snapshot needs no other
    days = {when.astimezone(UTC).date() for _b, when in ordered[: policy.keep_last]}
    out = []
    for block, when in ordered[policy.keep_last:]:
        day = when.astimezone(UTC).date()
        if policy.keep_daily and day not in days:
            days.add(day)
            continue
        out.append(block)
    return sorted(out)


def apply_retention(engine: Engine, root: Path, policy: RetentionPolicy,
                    market_ids: list[int] | None = None) -> int:
    """Delete expired snapshots (rows, their orders, their objects); returns how many were deleted."""
    with engine.begin() as conn:
        rows = conn.execute(
            text("SELECT market_id, block_number, block_time, parquet_key FROM depth_snapshots "
                 "WHERE CAST(:ids AS integer[]) IS NULL OR market_id = ANY(CAST(:ids AS integer[]))"),
            {"ids": market_ids},
        ).all()
        per: dict[int, list[tuple[int, datetime]]] = defaultdict(list)
        keys = {}
        for r in rows:
            per[r.market_id].append((r.block_number, r.block_time))
            keys[(r.market_id, r.block_number)] = r.parquet_key
        doomed = [(m, b) for m, lst in per.items() for b in expired(lst, policy)]
        for m, b in doomed:
            conn.execute(text("DELETE FROM depth_snapshots WHERE market_id = :m AND block_number = :b"),
                         {"m": m, "b": b})
    for m, b in doomed:  # after the commit: a missing object is harmless, a dangling row would not be
        if keys[(m, b)]:
            (root / keys[(m, b)]).unlink(missing_ok=True)
    return len(doomed)


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
