"""The money figures and the order table against an independent reading of the chain.

A seeded order flow (devchain simulator: limit and market orders, partial fills, cancels on generation-1 and
generation-2 books of the reference contracts) on anvil, ingested by the normal path. Then:

- positions (net quantity, bought, sold, buy and sell notional per market and trader) equal figures computed here
  from the trade logs as web3's own contract event decoder reads them (`get_logs`, and `process_log` on the raw
  logs of the blocks), never through the project's decoder or its trades table;
- every order placed on chain (OrderPlaced logs, and the router's order counter) is in `orders`, with the status,
  filled quantity, order type, side, price and size the contract's `getOrder` view reports at the ingested block.

The seed is in each test's id and in every assertion message: a failure names the flow that produced it.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterator
from typing import Any

import pytest
from web3 import Web3

from orderbook_pipelines.chain.rpc import ChainClient
from orderbook_pipelines.devchain.deploy import artifact
from orderbook_pipelines.devchain.simulator import Simulator
from orderbook_pipelines.ingestion.ingest import ingest_range
from orderbook_pipelines.ingestion.ranges import ranges_up_to
from orderbook_pipelines.storage.db import drop_database, engine_for
from tests.conftest import Anvil, DevChain, make_devchain, new_database
from tests.test_reconcile import _table

GEN1 = ["SILVER_V1", "GOLD_V1", "COPPER_V1"]
GEN2 = ["ALUMINUM_V1", "NICKEL_V1"]
SEEDS = [101, 202]
OPEN, FILLED, CANCELLED = 1, 2, 3  # both generations' status codes
MARKET_ORDER, LIMIT_ORDER = 0, 1


class Flow:
    """One seeded flow, ingested; `final` is the last ingested block (every view and log is read at it)."""

    def __init__(self, seed: int, chain: DevChain, db: str, final: int):
        self.seed, self.chain, self.db, self.final = seed, chain, db, final
        self.w3 = chain.anvil.w3

    def contract(self, address: str, name: str) -> Any:
        return self.w3.eth.contract(address=Web3.to_checksum_address(address), abi=artifact(name)["abi"])


@pytest.fixture(scope="module", params=SEEDS, ids=[f"seed={s}" for s in SEEDS])
def flow(request: pytest.FixtureRequest, anvil_factory: type[Anvil],
         tmp_path_factory: pytest.TempPathFactory) -> Iterator[Flow]:
    seed = request.param
    chain = make_devchain(anvil_factory(), tmp_path_factory.mktemp(f"money{seed}"), GEN1, GEN2, confirmations=2,
                          range_size=20)
    stats = Simulator(chain.anvil.w3, chain.dep, seed=seed, traders=5).run_batches(700, per_block=25)
    chain.anvil.mine(3)
    print(f"seed {seed}: {stats}")
    db = new_database()
    try:
        c = chain.config.chain
        client = ChainClient.from_config(c)
        reports = [ingest_range(chain.config, client, engine_for(db), a, b)
                   for a, b in ranges_up_to(c.start_block, c.range_size, chain.anvil.w3.eth.block_number
                                            - c.confirmations)]
        yield Flow(seed, chain, db, max(r.processed_to for r in reports))
    finally:
        drop_database(db)


def _trade_legs(f: Flow) -> list[tuple[str, str, str, int, int]]:
    """(metric, buyer, seller, price, quantity) of every trade, decoded by web3 from the books' logs."""
    dep, start = f.chain.dep, f.chain.dep.start_block
    legs = []
    for metric, address in dep.gen1_books.items():
        book = f.contract(address, "OrderBook")
        for ev in book.events.OrderMatched().get_logs(from_block=start, to_block=f.final):
            a = ev["args"]
            legs.append((metric, a["buyer"].lower(), a["seller"].lower(), a["price"], a["quantity"]))
    for metric, address in dep.gen2_books.items():
        book = f.contract(address, "AluminumOrderBook")
        event = book.events.TradeExecuted()
        topic = Web3.keccak(text="TradeExecuted(address,address,uint256,uint256,uint256)")
        raw = f.w3.eth.get_logs({"address": book.address, "fromBlock": start, "toBlock": f.final,
                                 "topics": [topic]})
        for lg in raw:
            a = event.process_log(lg)["args"]
            legs.append((metric, a["buyer"].lower(), a["seller"].lower(), a["price"], a["size"]))
    return legs


def test_positions_equal_the_figures_computed_from_the_chain_logs(flow: Flow) -> None:
    expected: dict[tuple[str, str], list[int]] = defaultdict(lambda: [0, 0, 0, 0, 0])
    for metric, buyer, seller, price, qty in _trade_legs(flow):
        b, s = expected[(metric, buyer)], expected[(metric, seller)]
        b[0] += qty  # net
        b[1] += qty  # bought
        b[3] += price * qty  # buy notional
        s[0] -= qty
        s[2] += qty  # sold
        s[4] += price * qty  # sell notional
    got = {(m, t): [int(v) for v in vals] for m, t, *vals in _table(flow.db, """
        SELECT m.metric_id, p.trader, p.net_quantity, p.bought, p.sold, p.buy_notional, p.sell_notional
        FROM positions p JOIN markets m USING (market_id) ORDER BY 1, 2""")}
    seed = f"seed {flow.seed}"
    assert len(expected) >= 10 and {m for m, _ in expected} == set(GEN1) | set(GEN2), \
        f"{seed}: every market must have traded, with several traders"
    assert sorted(got) == sorted(expected), f"{seed}: traders with a position"
    wrong = {k: (got[k], v) for k, v in expected.items() if got[k] != v}
    assert not wrong, f"{seed}: (net, bought, sold, buy notional, sell notional) stored vs computed: {wrong}"
    for metric in set(GEN1) | set(GEN2):
        mine = [v for (m, _), v in got.items() if m == metric]  # the stored rows conserve quantity and notional
        assert sum(v[0] for v in mine) == 0 and sum(v[3] for v in mine) == sum(v[4] for v in mine), (seed, metric)


def _orders(f: Flow, contract: str) -> dict[str, tuple]:
    """order id -> (trader, side, order type, price, quantity, filled, remaining, status), amounts as int."""
    return {r[0]: (r[1], r[2], r[3], int(r[4]), int(r[5]), int(r[6]), int(r[7]), r[8]) for r in _table(f.db, f"""
        SELECT order_id, trader, side, order_type, price, quantity, filled, remaining, status FROM orders
        WHERE contract = '{contract}'""")}


def _status(code: int, filled: int) -> str:
    """The stored status a contract status means: open with a fill is partially filled."""
    if code == OPEN:
        return "partially_filled" if filled else "open"
    return {FILLED: "filled", CANCELLED: "cancelled"}[code]


def test_every_generation_2_order_is_stored_as_the_contract_reports_it(flow: Flow) -> None:
    seed = f"seed {flow.seed}"
    kinds: set[tuple[int, str]] = set()
    for metric, address in flow.chain.dep.gen2_books.items():
        book = flow.contract(address, "AluminumOrderBook")
        placed = [ev["args"]["orderId"] for ev in book.events.OrderPlaced().get_logs(
            from_block=flow.chain.dep.start_block, to_block=flow.final)]
        stored = _orders(flow, address)
        assert len(placed) > 20, f"{seed}: {metric} needs orders"
        assert sorted(stored) == sorted("0x" + bytes(oid).hex() for oid in placed), f"{seed}: {metric} orders"
        for oid in placed:
            user, side, price, size, filled, status, is_market = book.functions.getOrder(oid).call(
                block_identifier=flow.final)
            row = stored["0x" + bytes(oid).hex()]
            want = (user.lower(), side, MARKET_ORDER if is_market else LIMIT_ORDER, price, size, filled,
                    size - filled if status == OPEN else 0, _status(status, filled))
            assert row == want, f"{seed}: {metric} order 0x{bytes(oid).hex()}: stored {row}, contract {want}"
            kinds.add((want[2], want[7]))
    # the flow exercised what the checks are about: both order types, fills, partial fills and cancels
    assert {(MARKET_ORDER, "filled"), (LIMIT_ORDER, "open"), (LIMIT_ORDER, "partially_filled"),
            (LIMIT_ORDER, "filled"), (LIMIT_ORDER, "cancelled")} <= kinds, f"{seed}: {kinds}"


def test_every_generation_1_order_is_stored_as_the_router_reports_it(flow: Flow) -> None:
    seed = f"seed {flow.seed}"
    router = flow.contract(flow.chain.dep.router, "OrderRouter")
    count = router.functions.nextOrderId().call(block_identifier=flow.final) - 1
    placed = [ev["args"]["orderId"] for ev in router.events.OrderPlaced().get_logs(
        from_block=flow.chain.dep.start_block, to_block=flow.final)]
    assert sorted(placed) == list(range(1, count + 1)) and count > 50, f"{seed}: router ids"
    stored = _orders(flow, flow.chain.dep.router)
    assert sorted(int(k) for k in stored) == list(range(1, count + 1)), f"{seed}: every router order is stored"
    for oid in range(1, count + 1):
        trader, _metric, _book, otype, side, price, qty, filled, status = router.functions.getOrder(oid).call(
            block_identifier=flow.final)
        want = (trader.lower(), side, otype, price, qty, filled, qty - filled if status == OPEN else 0,
                _status(status, filled))
        assert stored[str(oid)] == want, f"{seed}: router order {oid}: stored {stored[str(oid)]}, contract {want}"
