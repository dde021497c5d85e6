"""Depth snapshots on a real chain: every stored snapshot equals the contract's own view at its block, the
incremental build equals a full replay, Parquet objects mirror the rows, retention keeps what it promises."""

from __future__ import annotations

import random
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path

import polars as pl
import pytest
from dagster import DagsterInstance, materialize
from sqlalchemy import text
from web3 import Web3

from orderbook_pipelines.assets.ingestion import ingestion_assets
from orderbook_pipelines.assets.snapshots import snapshot_assets
from orderbook_pipelines.book.model import BUY, SELL, Book
from orderbook_pipelines.devchain.deploy import artifact
from orderbook_pipelines.ingestion.ingest import ingest_range
from orderbook_pipelines.ingestion.ranges import range_key, ranges_up_to
from orderbook_pipelines.partitions import block_ranges
from orderbook_pipelines.recovery.restore import books_at, build_snapshots, restore_books
from orderbook_pipelines.recovery.retention import RetentionPolicy, apply_retention, expired
from orderbook_pipelines.recovery.snapshots import replay_from_orders
from orderbook_pipelines.recovery.store import load_orders, load_snapshot_books, store_snapshots
from orderbook_pipelines.resources import ChainResource, PostgresResource, SettingsResource, SnapshotStoreResource
from orderbook_pipelines.storage.db import drop_database, engine_for
from tests.conftest import DevChain, new_database


@dataclass
class Indexed:
    db: str
    root: Path
    metadata: list[dict]


def _ranges(chain: DevChain) -> list[tuple[int, int]]:
    c = chain.config.chain
    return ranges_up_to(c.start_block, c.range_size, chain.anvil.w3.eth.block_number - c.confirmations)


@pytest.fixture(scope="module")
def snapshotted(simulated_chain: DevChain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Indexed]:
    """Ingestion + depth snapshots materialized by Dagster, range by range, no retention."""
    db = new_database()
    root = tmp_path_factory.mktemp("objectstore")
    instance = DagsterInstance.ephemeral()
    keys = [range_key(a, b) for a, b in _ranges(simulated_chain)]
    instance.add_dynamic_partitions(block_ranges.name, keys)
    settings = SettingsResource(config_path=str(simulated_chain.config_path))
    resources = {"settings": settings, "chain": ChainResource(settings=settings),
                 "postgres": PostgresResource(database_url=db),
                 "snapshot_store": SnapshotStoreResource(root=str(root), keep_last=10_000)}
    metadata = []
    for key in keys:
        result = materialize([*ingestion_assets, *snapshot_assets], partition_key=key, instance=instance,
                             resources=resources)
        assert result.success, key
        mat = result.asset_materializations_for_node("depth_snapshots")[0]
        metadata.append({k: v.value for k, v in mat.metadata.items()})
    yield Indexed(db, root, metadata)
    drop_database(db)


def _rows(db: str, sql: str, **params: object) -> list[tuple]:
    with engine_for(db).connect() as conn:
        return [tuple(r) for r in conn.execute(text(sql), params)]


def _contracts(chain: DevChain) -> dict[str, object]:
    w3 = chain.anvil.w3
    out = {}
    for metric, addr in chain.dep.gen1_books.items():
        out[metric] = w3.eth.contract(address=Web3.to_checksum_address(addr), abi=artifact("OrderBook")["abi"])
    for metric, addr in chain.dep.gen2_books.items():
        out[metric] = w3.eth.contract(address=Web3.to_checksum_address(addr), abi=artifact("AluminumOrderBook")["abi"])
    return out


def _chain_levels(contract: object, side: int, n: int, block: int) -> list[tuple[int, int, int]]:
    prices, qtys, counts = contract.functions.getLevels(side, n).call(block_identifier=block)  # type: ignore[attr-defined]
    return list(zip(prices, qtys, counts, strict=True))


def test_every_snapshot_equals_the_contract_view_at_its_block(simulated_chain: DevChain, snapshotted: Indexed) -> None:
    contracts = _contracts(simulated_chain)
    rows = _rows(snapshotted.db, "SELECT m.metric_id, s.block_number, s.block_hash, s.levels, s.checksum, s.orders "
                                 "FROM depth_snapshots s JOIN markets m USING (market_id) ORDER BY 2, 1")
    blocks = sorted({r[1] for r in rows})
    assert len(blocks) == len(_ranges(simulated_chain)) >= 5
    assert {r[0] for r in rows} == set(contracts)
    w3 = simulated_chain.anvil.w3
    non_empty = 0
    for metric, block, block_hash, levels, ck, n_orders in rows:
        assert block_hash == "0x" + w3.eth.get_block(block)["hash"].hex().removeprefix("0x")
        c = contracts[metric]
        bids, asks = _chain_levels(c, BUY, 1000, block), _chain_levels(c, SELL, 1000, block)
        assert [(int(p), int(q), n) for p, q, n in levels["bids"]] == bids, (metric, block)
        assert [(int(p), int(q), n) for p, q, n in levels["asks"]] == asks, (metric, block)
        # the checksum, computed here from the contract's own top 25 levels
        parts = []
        for i in range(25):
            parts += [f"{bids[i][0]}:{bids[i][1]}"] if i < len(bids) else []
            parts += [f"{asks[i][0]}:{asks[i][1]}"] if i < len(asks) else []
        assert ck == zlib.crc32(":".join(parts).encode())
        assert n_orders == sum(lv[2] for lv in bids + asks)
        non_empty += bool(bids or asks)
    assert non_empty > len(rows) // 2


def test_snapshot_orders_at_the_last_block_equal_the_orders_projection(snapshotted: Indexed) -> None:
    last = _rows(snapshotted.db, "SELECT max(block_number) FROM depth_snapshots")[0][0]
    cols = "market_id, contract, order_id, trader, side, price, quantity, filled, remaining"
    snap = _rows(snapshotted.db, f"SELECT {cols} FROM snapshot_orders WHERE block_number = :b ORDER BY 2, 3", b=last)
    proj = _rows(snapshotted.db, f"SELECT {cols} FROM orders WHERE status IN ('open','partially_filled') ORDER BY 2, 3")
    assert len(snap) > 100
    assert snap == proj


def test_resting_orders_at_a_middle_boundary_equal_the_router_view(simulated_chain: DevChain,
                                                                   snapshotted: Indexed) -> None:
    w3 = simulated_chain.anvil.w3
    router = w3.eth.contract(address=Web3.to_checksum_address(simulated_chain.dep.router),
                             abi=artifact("OrderRouter")["abi"])
    blocks = [r[0] for r in _rows(snapshotted.db, "SELECT DISTINCT block_number FROM depth_snapshots ORDER BY 1")]
    block = blocks[len(blocks) // 2]
    expected = set()
    for oid in range(1, router.functions.nextOrderId().call(block_identifier=block)):
        o = router.functions.getOrder(oid).call(block_identifier=block)
        if o[8] == 1:  # open
            expected.add((str(oid), o[0].lower(), o[4], o[5], o[6], o[7]))
    got = set(_rows(snapshotted.db, "SELECT order_id, trader, side, price, quantity, filled FROM snapshot_orders "
                                    "WHERE block_number = :b AND contract = :r", b=block, r=simulated_chain.dep.router))
    assert len(expected) > 50
    assert got == expected


def test_incremental_snapshots_equal_a_full_replay(snapshotted: Indexed) -> None:
    engine = engine_for(snapshotted.db)
    stored = _rows(snapshotted.db, "SELECT market_id, block_number, state_hash, checksum, base_block "
                                   "FROM depth_snapshots ORDER BY 2, 1")
    last = stored[-1][1]
    assert all(r[4] is not None for r in stored if r[1] > stored[0][1]), "later ranges build on earlier snapshots"
    for block in sorted({r[1] for r in stored})[-3:]:
        full, info = build_snapshots(engine, block, incremental=False)
        assert set(info.base.values()) == {None}
        assert {(s.market_id, s.state_hash, s.checksum) for s in full} == {
            (r[0], r[2], r[3]) for r in stored if r[1] == block}
    assert snapshotted.metadata[-1]["markets"] == 12
    assert snapshotted.metadata[-1]["orders"] == _rows(
        snapshotted.db, "SELECT sum(orders) FROM depth_snapshots WHERE block_number = :b", b=last)[0][0]
    assert snapshotted.metadata[-1]["incremental_markets"] == 12
    assert all(m["bytes"] > 0 and m["seconds"] >= 0 for m in snapshotted.metadata)


def test_parquet_objects_mirror_the_rows(snapshotted: Indexed) -> None:
    heads = _rows(snapshotted.db, "SELECT market_id, block_number, state_hash, checksum, parquet_key, parquet_bytes "
                                  "FROM depth_snapshots ORDER BY 2, 1")
    for mid, block, state_hash, ck, key, size in heads[-24:]:
        path = snapshotted.root / "snapshots" / f"market={mid}" / f"block={block}.parquet"
        assert key == f"snapshots/market={mid}/block={block}.parquet" and path.stat().st_size == size
        meta = pl.read_parquet_metadata(path)
        assert (meta["state_hash"], meta["checksum"], meta["block_number"]) == (state_hash, str(ck), str(block))
        df = pl.read_parquet(path)
        assert df.schema["price"] == pl.String and df.schema["quantity"] == pl.String  # uint256: never floats
        got = sorted((r["contract"], r["order_id"], r["trader"], r["side"], int(r["price"]), int(r["quantity"]),
                      int(r["filled"]), int(r["remaining"])) for r in df.iter_rows(named=True))
        want = _rows(snapshotted.db, "SELECT contract, order_id, trader, side, price, quantity, filled, remaining "
                                     "FROM snapshot_orders WHERE market_id = :m AND block_number = :b ORDER BY 1, 2",
                     m=mid, b=block)
        assert got == sorted(want)


def test_restore_books_equals_the_contract_between_boundaries(simulated_chain: DevChain, snapshotted: Indexed) -> None:
    engine = engine_for(snapshotted.db)
    contracts = _contracts(simulated_chain)
    names = dict(_rows(snapshotted.db, "SELECT market_id, metric_id FROM markets"))
    boundaries = [r[0] for r in _rows(snapshotted.db, "SELECT DISTINCT block_number FROM depth_snapshots ORDER BY 1")]
    frontier = boundaries[-1]
    middle = boundaries[len(boundaries) // 2] + 7  # not a boundary: snapshot + 7 blocks of events
    for at in (middle, frontier, None):
        books = restore_books(engine, at)
        assert set(books) == set(names)
        for mid, (book, block) in books.items():
            assert block == (frontier if at is None else at)
            c = contracts[names[mid]]
            for side in (BUY, SELL):
                ours = [(lv.price, lv.quantity, lv.orders) for lv in book.levels(side, 50)]
                assert ours == _chain_levels(c, side, 50, block), (names[mid], block, side)


def test_a_corrupt_previous_snapshot_falls_back_to_full_replay(snapshotted: Indexed) -> None:
    engine = engine_for(snapshotted.db)
    blocks = [r[0] for r in _rows(snapshotted.db, "SELECT DISTINCT block_number FROM depth_snapshots ORDER BY 1")]
    prev, last = blocks[-2], blocks[-1]
    mid, oid, filled = _rows(snapshotted.db, "SELECT market_id, order_id, filled FROM snapshot_orders "
                                             "WHERE block_number = :b ORDER BY 1, 2 LIMIT 1", b=prev)[0]
    want = dict(_rows(snapshotted.db, "SELECT market_id, state_hash FROM depth_snapshots WHERE block_number = :b",
                      b=last))
    with engine.begin() as conn:
        conn.execute(text("UPDATE snapshot_orders SET filled = filled + 1, remaining = remaining - 1 "
                          "WHERE market_id = :m AND block_number = :b AND order_id = :o"),
                     {"m": mid, "b": prev, "o": oid})
    try:
        snaps, info = build_snapshots(engine, last)
        assert "does not rebuild to its state hash" in info.fallbacks[mid]
        assert info.base[mid] != prev  # an older verified snapshot or a full replay, never the corrupt one
        assert {s.market_id: s.state_hash for s in snaps} == want
    finally:
        with engine.begin() as conn:
            conn.execute(text("UPDATE snapshot_orders SET filled = :f, remaining = remaining + 1 "
                              "WHERE market_id = :m AND block_number = :b AND order_id = :o"),
                         {"m": mid, "b": prev, "o": oid, "f": filled})


def test_retention_policy_keeps_the_last_n_and_one_per_older_day() -> None:
    t0 = datetime(2026, 1, 10, 12, tzinfo=UTC)
    snaps = [(b, t0 - timedelta(hours=6 * (9 - b))) for b in range(10)]  # blocks 0..9, 6 h apart, 3 days
    # newest 3: blocks 9, 8, 7 (Jan 10 12:00, 06:00, 00:00); older: Jan 9 (3..6, keep 6), Jan 8 (0..2, keep 2)
    assert expired(snaps, RetentionPolicy(keep_last=3, keep_daily=True)) == [0, 1, 3, 4, 5]
    assert expired(snaps, RetentionPolicy(keep_last=3, keep_daily=False)) == [0, 1, 2, 3, 4, 5, 6]
    assert expired(snaps, RetentionPolicy(keep_last=20)) == []


def test_retention_deletes_rows_orders_and_objects(simulated_chain: DevChain, tmp_path: Path) -> None:
    db = new_database()
    try:
        cfg = simulated_chain.config
        from orderbook_pipelines.chain.rpc import ChainClient

        engine = engine_for(db)
        client = ChainClient(cfg.chain.rpc_url)
        for a, b in _ranges(simulated_chain)[:6]:
            r = ingest_range(cfg, client, engine, a, b)
            store_snapshots(engine, build_snapshots(engine, r.processed_to)[0], tmp_path)
        before = _rows(db, "SELECT market_id, block_number, block_time FROM depth_snapshots")
        assert len(before) == 6 * 12
        deleted = apply_retention(engine, tmp_path, RetentionPolicy(keep_last=2, keep_daily=True))
        after = _rows(db, "SELECT market_id, block_number FROM depth_snapshots ORDER BY 1, 2")
        for mid in {r[0] for r in before}:
            mine = sorted((r for r in before if r[0] == mid), key=lambda r: r[1], reverse=True)
            recent_days = {r[2].date() for r in mine[:2]}
            older_days = {r[2].date() for r in mine[2:]} - recent_days
            assert len([r for r in after if r[0] == mid]) == 2 + len(older_days)
            assert {r[1] for r in mine[:2]} <= {r[1] for r in after if r[0] == mid}
        assert deleted == len(before) - len(after) > 0
        files = sorted(tmp_path.rglob("*.parquet"))
        assert len(files) == len(after)
        assert {(int(p.parent.name.split("=")[1]), int(p.stem.split("=")[1])) for p in files} == set(after)
        assert _rows(db, "SELECT count(*) FROM snapshot_orders o WHERE NOT EXISTS (SELECT 1 FROM depth_snapshots s "
                         "WHERE s.market_id = o.market_id AND s.block_number = o.block_number)") == [(0,)]
    finally:
        drop_database(db)


# -- the bulk (one query) snapshot load against the per-order path ---------------------------------------------
def _synthetic_orders(rng: random.Random, n: int, odd_key: str | None = None) -> list[tuple]:
    """(contract, order_id, trader, side, price, quantity, filled): shared levels, amounts around and far above
    2**64, partial fills, traders that are NULL or look like the bulk path's own trader encoding."""
    prices = [1, 5, 2**64 - 1, 2**64, 2**64 + 1, 2**255]
    traders = [None, "-", "+", "+0xab", "0x" + "b" * 40, "0x" + "c" * 40]
    out = {}
    while len(out) < n:
        contract = rng.choice(["0x" + "a" * 40, "0x" + "d" * 40])
        oid = str(rng.randrange(1, 10**12))
        qty = rng.choice([rng.randrange(1, 100), rng.randrange(2**64, 2**65), rng.randrange(2**255, 2**256)])
        filled = rng.choice([0, 0, rng.randrange(qty)])
        out[(contract, oid)] = (contract, oid, rng.choice(traders), rng.randrange(2), rng.choice(prices), qty, filled)
    rows = list(out.values())
    if odd_key is not None:
        rows.append(("0x" + "a" * 40, odd_key, None, 0, 7, 3, 1))
    return rows


def _book_of(rows: list[tuple]) -> Book:
    book = Book()
    book.load_resting((f"{c}:{o}", side, p, q, f) for c, o, _t, side, p, q, f in rows)
    return book


def _order_state(book: Book) -> list[tuple]:
    return [(k, o.side, o.price, o.quantity, o.is_limit, o.filled, o.cancelled) for k, o in book.orders.items()]


def test_bulk_snapshot_load_equals_the_per_order_path(database: str) -> None:
    """Several markets, two snapshots each (the older one must not leak in), one empty snapshot, one whose order
    id holds the bulk separator (the per-order fallback), 2**256-range amounts: same orders (dict order
    included), traders, levels and state hash as `replay_from_orders(load_orders(...))`; `books_at` uses them."""
    rng = random.Random(11)
    engine = engine_for(database)
    sizes = {"BULK_MANY": 400, "BULK_EMPTY": 0, "BULK_ODD": 30, "BULK_FEW": 3}
    data: dict[int, dict[int, list[tuple]]] = {}
    with engine.begin() as conn:
        for block in (100, 200):
            conn.execute(text("INSERT INTO blocks (chain_id, number, hash, parent_hash, block_time) "
                              "VALUES (1, :n, :h, :h, now())"), {"n": block, "h": f"0x{block:064x}"})
        for name, n in sizes.items():
            mid = conn.execute(text("INSERT INTO markets (chain_id, metric_id, metric_hash, source) "
                                    "VALUES (1, :m, :h, 'test') RETURNING market_id"),
                               {"m": name, "h": f"0x{len(data):064x}"}).scalar_one()
            data[mid] = {100: _synthetic_orders(rng, n // 2 + 1),
                         200: _synthetic_orders(rng, n, "7 8" if name == "BULK_ODD" else None)}
            for block, rows in data[mid].items():
                conn.execute(text("INSERT INTO depth_snapshots (market_id, block_number, block_hash, block_time, "
                                  "checksum, state_hash, orders, levels) VALUES (:m, :b, :h, now(), 0, :s, :n, '{}')"),
                             {"m": mid, "b": block, "h": f"0x{block:064x}", "s": _book_of(rows).state_hash(),
                              "n": len(rows)})
                for c, o, t, side, p, q, f in rows:
                    conn.execute(text("INSERT INTO snapshot_orders VALUES (:m, :b, :c, :o, :t, :s, :p, :q, :f, :r)"),
                                 {"m": mid, "b": block, "c": c, "o": o, "t": t, "s": side, "p": p, "q": q, "f": f,
                                  "r": q - f})
    odd = next(m for m, d in data.items() if len(d[200]) == sizes["BULK_ODD"] + 1)
    with engine.connect() as conn:
        bulk = load_snapshot_books(conn, {m: 200 for m in data})
        lean = load_snapshot_books(conn, {m: 200 for m in data}, traders=False)
        assert set(bulk) == set(lean) == set(data)
        assert bulk[odd] is None and lean[odd] is None
        for mid in data:
            ref = replay_from_orders(load_orders(conn, mid, 200))
            assert ref.book.state_hash() == _book_of(data[mid][200]).state_hash()
            if mid == odd:
                continue
            got, thin = bulk[mid], lean[mid]
            assert got is not None and thin is not None
            assert _order_state(got.book) == _order_state(thin.book) == _order_state(ref.book)
            assert got.book.state_hash() == thin.book.state_hash() == ref.book.state_hash()
            assert list(got.traders.items()) == list(ref.traders.items()) and thin.traders == {}
        for traders in (True, False):
            b = books_at(conn, 200, chain_id=1, traders=traders)
            assert b.base == {m: 200 for m in data} and b.fallbacks == {}
            for mid, rows in data.items():
                assert sorted(_order_state(b.books[mid].book)) == sorted(_order_state(_book_of(rows[200])))
                assert len(b.books[mid].traders) == (len(rows[200]) if traders else 0)
