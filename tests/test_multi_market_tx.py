"""One transaction, several markets. A reference batcher (contracts/src/gen1/MultiMarketCaller.sol) places, fills
and cancels orders of 2-4 generation-1 markets per transaction, including cancels of market B in transactions
that place only in market A. Generation-1 fills and cancels name no market, so each one must take the market of
its order. The test checks 20 books at one block in five places, against the contracts' own views:
Postgres after ingestion, the REST depth of a freshly started live service (cold start), its WebSocket
snapshots, and then REST and WebSocket after the live follower has applied more such blocks at the tip.

The flow is seeded: set OBP_TEST_SEED to replay a run. Every failure message prints the seed.
"""

from __future__ import annotations

import os
import random
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

import httpx
from sqlalchemy import Engine, text
from web3 import Web3
from web3.contract import Contract
from web3.types import TxReceipt

from orderbook_pipelines.chain.rpc import ChainClient
from orderbook_pipelines.devchain.deploy import artifact, deploy_multicaller
from orderbook_pipelines.ingestion.ingest import ingest_range
from orderbook_pipelines.ingestion.ranges import ranges_between
from orderbook_pipelines.live.hub import Limits
from orderbook_pipelines.storage.db import engine_for
from tests.conftest import Anvil, DevChain, make_devchain
from tests.live_harness import BookClient, running_service, wait_until_current

MARKETS = [f"MULTI{i:02d}_V1" for i in range(20)]
TICK, UNIT = 10**16, 10**17  # the gen-1 price tick; the quantity step of the flow (0.1)
BUY, SELL = 0, 1
MARKET, LIMIT = 0, 1
SIDES = {BUY: "bids", SELL: "asks"}
CALLER_GAS, PLAIN_GAS = 12_000_000, 3_000_000  # at most 6 batches + 2 plain calls fit a 100M-gas block
LIVE_DEPTH = 100  # the deepest book the service serves
FULL_DEPTH = 1000  # more levels than a side of the flow can hold, so whole books are compared

PLACED = bytes(Web3.keccak(text="OrderPlaced(uint256,address,string,uint8,uint8,uint256,uint256)"))
EXECUTED = bytes(Web3.keccak(text="OrderExecuted(uint256,address,uint256,uint256,uint256)"))
CANCELLED = bytes(Web3.keccak(text="OrderCancelled(uint256,address,uint256)"))
MATCHED = bytes(Web3.keccak(text="OrderMatched(uint256,uint256,uint256,uint256,address,address)"))

Placement = tuple[str, int, int, int, int]  # metric id, order type, side, quantity, price
Books = dict[str, dict[str, list[tuple[int, ...]]]]  # market -> "bids"/"asks" -> levels, best first


@dataclass
class _Tx:
    kind: str
    sender: str
    to: str
    data: str
    gas: int


@dataclass
class _Block:
    next_id: int  # the router id of the block's first placement
    placed: int = 0  # placements of the transactions built so far
    traded: set[str] = field(default_factory=set)  # markets placed in by the transactions built so far
    claimed: dict[str, int] = field(default_factory=dict)  # market -> the one transaction that cancels in it
    txs: list[_Tx] = field(default_factory=list)


class Flow:
    """Seeded order flow, mostly through the batcher, one block at a time (automine off).

    No transaction reverts, which the test asserts. Only one transaction of a block may cancel in a given
    market, and no other transaction of that block touches that market. The cancelled order was open at the
    previous block. Transactions run in the order sent, because their gas prices decrease, and the test checks
    this. So the router ids of a block are known before it is mined. That lets a batch place a probe order and
    cancel it in the same call.
    """

    def __init__(self, chain: DevChain, caller: Contract, seed: int):
        w3 = chain.anvil.w3
        self.w3, self.seed, self.rng = w3, seed, random.Random(seed)
        self.router = w3.eth.contract(address=Web3.to_checksum_address(chain.dep.router),
                                      abi=artifact("OrderRouter")["abi"])
        self.caller = caller
        self.caller_addr = caller.address.lower()
        accounts: list[str] = list(w3.eth.accounts)
        self.owner = accounts[0]  # the batcher's deployer, the only account that may call it
        self.traders = [a.lower() for a in accounts[1:7]]
        self.home = {m: 1000 + 37 * i for i, m in enumerate(MARKETS)}  # mid prices in ticks
        self.mid = dict(self.home)
        self.pool: dict[str, list[tuple[int, str]]] = {m: [] for m in MARKETS}  # limit orders: (id, trader)
        self.by_hash = {bytes(Web3.keccak(text=m)): m for m in MARKETS}
        self.by_book = {a.lower(): m for m, a in chain.dep.gen1_books.items()}
        self.order_market: dict[int, str] = {}  # from the OrderPlaced logs, decoded here
        self.order_block: dict[int, int] = {}
        self.mark: int | None = None  # orders opened at or before this block count as "older" in the stats
        self.stats: Counter[str] = Counter()

    # -- driving ----------------------------------------------------------------------------------------------
    def run(self, blocks: int, seeding: bool = False) -> None:
        self._rpc("evm_setAutomine", False)
        try:
            for _ in range(blocks):
                self._block(seeding)
        finally:
            self._rpc("evm_setAutomine", True)

    def _rpc(self, method: str, *params: object) -> object:
        resp = self.w3.provider.make_request(method, list(params))  # type: ignore[arg-type]
        assert not resp.get("error"), f"seed={self.seed}: {method} failed: {resp['error']}"
        return resp.get("result")

    def _block(self, seeding: bool) -> None:
        rng = self.rng
        b = _Block(next_id=self.router.functions.nextOrderId().call())
        if seeding:  # resting orders on both sides of every market, some of them the traders'
            markets = rng.sample(MARKETS, len(MARKETS))
            for i in range(0, len(markets), 4):
                places = [self._order(m, "rest", side) for m in markets[i:i + 4] for side in (BUY, SELL) * 3]
                self._batch(b, "seed", [], places, [])
            for _ in range(2):
                self._plain(b, cancel=False)
        else:
            for k in range(rng.randint(4, 6)):
                if k == 0:
                    self._cancel_elsewhere(b)
                elif k == 1:
                    self._multi_cross(b)
                else:
                    rng.choices([self._mixed, self._cancel_elsewhere, self._multi_cross], (5, 2, 2))[0](b)
            for _ in range(rng.randint(0, 2)):
                self._plain(b)
        self._mine(b)

    # -- markets a transaction may use ------------------------------------------------------------------------
    def _free(self, b: _Block) -> list[str]:
        """Markets the next transaction may place in: none that another transaction of the block cancels in."""
        k = len(b.txs)
        return [m for m in MARKETS if b.claimed.get(m, k) == k]

    def _take_cancels(self, b: _Block, owner: str, count: int, exclude: frozenset[str] = frozenset()) -> list[int]:
        """Up to `count` open orders of `owner`, one per market, in markets nobody has touched yet this block."""
        k = len(b.txs)
        markets = [m for m in MARKETS if m not in b.traded and b.claimed.get(m, k) == k and m not in exclude
                   and any(o == owner for _, o in self.pool[m])]
        self.rng.shuffle(markets)
        out: list[int] = []
        for m in markets:
            if len(out) == count:
                break
            candidates = [e for e in self.pool[m] if e[1] == owner]
            self.rng.shuffle(candidates)
            for e in candidates:
                self.pool[m].remove(e)
                if self.router.functions.getOrder(e[0]).call()[8] == 1:  # OPEN at the previous block
                    out.append(e[0])
                    b.claimed[m] = k
                    break
        return out

    def _order(self, m: str, how: str, side: int | None = None) -> Placement:
        rng = self.rng
        self.mid[m] = min(self.home[m] + 60, max(self.home[m] - 60, self.mid[m] + rng.randint(-2, 2)))
        side = rng.randint(0, 1) if side is None else side
        if how == "market":
            return (m, MARKET, side, rng.randint(3, 15) * UNIT, 0)
        if how == "cross":  # through the spread: fills makers, the rest may rest
            off, qty = rng.randint(1, 6), rng.randint(3, 15)
            price = self.mid[m] + off if side == BUY else self.mid[m] - off
        else:
            off, qty = rng.randint(1, 12), rng.randint(1, 20)
            price = self.mid[m] - off if side == BUY else self.mid[m] + off
        return (m, LIMIT, side, qty * UNIT, price * TICK)

    def _any_order(self, m: str) -> Placement:
        return self._order(m, self.rng.choices(("rest", "cross", "market"), (10, 3, 1))[0])

    # -- transaction kinds ------------------------------------------------------------------------------------
    def _batch(self, b: _Block, kind: str, before: list[int], places: list[Placement], after: list[int]) -> None:
        data = self.caller.encode_abi("batch", [before, [list(p) for p in places], after])
        b.txs.append(_Tx(kind, self.owner, self.caller.address, data, CALLER_GAS))
        b.traded |= {p[0] for p in places}
        b.placed += len(places)

    def _mixed(self, b: _Block) -> None:
        """Requotes: maybe cancel some orders, then rest, cross or sweep in 2-4 markets; maybe a probe order that
        is placed and cancelled in the same call."""
        rng = self.rng
        before = self._take_cancels(b, self.caller_addr, rng.choice((0, 0, 1, 2)))
        free = self._free(b)
        markets = rng.sample(free, min(len(free), rng.randint(2, 4)))
        places = [self._any_order(m) for m in markets for _ in range(rng.randint(1, 2))]
        rng.shuffle(places)
        after: list[int] = []
        if rng.random() < 0.3:
            # A bid at one tick crosses no ask. As the last placement of its market, nothing trades with it
            # before the cancel at the end of the same call.
            places.append((rng.choice(markets), LIMIT, BUY, UNIT, TICK))
            after = [b.next_id + b.placed + len(places) - 1]
        self._batch(b, "mixed", before, places, after)

    def _cancel_elsewhere(self, b: _Block) -> None:
        """Cancel orders of markets B (1-3 of them) and place only in one other market A."""
        before = self._take_cancels(b, self.caller_addr, self.rng.randint(1, 3))
        if not before:
            self._mixed(b)
            return
        cancelled = {self.order_market[i] for i in before}
        a = self.rng.choice([m for m in self._free(b) if m not in cancelled])
        self._batch(b, "cancel_elsewhere", before, [self._any_order(a) for _ in range(self.rng.randint(1, 3))], [])

    def _multi_cross(self, b: _Block) -> None:
        """One taker per market in 2-4 markets: the makers of several books fill in one transaction."""
        free = self._free(b)
        markets = self.rng.sample(free, min(len(free), self.rng.randint(2, 4)))
        self._batch(b, "multi_cross", [], [self._order(m, self.rng.choice(("cross", "market"))) for m in markets], [])

    def _plain(self, b: _Block, cancel: bool = True) -> None:
        """A trader's own router call: one placement, or a cancel of one of the trader's orders."""
        rng = self.rng
        trader = rng.choice(self.traders)
        to = self.router.address
        if cancel and rng.random() < 0.4:
            ids = self._take_cancels(b, trader, 1)
            if ids:
                b.txs.append(_Tx("plain_cancel", trader, to, self.router.encode_abi("cancelOrder", ids), PLAIN_GAS))
                return
        p = self._any_order(rng.choice(self._free(b)))
        b.txs.append(_Tx("plain_place", trader, to, self.router.encode_abi("placeOrder", list(p)), PLAIN_GAS))
        b.traded.add(p[0])
        b.placed += 1

    # -- mining and bookkeeping -------------------------------------------------------------------------------
    def _mine(self, b: _Block) -> None:
        n = len(b.txs)
        hashes = [self._rpc("eth_sendTransaction", {"from": tx.sender, "to": tx.to, "data": tx.data,
                                                    "gas": hex(tx.gas), "gasPrice": hex((10 + n - k) * 10**9)})
                  for k, tx in enumerate(b.txs)]
        self._rpc("evm_mine")
        number = self.w3.eth.block_number
        for k, (tx, h) in enumerate(zip(b.txs, hashes, strict=True)):
            r = self.w3.eth.wait_for_transaction_receipt(h, timeout=60)  # type: ignore[arg-type]
            where = f"seed={self.seed}: {tx.kind} transaction {k} of {n} sent for block {number}"
            assert r["status"] == 1, f"{where} reverted (the flow must not send failing calls)"
            assert (r["blockNumber"], r["transactionIndex"]) == (number, k), \
                f"{where} ran at block {r['blockNumber']} index {r['transactionIndex']}: not in the order sent"
            self._account(r)
        self.stats["blocks"] += 1

    def _account(self, r: TxReceipt) -> None:
        placed: set[str] = set()
        filled: set[str] = set()
        cancelled: list[int] = []
        for lg in r["logs"]:
            topics = [bytes(t) for t in lg["topics"]]
            if topics[0] == PLACED:
                oid, m = int.from_bytes(topics[1], "big"), self.by_hash[topics[3]]
                self.order_market[oid], self.order_block[oid] = m, r["blockNumber"]
                placed.add(m)
                if int.from_bytes(bytes(lg["data"])[96:128], "big") > 0:  # a limit order: it may rest
                    self.pool[m].append((oid, "0x" + topics[2][-20:].hex()))
            elif topics[0] == CANCELLED:
                cancelled.append(int.from_bytes(topics[1], "big"))
            elif topics[0] == EXECUTED:
                self.stats["fill_events"] += 1
            elif topics[0] == MATCHED:
                filled.add(self.by_book[lg["address"].lower()])
        self.stats["cancel_events"] += len(cancelled)
        elsewhere = [i for i in cancelled if self.order_market[i] not in placed]
        self.stats["txs"] += 1
        self.stats["multi_market_txs"] += len(placed | filled | {self.order_market[i] for i in cancelled}) >= 2
        self.stats["fills_in_several_markets"] += len(filled) >= 2
        if len(placed) == 1 and elsewhere:
            self.stats["cancel_B_place_only_A"] += 1
            if self.mark is not None and any(self.order_block[i] <= self.mark for i in elsewhere):
                self.stats["cancel_B_place_only_A_older_order"] += 1


# -- the five views of the same books ---------------------------------------------------------------------------
def contract_books(chain: DevChain, block: int, n: int, counts: bool) -> Books:
    """getLevels of every book at `block`; bestBid/bestAsk must agree with it (the contract's own consistency)."""
    w3, abi = chain.anvil.w3, artifact("OrderBook")["abi"]
    out: Books = {}
    for m, addr in chain.dep.gen1_books.items():
        c = w3.eth.contract(address=Web3.to_checksum_address(addr), abi=abi)
        out[m] = {}
        for side, name in SIDES.items():
            prices, qtys, cnts = c.functions.getLevels(side, n).call(block_identifier=block)
            out[m][name] = [(p, q, k) if counts else (p, q) for p, q, k in zip(prices, qtys, cnts, strict=True)]
            best = (c.functions.bestBid() if side == BUY else c.functions.bestAsk()).call(block_identifier=block)
            assert best == (prices[0] if prices else 0), f"{m} {name}: best {best} but levels start {prices[:1]}"
    return out


def postgres_books(engine: Engine, router: str) -> Books:
    """Resting orders of the `orders` table summed to price levels: (price, quantity, orders)."""
    out: Books = {m: {"bids": [], "asks": []} for m in MARKETS}
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT m.metric_id, o.side, o.price, sum(o.remaining), count(*) FROM orders o JOIN markets m "
            "USING (market_id) WHERE o.contract = :r AND o.status IN ('open', 'partially_filled') "
            "GROUP BY 1, 2, 3"), {"r": router}).all()
    for metric, side, price, qty, n in rows:
        out[metric][SIDES[side]].append((int(price), int(qty), int(n)))
    for sides in out.values():
        sides["bids"].sort(key=lambda lv: -lv[0])
        sides["asks"].sort()
    return out


def rest_books(url: str) -> Books:
    out: Books = {}
    for m in MARKETS:
        r = httpx.get(f"http://{url}/api/depth", params={"market": m, "levels": LIVE_DEPTH}, timeout=10)
        assert r.status_code == 200, f"GET /api/depth {m}: {r.status_code} {r.text}"
        body = r.json()
        out[m] = {s: [(int(p), int(q)) for p, q in body[s]] for s in ("bids", "asks")}
    return out


def ws_books(clients: list[BookClient]) -> Books:
    out: Books = {}
    for c in clients:
        bids, asks = c.levels()
        out[c.market] = {"bids": [tuple(lv) for lv in bids], "asks": [tuple(lv) for lv in asks]}
    return out


def differences(what: str, got: Books, want: Books) -> list[str]:
    """Every market and side that differs, with its first differing level."""
    out = []
    for m in MARKETS:
        for side in ("bids", "asks"):
            g, w = got[m][side], want[m][side]
            if g != w:
                i = next((i for i, (x, y) in enumerate(zip(g, w, strict=False)) if x != y), min(len(g), len(w)))
                out.append(f"  {m} {side}: {what} has {len(g)} levels, the contract {len(w)}; first difference at "
                           f"level {i}: {what} {g[i] if i < len(g) else None}, contract {w[i] if i < len(w) else None}")
    return out


def assert_same(tag: str, block: int, what: str, got: Books, want: Books, stored: list[str] | None = None) -> None:
    """`stored`: problems of the stored events behind `got`, reported with the book sides that differ."""
    problems = differences(what, got, want)
    msg = [f"{tag} block={block}: {what} differs from the contract views in {len(problems)} book side(s) of "
           f"{len(MARKETS)} markets", *problems]
    if stored:
        msg += ["stored fills/cancels not in their order's market:", *stored]
    assert not problems and not stored, "\n".join(msg)


def ingest(chain: DevChain, engine: Engine, lo: int, hi: int, rng: random.Random) -> None:
    """Every range holding a block of [lo, hi], up to `hi`, in a shuffled order: a fill's range may be ingested
    before the range of its order's open (the stored fix-up must still give the fill its order's market)."""
    c = chain.config.chain
    client = ChainClient(chain.anvil.url)
    ranges = ranges_between(c.start_block, c.range_size, lo, hi)
    rng.shuffle(ranges)
    for a, b in ranges:
        ingest_range(chain.config, client, engine, a, b, upto=hi)


def stored_market_errors(engine: Engine, router: str, flow: Flow, upto: int) -> list[str]:
    """Stored fills and cancels whose market is not their order's (the OrderPlaced logs decoded by the test),
    and missing ones (the stored counts against the logs)."""
    with engine.connect() as conn:
        rows = conn.execute(text(
            "SELECT e.kind, e.order_id, m.metric_id, e.block_number, e.tx_hash FROM order_events e "
            "LEFT JOIN markets m USING (market_id) WHERE e.contract = :r AND e.kind IN ('fill', 'cancel') "
            "AND e.block_number <= :b ORDER BY e.block_number, e.log_index"), {"r": router, "b": upto}).all()
    out = []
    stored = Counter(r[0] for r in rows)
    if (stored["fill"], stored["cancel"]) != (flow.stats["fill_events"], flow.stats["cancel_events"]):
        out.append(f"  stored {stored['fill']} fills and {stored['cancel']} cancels, the chain logged "
                   f"{flow.stats['fill_events']} and {flow.stats['cancel_events']}")
    wrong = [f"  {kind} of order {oid} (block {bn}, tx {tx}) stored in market {metric}, its order is in "
             f"{flow.order_market[int(oid)]}" for kind, oid, metric, bn, tx in rows
             if metric != flow.order_market[int(oid)]]
    return out + wrong[:20] + ([f"  ... and {len(wrong) - 20} more"] if len(wrong) > 20 else [])


def test_multi_market_transactions_give_the_contracts_books_everywhere(anvil_factory: type[Anvil], tmp_path: Path,
                                                                       database: str) -> None:
    seed = int(os.environ.get("OBP_TEST_SEED") or random.randrange(2**32))
    tag = f"seed={seed}"
    chain = make_devchain(anvil_factory(), tmp_path, MARKETS, [], confirmations=2, range_size=10)
    w3, router, confirmations = chain.anvil.w3, chain.dep.router, chain.config.chain.confirmations
    flow = Flow(chain, deploy_multicaller(w3, router), seed)
    flow.run(3, seeding=True)
    flow.run(30)
    s = flow.stats
    assert s["fills_in_several_markets"] >= 10 and s["cancel_B_place_only_A"] >= 10, (tag, dict(s))
    assert s["multi_market_txs"] > s["txs"] // 2, (tag, dict(s))

    # (a) + (b): Postgres, ingested range by range, against the contracts at the last block of the flow.
    h = w3.eth.block_number
    chain.anvil.mine(confirmations)  # empty blocks: `h` becomes final and the books stay as they are at `h`
    engine = engine_for(database)
    ingest_rng = random.Random(seed + 1)
    try:
        ingest(chain, engine, chain.dep.start_block, h, ingest_rng)
        full = contract_books(chain, h, FULL_DEPTH, counts=True)
        assert all(len(lv) < FULL_DEPTH for sides in full.values() for lv in sides.values()), tag
        sizes = {m: (len(sides["bids"]), len(sides["asks"])) for m, sides in full.items()}
        assert sum(b > 0 and a > 0 for b, a in sizes.values()) >= 15, f"{tag}: the flow left thin books: {sizes}"
        assert_same(tag, h, "Postgres orders", postgres_books(engine, router), full,
                    stored_market_errors(engine, router, flow, h))

        top = contract_books(chain, h, LIVE_DEPTH, counts=False)
        # one WebSocket per market, from one client address
        with running_service(chain, database, Limits(max_connections_per_client=len(MARKETS))) as (service, url):
            # (c) the cold start: books restored from Postgres at `h`, then only empty blocks followed
            wait_until_current(service, chain)
            assert service.follower.stats.cold_start_block == h, (tag, service.follower.stats)
            assert_same(tag, h, "GET /api/depth after cold start", rest_books(url), top)
            # (d) snapshot-on-subscribe
            clients = [BookClient(url, m, depth=LIVE_DEPTH) for m in MARKETS]
            try:
                for c in clients:
                    c.drain(0.3)
                assert all(c.seq >= 0 for c in clients), f"{tag}: a client got no snapshot"
                assert_same(tag, h, "WebSocket snapshot", ws_books(clients), top)

                # (e) the follower: more batches at the tip, some cancelling orders the cold start loaded
                flow.mark = h
                before = Counter(flow.stats)
                flow.run(10)
                tip = w3.eth.block_number
                wait_until_current(service, chain)
                for c in clients:
                    c.drain(0.3)
                top = contract_books(chain, tip, LIVE_DEPTH, counts=False)
                assert_same(tag, tip, "GET /api/depth from the live follower", rest_books(url), top)
                assert_same(tag, tip, "WebSocket books after deltas", ws_books(clients), top)
                assert all(c.gaps == 0 and c.checksum_failures == 0 for c in clients), \
                    (tag, [(c.market, c.gaps, c.checksum_failures) for c in clients])
                assert sum(c.deltas for c in clients) >= 20, tag
            finally:
                for c in clients:
                    c.close()
        tail = flow.stats - before
        assert tail["fills_in_several_markets"] >= 3 and tail["cancel_B_place_only_A_older_order"] >= 1, \
            (tag, dict(tail))

        # Postgres catches up with the follower's blocks the same way.
        chain.anvil.mine(confirmations)
        ingest(chain, engine, h + 1, tip, ingest_rng)
        assert_same(tag, tip, "Postgres orders", postgres_books(engine, router),
                    contract_books(chain, tip, FULL_DEPTH, counts=True),
                    stored_market_errors(engine, router, flow, tip))
    finally:
        engine.dispose()
