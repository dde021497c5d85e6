"""Deterministic replay: random valid streams keep the book invariants, invalid ones are rejected, the exported
stream of a real chain replays to the contracts' own books, and the hash is the same on every run."""

from __future__ import annotations

import hashlib
import io
import json
import os
import subprocess
import sys
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner
from web3 import Web3

from orderbook_pipelines.book.model import BUY, SELL
from orderbook_pipelines.book.replay import (
    CanonicalEvent,
    MarketReplay,
    ReplayError,
    check_invariants,
    combined_hash,
    replay,
)
from orderbook_pipelines.chain.rpc import ChainClient
from orderbook_pipelines.cli import app
from orderbook_pipelines.config import PROJECT_ROOT
from orderbook_pipelines.devchain.deploy import artifact
from orderbook_pipelines.devchain.simulator import Simulator
from orderbook_pipelines.ingestion.ingest import ingest_range
from orderbook_pipelines.ingestion.ranges import ranges_up_to
from orderbook_pipelines.storage.db import drop_database, engine_for
from orderbook_pipelines.storage.events import export_events
from tests.conftest import Anvil, DevChain, make_devchain, new_database

LIMIT, MARKET = 1, 0


# -- random valid streams (pure) ------------------------------------------------------------------------------
class _Gen:
    """Builds a valid stream the way the contracts emit it, and keeps an independent reference of resting orders."""

    def __init__(self) -> None:
        self.events: list[CanonicalEvent] = []
        self.block, self.log, self.next_id = 1, 0, 0
        self.live: dict[tuple[str, str], list[int]] = {}  # (market, id) -> [side, price, quantity, filled]

    def emit(self, market: str, kind: str, oid: str, **kw: int | None) -> None:
        self.events.append(CanonicalEvent(self.block, self.log, "0x" + "ab" * 32, "0x" + "cd" * 32, market, 1, kind,
                                          "0xbook", oid, "0xtrader" if kind == "open" else None, **kw))
        self.log += 1

    def new_id(self) -> str:
        self.next_id += 1
        return str(self.next_id)

    def new_block(self) -> None:
        self.block += 1
        self.log = 0

    def reference(self) -> dict[str, dict[int, list[tuple[int, int, int]]]]:
        agg: dict[str, dict[int, dict[int, list[int]]]] = defaultdict(lambda: {BUY: {}, SELL: {}})
        for (m, _oid), (side, price, qty, filled) in self.live.items():
            lv = agg[m][side].setdefault(price, [0, 0])
            lv[0] += qty - filled
            lv[1] += 1
        return {m: {s: sorted(((p, q, c) for p, (q, c) in sides[s].items()), reverse=(s == BUY))
                    for s in (BUY, SELL)} for m, sides in agg.items()}


@st.composite
def valid_streams(draw: st.DrawFn) -> _Gen:
    g = _Gen()
    for _ in range(draw(st.integers(1, 60))):
        m = draw(st.sampled_from(["AAA", "BBB"]))
        action = draw(st.sampled_from(["limit", "limit", "fill", "cancel", "market", "fill_first", "block"]))
        mine = [k for k in g.live if k[0] == m]
        if action == "limit" or (action in ("fill", "cancel") and not mine):
            oid = g.new_id()
            side, price, qty = draw(st.integers(0, 1)), draw(st.integers(1, 5)), draw(st.integers(1, 10**30))
            g.emit(m, "open", oid, side=side, order_type=LIMIT, price=price, quantity=qty)
            g.live[(m, oid)] = [side, price, qty, 0]
        elif action == "fill":
            k = draw(st.sampled_from(sorted(mine)))
            o = g.live[k]
            q = draw(st.integers(1, o[2] - o[3]))
            g.emit(m, "fill", k[1], quantity=q)
            o[3] += q
            if o[3] == o[2]:
                del g.live[k]
        elif action == "cancel":
            k = draw(st.sampled_from(sorted(mine)))
            g.emit(m, "cancel", k[1])
            del g.live[k]
        elif action == "market":  # open then fills, all in this block; the remainder never rests
            oid = g.new_id()
            qty = draw(st.integers(1, 100))
            g.emit(m, "open", oid, side=draw(st.integers(0, 1)), order_type=MARKET, price=0, quantity=qty)
            left = qty
            for _ in range(draw(st.integers(0, 3))):
                if left == 0:
                    break
                q = draw(st.integers(1, left))
                g.emit(m, "fill", oid, quantity=q)
                left -= q
        elif action == "fill_first":  # generation 2: a taker's fills are logged before its OrderPlaced
            oid = g.new_id()
            filled, rest = draw(st.integers(1, 50)), draw(st.integers(0, 50))
            g.emit(m, "fill", oid, quantity=filled)
            side, price = draw(st.integers(0, 1)), draw(st.integers(1, 5))
            g.emit(m, "open", oid, side=side, order_type=LIMIT, price=price, quantity=filled + rest)
            if rest:
                g.live[(m, oid)] = [side, price, filled + rest, filled]
        else:
            g.new_block()
    return g


def _levels(mr: MarketReplay) -> dict[int, list[tuple[int, int, int]]]:
    return {s: [(lv.price, lv.quantity, lv.orders) for lv in mr.book.levels(s, 10_000)] for s in (BUY, SELL)}


@settings(max_examples=300, deadline=None)
@given(valid_streams())
def test_random_valid_streams_keep_the_invariants_and_match_a_reference(g: _Gen) -> None:
    res = replay(g.events, strict=True, check_each_block=True)
    ref = g.reference()
    for m, mr in res.books.items():
        check_invariants(mr.book)
        assert _levels(mr) == ref.get(m, {BUY: [], SELL: []})
        assert set(mr.traders) == set(mr.book.orders)  # traders are kept for exactly the resting orders
    # text round trip is lossless, so files replay to the same hashes
    again = replay([CanonicalEvent.from_json(e.to_json()) for e in g.events])
    assert again.hashes == res.hashes and again.combined == res.combined


@settings(max_examples=100, deadline=None)
@given(valid_streams(), st.data())
def test_any_overfill_is_rejected(g: _Gen, data: st.DataObject) -> None:
    if not g.live:
        return
    (m, oid), (_side, _p, qty, filled) = data.draw(st.sampled_from(sorted(g.live.items())))
    g.emit(m, "fill", oid, quantity=qty - filled + data.draw(st.integers(1, 10)))
    with pytest.raises(ReplayError, match=rf"fill of \d+ on order 0xbook:{oid} exceeds its remaining"):
        replay(g.events)


def _ev(block: int, log: int, kind: str, oid: str, **kw: int | None) -> CanonicalEvent:
    return CanonicalEvent(block, log, "0x", "0x", "M", 1, kind, "0xbook", oid, None, **kw)


OPEN_A = _ev(1, 0, "open", "a", side=BUY, order_type=LIMIT, price=10, quantity=5)


@pytest.mark.parametrize("stream, message", [
    ([OPEN_A, _ev(1, 1, "open", "a", side=BUY, order_type=LIMIT, price=10, quantity=5)], "duplicate open"),
    ([OPEN_A, _ev(1, 1, "fill", "a", quantity=6)], "exceeds its remaining 5"),
    ([OPEN_A, _ev(1, 1, "cancel", "a"), _ev(2, 0, "fill", "a", quantity=1)], "already ended"),
    ([_ev(1, 0, "cancel", "zz")], "never opened"),
    ([_ev(1, 0, "fill", "x", quantity=3), _ev(2, 0, "open", "x", side=SELL, order_type=LIMIT, price=9,
                                                 quantity=5)], "whose open never arrived"),
    ([_ev(1, 0, "fill", "x", quantity=7), _ev(1, 1, "open", "x", side=SELL, order_type=LIMIT, price=9,
                                                 quantity=5)], "filled 7 before its open of quantity 5"),
    ([OPEN_A, _ev(1, 1, "fill", "a", quantity=0)], "quantity > 0"),
    ([_ev(1, 0, "open", "b", side=BUY, order_type=LIMIT, price=10, quantity=0)], "quantity > 0"),
    ([_ev(2, 0, "open", "b", side=BUY, order_type=LIMIT, price=10, quantity=1), OPEN_A], "must be sorted"),
    ([OPEN_A, OPEN_A], "must be sorted"),
])
def test_invalid_events_are_rejected_with_a_reason(stream: list[CanonicalEvent], message: str) -> None:
    with pytest.raises(ReplayError, match=message):
        replay(stream)


@pytest.mark.parametrize("line, message", [
    ('{"block_number":"1"', "not JSON"),
    ('{"block_number":1,"log_index":"0","market":"M","market_id":"1","kind":"open","contract":"c","order_id":"a"}',
     "block_number must be a non-negative integer as a canonical decimal string"),
    ('{"block_number":"1","log_index":"0","market":"M","market_id":"1","kind":"open","contract":"c",'
     '"order_id":"a","quantity":"-5"}', "quantity must be"),
    ('{"block_number":"1","log_index":"0","market":"M","market_id":"1","kind":"trade","contract":"c",'
     '"order_id":"a"}', "kind must be one of"),
    ('{"block_number":"1","log_index":"0","market":"M","market_id":"1","kind":"open","contract":"c",'
     '"order_id":"a","price":1.5}', "price must be"),
    ('{"block_number":"1","log_index":"0","market":"M","kind":"open","contract":"c","order_id":"a"}',
     "missing required field market_id"),
])
def test_malformed_lines_name_the_file_and_line(tmp_path: Path, line: str, message: str) -> None:
    f = tmp_path / "bad.jsonl"
    f.write_text(OPEN_A.to_json() + "\n" + line + "\n")
    result = CliRunner().invoke(app, ["replay", "run", str(f)])
    assert result.exit_code == 1
    assert f"{f}:2: " in result.output and message in result.output


# -- the real chain: exported stream vs the contracts ---------------------------------------------------------
def _contracts(w3: Web3, chain: DevChain) -> dict[str, object]:
    out = {m: w3.eth.contract(address=Web3.to_checksum_address(a), abi=artifact("OrderBook")["abi"])
           for m, a in chain.dep.gen1_books.items()}
    out |= {m: w3.eth.contract(address=Web3.to_checksum_address(a), abi=artifact("AluminumOrderBook")["abi"])
            for m, a in chain.dep.gen2_books.items()}
    return out


def _contract_state_hash(contract: object, block: int) -> tuple[str, dict[int, list[tuple[int, int, int]]]]:
    """Book.state_hash recomputed from the contract's own levels (the definition in docs/replay.md)."""
    h = hashlib.sha256()
    levels = {}
    for side in (BUY, SELL):
        p, q, c = contract.functions.getLevels(side, 1000).call(block_identifier=block)  # type: ignore[attr-defined]
        levels[side] = list(zip(p, q, c, strict=True))
        for price, qty, cnt in sorted(levels[side]):
            h.update(f"{side}:{price}:{qty}:{cnt};".encode())
    return h.hexdigest(), levels


@pytest.fixture(scope="module")
def exported(simulated_chain: DevChain, tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path, int]]:
    db = new_database()
    cfg = simulated_chain.config
    engine, client = engine_for(db), ChainClient(cfg.chain.rpc_url)
    safe = simulated_chain.anvil.w3.eth.block_number - cfg.chain.confirmations
    for a, b in ranges_up_to(cfg.chain.start_block, cfg.chain.range_size, safe):
        ingest_range(cfg, client, engine, a, b)
    out = tmp_path_factory.mktemp("replay") / "events.jsonl"
    result = CliRunner().invoke(app, ["replay", "export", "--out", str(out)], env={"DATABASE_URL": db})
    assert result.exit_code == 0, result.output
    yield db, out, safe
    drop_database(db)


def _run(path: Path, seed: str | None = None) -> str:
    if seed is None:
        result = CliRunner().invoke(app, ["replay", "run", str(path)])
        assert result.exit_code == 0, result.output
        return result.stdout
    env = {**os.environ, "PYTHONHASHSEED": seed}
    proc = subprocess.run([sys.executable, "-c", "from orderbook_pipelines.cli import app; app()", "replay", "run",
                           str(path)], capture_output=True, text=True, env=env, cwd=PROJECT_ROOT, check=True)
    return proc.stdout


def test_exported_stream_replays_to_the_contract_books(simulated_chain: DevChain,
                                                       exported: tuple[str, Path, int]) -> None:
    _db, path, safe = exported
    lines = path.read_text().splitlines()
    assert len(lines) > 8000
    first = json.loads(lines[0])
    assert all(isinstance(v, str | None) for v in first.values())  # integers as decimal strings
    out = _run(path)
    hashes = dict(line.split("\t") for line in out.strip().splitlines())
    contracts = _contracts(simulated_chain.anvil.w3, simulated_chain)
    for metric, c in contracts.items():
        assert hashes[metric] == _contract_state_hash(c, safe)[0], metric
    assert hashes.pop("combined") == combined_hash(hashes)


def test_same_file_same_hash_on_every_run_and_hash_seed(exported: tuple[str, Path, int]) -> None:
    _db, path, _safe = exported
    a, b = _run(path), _run(path)
    c, d = _run(path, seed="1"), _run(path, seed="987654")
    assert a == b == c == d
    assert "combined\t" in a


def test_a_modified_event_changes_the_hash(exported: tuple[str, Path, int], tmp_path: Path) -> None:
    _db, path, _safe = exported
    lines = path.read_text().splitlines()
    res = replay(CanonicalEvent.from_json(x) for x in lines)
    # the last open of an order still resting at the end: move it one price unit
    for i in range(len(lines) - 1, -1, -1):
        ev = CanonicalEvent.from_json(lines[i])
        if ev.kind == "open" and ev.key in res.books[ev.market].book.orders:
            break
    d = json.loads(lines[i])
    d["price"] = str(int(d["price"]) + 1)
    lines[i] = json.dumps(d, sort_keys=True, separators=(",", ":"))
    changed = tmp_path / "changed.jsonl"
    changed.write_text("\n".join(lines) + "\n")
    before = dict(x.split("\t") for x in _run(path).strip().splitlines())
    after = dict(x.split("\t") for x in _run(changed).strip().splitlines())
    assert after["combined"] != before["combined"]
    assert {m for m in before if before[m] != after[m]} == {ev.market, "combined"}


def test_export_of_one_market_up_to_a_block(exported: tuple[str, Path, int]) -> None:
    db, path, safe = exported
    buf = io.StringIO()
    rep = export_events(engine_for(db), buf, market="GOLD_V1", to_block=safe - 40)
    got = buf.getvalue().splitlines()
    want = [x for x in path.read_text().splitlines()
            if json.loads(x)["market"] == "GOLD_V1" and int(json.loads(x)["block_number"]) <= safe - 40]
    assert rep.events == len(got) == len(want) > 100
    assert got == want
    with pytest.raises(LookupError, match="beyond the ingested frontier"):
        export_events(engine_for(db), io.StringIO(), to_block=safe + 1)


# -- property: random order flow on a real chain --------------------------------------------------------------
@pytest.fixture(scope="module")
def small_chain(anvil_factory: type[Anvil], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DevChain, str]]:
    chain = make_devchain(anvil_factory(), tmp_path_factory.mktemp("prop"), ["SILVER_V1", "GOLD_V1"],
                          ["ALUMINUM_V1", "NICKEL_V1"], range_size=10)
    db = new_database()
    yield chain, db
    drop_database(db)


@settings(max_examples=5, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.integers(0, 2**32 - 1), orders=st.integers(20, 200), per_block=st.integers(1, 40),
       traders=st.integers(2, 6))
def test_replaying_on_chain_executions_reproduces_the_contract_book(small_chain: tuple[DevChain, str], seed: int,
                                                                    orders: int, per_block: int,
                                                                    traders: int) -> None:
    chain, db = small_chain
    w3 = chain.anvil.w3
    Simulator(w3, chain.dep, seed=seed, traders=traders).run_batches(orders, per_block=per_block)
    chain.anvil.mine(chain.config.chain.confirmations + 1)
    cfg = chain.config
    engine, client = engine_for(db), ChainClient(cfg.chain.rpc_url)
    safe = w3.eth.block_number - cfg.chain.confirmations
    for a, b in ranges_up_to(cfg.chain.start_block, cfg.chain.range_size, safe):
        ingest_range(cfg, client, engine, a, b)
    buf = io.StringIO()
    assert export_events(engine_for(db), buf).to_block == safe
    crossed: list[tuple[int, str]] = []

    def uncrossed(block: int, books: dict[str, MarketReplay]) -> None:
        crossed.extend((block, m) for m, mr in books.items() if mr.crossed())

    res = replay((CanonicalEvent.from_json(x) for x in buf.getvalue().splitlines()), strict=True,
                 check_each_block=True, on_block=uncrossed)
    assert crossed == []
    for metric, c in _contracts(w3, chain).items():
        state_hash, _levels = _contract_state_hash(c, safe)
        mr = res.books[metric]
        for side in (BUY, SELL):
            top = list(zip(*c.functions.getLevels(side, 50).call(block_identifier=safe), strict=True))  # type: ignore
            assert [(lv.price, lv.quantity, lv.orders) for lv in mr.book.levels(side, 50)] == top
        assert mr.book.state_hash() == state_hash
