"""End to end on a real chain: 5,000 simulated orders over 12 markets, materialized by Dagster into Postgres,
then checked against the contracts' own view functions and against logs decoded independently by web3."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Iterator

import pytest
from dagster import DagsterInstance, materialize
from sqlalchemy import text
from web3 import Web3

from orderbook_pipelines.assets.ingestion import ingestion_assets
from orderbook_pipelines.book.model import BUY, SELL, Book, BookEvent
from orderbook_pipelines.devchain.deploy import artifact
from orderbook_pipelines.ingestion.ingest import ingest_range
from orderbook_pipelines.ingestion.ranges import range_key, ranges_up_to
from orderbook_pipelines.partitions import block_ranges
from orderbook_pipelines.resources import ChainResource, PostgresResource, SettingsResource
from orderbook_pipelines.storage.db import drop_database, engine_for
from tests.conftest import DevChain, new_database

STATUS = {1: {"open", "partially_filled"}, 2: {"filled"}, 3: {"cancelled"}}


def _ranges(chain: DevChain) -> list[tuple[int, int]]:
    c = chain.config.chain
    safe = chain.anvil.w3.eth.block_number - c.confirmations
    return ranges_up_to(c.start_block, c.range_size, safe)  # the last one is open: processed up to `safe`


def _resources(chain: DevChain, db: str) -> dict[str, object]:
    settings = SettingsResource(config_path=str(chain.config_path))
    return {"settings": settings, "chain": ChainResource(settings=settings),
            "postgres": PostgresResource(database_url=db)}


@pytest.fixture(scope="module")
def indexed(simulated_chain: DevChain) -> Iterator[str]:
    """The whole simulated history materialized through Dagster, range by range, in one ephemeral instance."""
    db = new_database()
    instance = DagsterInstance.ephemeral()
    keys = [range_key(a, b) for a, b in _ranges(simulated_chain)]
    instance.add_dynamic_partitions(block_ranges.name, keys)
    resources = _resources(simulated_chain, db)
    for key in keys:
        result = materialize(ingestion_assets, partition_key=key, instance=instance, resources=resources)
        assert result.success, key
    yield db
    drop_database(db)


def _table(db: str, sql: str) -> list[tuple]:
    with engine_for(db).connect() as conn:
        return [tuple(r) for r in conn.execute(text(sql))]


ORDERS_SQL = ("SELECT m.metric_id, o.contract, o.order_id, o.trader, o.side, o.order_type, o.price, o.quantity, "
              "o.filled, o.remaining, o.status FROM orders o JOIN markets m USING (market_id) "
              "ORDER BY o.contract, o.order_id")
TRADES_SQL = ("SELECT m.metric_id, t.block_number, t.log_index, t.price, t.quantity, t.buyer, t.seller "
              "FROM trades t JOIN markets m USING (market_id) ORDER BY 2, 3")
POSITIONS_SQL = ("SELECT m.metric_id, p.trader, p.net_quantity, p.bought, p.sold, p.buy_notional, p.sell_notional, "
                 "p.trade_count FROM positions p JOIN markets m USING (market_id) ORDER BY 1, 2")


def test_every_order_matches_the_contract_view(simulated_chain: DevChain, indexed: str) -> None:
    w3 = simulated_chain.anvil.w3
    dep = simulated_chain.dep
    router = w3.eth.contract(address=Web3.to_checksum_address(dep.router), abi=artifact("OrderRouter")["abi"])
    gen2_abi = artifact("AluminumOrderBook")["abi"]
    rows = _table(indexed, ORDERS_SQL)
    gen1 = [r for r in rows if r[1] == dep.router]
    gen2 = [r for r in rows if r[1] != dep.router]
    # Every order the chain knows is indexed: router ids are 1..nextOrderId-1.
    assert sorted(int(r[2]) for r in gen1) == list(range(1, router.functions.nextOrderId().call()))
    assert len(rows) >= 4500, "the simulator should have placed ~5,000 orders"
    assert {r[0] for r in gen2} == set(dep.gen2_books), "every generation-2 market has indexed orders"
    for metric, _c, oid, trader, side, otype, price, qty, filled, remaining, status in gen1:
        o = router.functions.getOrder(int(oid)).call()
        assert (o[0].lower(), o[3], o[4], o[5], o[6], o[7]) == (trader, otype, side, price, qty, filled), oid
        assert status in STATUS[o[8]], (oid, status, o[8])
        assert remaining == (qty - filled if o[8] == 1 else 0)
        assert Web3.keccak(text=metric) == o[1]
    for metric, contract, oid, trader, side, _otype, price, qty, filled, remaining, status in gen2:
        book = w3.eth.contract(address=Web3.to_checksum_address(contract), abi=gen2_abi)
        user, c_side, c_price, size, c_filled, c_status, _is_market = book.functions.getOrder(
            bytes.fromhex(oid[2:])).call()
        assert (user.lower(), c_side, c_price, size, c_filled) == (trader, side, price, qty, filled), metric
        assert status in STATUS[c_status], (oid, status, c_status)
        assert remaining == (qty - filled if c_status == 1 else 0)
    assert {r[10] for r in rows} >= {"open", "partially_filled", "filled", "cancelled"}


def test_every_trade_matches_the_trade_logs(simulated_chain: DevChain, indexed: str) -> None:
    """Trades against OrderMatched / TradeExecuted as web3's own ABI decoding reads them."""
    w3 = simulated_chain.anvil.w3
    dep = simulated_chain.dep
    expected = set()
    for metric, addr in dep.gen1_books.items():
        c = w3.eth.contract(address=Web3.to_checksum_address(addr), abi=artifact("OrderBook")["abi"])
        for ev in c.events.OrderMatched().get_logs(from_block=dep.start_block):
            a = ev["args"]
            expected.add((metric, ev["blockNumber"], ev["logIndex"], a["price"], a["quantity"], a["buyer"].lower(),
                          a["seller"].lower()))
    for metric, addr in dep.gen2_books.items():
        c = w3.eth.contract(address=Web3.to_checksum_address(addr), abi=artifact("AluminumOrderBook")["abi"])
        for ev in c.events.TradeExecuted().get_logs(from_block=dep.start_block):
            a = ev["args"]
            expected.add((metric, ev["blockNumber"], ev["logIndex"], a["price"], a["size"], a["buyer"].lower(),
                          a["seller"].lower()))
    got = _table(indexed, TRADES_SQL)
    assert len(got) == len(set(got)) == len(expected) > 1000
    assert set(got) == expected


def test_positions_net_out_and_equal_the_trades(indexed: str) -> None:
    legs: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0])
    for metric, _b, _l, _price, qty, buyer, seller in _table(indexed, TRADES_SQL):
        legs[(metric, buyer)][0] += qty
        legs[(metric, seller)][1] += qty
        legs[(metric, buyer)][2] += 1
        legs[(metric, seller)][2] += 1
    pos = {(r[0], r[1]): (r[3], r[4], r[7]) for r in _table(indexed, POSITIONS_SQL)}
    assert pos == {k: tuple(v) for k, v in legs.items()}
    for metric in {k[0] for k in pos}:
        net = sum(r[2] for r in _table(indexed, POSITIONS_SQL) if r[0] == metric)
        assert net == 0, f"{metric}: positions of a closed market must net to zero"


def test_replayed_book_equals_contract_levels(simulated_chain: DevChain, indexed: str) -> None:
    """The pure book model fed with stored events gives the contract's own top-20 levels on every market."""
    w3 = simulated_chain.anvil.w3
    dep = simulated_chain.dep
    books: dict[str, Book] = defaultdict(Book)
    for metric, kind, oid, side, otype, price, qty in _table(
        indexed,
        "SELECT m.metric_id, e.kind, e.contract || ':' || e.order_id, e.side, e.order_type, e.price, e.quantity "
        "FROM order_events e JOIN markets m USING (market_id) WHERE e.kind IN ('open','fill','cancel') "
        "ORDER BY e.block_number, e.log_index",
    ):
        books[metric].apply(BookEvent(kind, oid, side, otype, price, qty))
    markets = {**{m: (a, "OrderBook") for m, a in dep.gen1_books.items()},
               **{m: (a, "AluminumOrderBook") for m, a in dep.gen2_books.items()}}
    non_empty = 0
    for metric, (addr, name) in markets.items():
        c = w3.eth.contract(address=Web3.to_checksum_address(addr), abi=artifact(name)["abi"])
        for side in (BUY, SELL):
            prices, qtys, counts = c.functions.getLevels(side, 20).call()
            ours = books[metric].levels(side, 20)
            assert [(lv.price, lv.quantity, lv.orders) for lv in ours] == list(zip(prices, qtys, counts, strict=True))
            non_empty += bool(prices)
        assert books[metric].best(BUY) == (c.functions.bestBid().call() or None)
        assert books[metric].best(SELL) == (c.functions.bestAsk().call() or None)
    assert non_empty >= 12


def test_rerunning_a_range_changes_nothing(simulated_chain: DevChain, indexed: str) -> None:
    before = [_table(indexed, q) for q in (ORDERS_SQL, TRADES_SQL, POSITIONS_SQL,
                                           "SELECT count(*) FROM order_events")]
    instance = DagsterInstance.ephemeral()
    a, b = _ranges(simulated_chain)[1]
    instance.add_dynamic_partitions(block_ranges.name, [range_key(a, b)])
    result = materialize(ingestion_assets, partition_key=range_key(a, b), instance=instance,
                         resources=_resources(simulated_chain, indexed))
    assert result.success
    mats = {m.asset_key.to_user_string(): m for m in result.asset_materializations_for_node("ingest_block_range_op")}
    assert set(mats) == {"order_events", "trades", "orders", "positions"}  # one unit of work, four assets
    assert mats["order_events"].metadata["events"].value > 0
    assert mats["order_events"].metadata["events_inserted"].value == 0
    after = [_table(indexed, q) for q in (ORDERS_SQL, TRADES_SQL, POSITIONS_SQL, "SELECT count(*) FROM order_events")]
    assert after == before


def test_ranges_in_reverse_order_converge_to_the_same_state(simulated_chain: DevChain, indexed: str) -> None:
    from orderbook_pipelines.chain.rpc import ChainClient

    db = new_database()
    try:
        cfg = simulated_chain.config
        client = ChainClient(cfg.chain.rpc_url)
        engine = engine_for(db)
        for a, b in reversed(_ranges(simulated_chain)):
            ingest_range(cfg, client, engine, a, b)
        for q in (ORDERS_SQL, TRADES_SQL, POSITIONS_SQL):
            assert _table(db, q) == _table(indexed, q)
    finally:
        drop_database(db)


def test_ranges_ingested_concurrently_equal_the_sequential_state(simulated_chain: DevChain, indexed: str) -> None:
    """Four workers take the ranges in a shuffled order at once; the result is the sequential run's state."""
    import random
    from concurrent.futures import ThreadPoolExecutor

    from orderbook_pipelines.chain.rpc import ChainClient

    db = new_database()
    try:
        cfg = simulated_chain.config
        engine = engine_for(db)
        ranges = _ranges(simulated_chain)
        random.Random(5).shuffle(ranges)

        def work(r: tuple[int, int]) -> int:
            report = ingest_range(cfg, ChainClient(cfg.chain.rpc_url), engine, *r)
            return report.events

        with ThreadPoolExecutor(max_workers=4) as pool:
            assert sum(pool.map(work, ranges)) > 10_000
        for q in (ORDERS_SQL, TRADES_SQL, POSITIONS_SQL):
            assert _table(db, q) == _table(indexed, q)
    finally:
        drop_database(db)


def test_a_racing_writer_of_the_same_range_loses_no_event_and_duplicates_none(simulated_chain: DevChain,
                                                                               indexed: str) -> None:
    """A range with nothing committed yet is COPYed straight into order_events. If another writer holds
    uncommitted rows of that range, the COPY waits on the unique key, fails when the other commits, and the
    range falls back to the staged ON CONFLICT path inside the same transaction: no error, no duplicate."""
    import threading

    from orderbook_pipelines.chain.rpc import ChainClient

    db = new_database()
    try:
        cfg = simulated_chain.config
        engine = engine_for(db)
        a, b = _ranges(simulated_chain)[0]
        cols = "chain_id, block_number, log_index, block_hash, block_time, tx_hash, tx_index, contract, source, " \
               "event_name, kind, args"
        with engine_for(indexed).connect() as src:
            theirs = src.execute(text(f"SELECT {cols} FROM order_events WHERE block_number BETWEEN :a AND :b "
                                      "ORDER BY block_number DESC, log_index DESC LIMIT 1"), {"a": a, "b": b}).one()
            total = src.execute(text("SELECT count(*) FROM order_events WHERE block_number BETWEEN :a AND :b"),
                                {"a": a, "b": b}).scalar_one()
        with engine.begin() as conn:
            conn.execute(text("SELECT ensure_order_events_partitions(:a, :b, :w)"),
                         {"a": a, "b": b, "w": cfg.order_events_partition_blocks})
        out: dict[str, object] = {}

        def run() -> None:
            try:
                out["report"] = ingest_range(cfg, ChainClient(cfg.chain.rpc_url), engine, a, b)
            except Exception as exc:  # surfaced by the assertion below
                out["error"] = exc

        with engine.begin() as other:  # the other writer: one event of the range, not committed yet
            other.execute(text(f"INSERT INTO order_events ({cols}) VALUES "
                               "(:chain_id, :block_number, :log_index, :block_hash, :block_time, :tx_hash, :tx_index, "
                               ":contract, :source, :event_name, :kind, CAST(:args AS jsonb))"),
                          {**theirs._asdict(), "args": __import__("json").dumps(theirs.args)})
            t = threading.Thread(target=run)
            t.start()
            deadline = time.monotonic() + 60
            with engine.connect() as probe:  # until the COPY waits on our uncommitted key
                while not probe.execute(text(
                        "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                        "AND wait_event_type = 'Lock' AND query LIKE 'COPY order_events%'")).scalar_one():
                    assert time.monotonic() < deadline and t.is_alive(), f"the COPY never waited: {out}"
                    probe.rollback()  # pg_stat_activity is a snapshot per transaction
                    time.sleep(0.05)
        t.join(60)
        assert "error" not in out, out.get("error")
        report = out["report"]
        assert report.events == total > 100  # type: ignore[union-attr]
        assert report.events_inserted == total - 1  # type: ignore[union-attr]
        assert _table(db, "SELECT count(*), count(DISTINCT (block_number, log_index)) FROM order_events") == \
            [(total, total)]
        assert _table(db, f"SELECT order_id IS NULL FROM order_events WHERE block_number = {theirs.block_number} "
                          f"AND log_index = {theirs.log_index}") == [(True,)]  # the other writer's row was kept
    finally:
        drop_database(db)


def test_a_fresh_partition_has_statistics_before_the_projections_plan(simulated_chain: DevChain) -> None:
    """Without statistics the orders projection plans a nested loop, quadratic in the range (README, Performance):
    the ingesting transaction itself analyzes the partition it created, on the columns the projections use."""
    from orderbook_pipelines.chain.rpc import ChainClient

    db = new_database()
    try:
        cfg = simulated_chain.config
        a, b = _ranges(simulated_chain)[0]
        with engine_for(db).begin() as conn:  # still uncommitted: autovacuum cannot have analyzed anything
            # The caller's own settings (a repair's transaction, say): ingestion's planner settings (the planning
            # sample of writer._PLANNING_STATISTICS_TARGET, no parallel workers in the projections) end with the
            # statements they are for, and give back these, not the server's defaults.
            conn.execute(text("SET LOCAL default_statistics_target = 37"))
            conn.execute(text("SET LOCAL max_parallel_workers_per_gather = 1"))
            ingest_range(cfg, ChainClient(cfg.chain.rpc_url), engine_for(db), a, b, conn=conn)
            cols = {r[0] for r in conn.execute(text(
                "SELECT attname FROM pg_stats WHERE tablename LIKE 'order_events_b%'"))}
            assert conn.execute(text("SHOW default_statistics_target")).scalar_one() == "37"
            assert conn.execute(text("SHOW max_parallel_workers_per_gather")).scalar_one() == "1"
        assert {"chain_id", "block_number", "kind", "contract", "order_id", "market_id"} <= cols
    finally:
        drop_database(db)


def test_parallel_backfill_workers_equal_the_sequential_state(simulated_chain: DevChain, indexed: str) -> None:
    """`orderbook ingest --workers 2`: ranges in two processes, outcomes reported in range order, same state."""
    from orderbook_pipelines.ingestion.backfill import run_ranges

    db = new_database()
    try:
        ranges = _ranges(simulated_chain)
        outs = list(run_ranges(simulated_chain.config, db, ranges, workers=2))
        assert [(o.start, o.end) for o in outs] == ranges
        assert all(o.report is not None and o.report.processed_to >= o.start for o in outs)
        assert sum(o.report.events_inserted for o in outs if o.report) == \
            _table(indexed, "SELECT count(*) FROM order_events")[0][0]
        for q in (ORDERS_SQL, TRADES_SQL, POSITIONS_SQL):
            assert _table(db, q) == _table(indexed, q)
    finally:
        drop_database(db)


def test_parallel_backfill_surfaces_a_workers_rpc_failure_and_writes_nothing(simulated_chain: DevChain) -> None:
    """A worker process that cannot reach the node fails the whole run with the RPC's own words, not a hang or a
    pickling error, and nothing half-written is left behind."""
    from orderbook_pipelines.chain.rpc import RpcError
    from orderbook_pipelines.ingestion.backfill import run_ranges

    cfg = simulated_chain.config
    dead = cfg.model_copy(update={"chain": cfg.chain.model_copy(
        update={"rpc_url": "http://127.0.0.1:9", "rpc_retries": 0, "rpc_timeout_s": 2})})
    db = new_database()
    try:
        with pytest.raises(RpcError, match="eth_blockNumber"):
            list(run_ranges(dead, db, _ranges(simulated_chain)[:3], workers=2))
        assert _table(db, "SELECT count(*) FROM order_events") == [(0,)]
        assert _table(db, "SELECT count(*) FROM ingestion_checkpoints") == [(0,)]
    finally:
        drop_database(db)
