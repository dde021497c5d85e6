"""Snapshot persistence: rows in Postgres (depth_snapshots, snapshot_orders) and Parquet objects in a folder.

The bulk loader is the cold-start path at a million orders: one query for every market's snapshot, split and
int-converted in bulk."""

from __future__ import annotations

import io
import os
import time
from collections import defaultdict
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import polars as pl
import psycopg
from sqlalchemy import Connection, Engine, text

from orderbook_pipelines.book.replay import MarketReplay
from orderbook_pipelines.recovery.snapshots import MarketSnapshot, SnapshotOrder
from orderbook_pipelines.storage.events import order_key_sql


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
