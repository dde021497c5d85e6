"""Randomized fork scenarios on one anvil chain: ingestion into Postgres, reconciliation, the live service and
its protocol clients, all held against the chain after every fork.

Each scenario draws, from its own seed: a fork depth of 1-64 blocks (deeper than the confirmation depth and
deeper than the live service keeps undo logs for, too), a replacement branch shorter, equal or longer than the
branch it replaces, and a kind: a fork at the tip, one starting at a block-range boundary, one replacing the
block a depth snapshot was stored at, or one during the live service's cold start (the chain forks again while
the rebuild reads it). The branches carry different transactions, so every replaced block changes its hash.

After each fork the reference is the chain: Postgres (after the runbook's `reconcile --repair` when the fork
reached stored blocks) holds exactly the logs of the canonical branch and its orders equal the contracts'
getLevels at the ingested frontier; the live books and every protocol client's book equal getLevels at the
head; trades and orders subscribers got `reverted` from the fork point on (and the trades a client keeps after
applying every `reverted` are exactly the chain's trade logs); book subscribers got `reset: true` snapshots
exactly when the service rebuilt its books.

Reproduce: the failing scenario's seed is in the failure message; `OBP_FORK_SEED=<seed>` reruns that one
scenario on a fresh chain, `OBP_FORK_BASE_SEED=<base>` reruns the whole sequence. `OBP_FORK_SCENARIOS=N` sets
how many (default 50; `make soak` runs more)."""

from __future__ import annotations

import os
import random
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from orderbook_pipelines.book.model import BUY, SELL
from orderbook_pipelines.chain.rpc import ChainClient
from orderbook_pipelines.config import load_config
from orderbook_pipelines.devchain.anvil import Anvil
from orderbook_pipelines.ingestion.ingest import ingest_range
from orderbook_pipelines.ingestion.ranges import ranges_up_to
from orderbook_pipelines.ingestion.reconcile import reconcile
from orderbook_pipelines.live.hub import Limits
from orderbook_pipelines.live.service import LiveService, ServiceOptions
from orderbook_pipelines.recovery.restore import books_at, build_snapshots
from orderbook_pipelines.recovery.store import store_snapshots
from orderbook_pipelines.storage.checkpoints import all_ranges, frontier
from orderbook_pipelines.storage.db import drop_database, engine_for
from tests.conftest import DevChain, make_devchain, new_database
from tests.fork_support import (
    ChainTruth,
    Gate,
    ResetBookClient,
    RowsClient,
    mine_branch,
    stored_levels,
    stored_log_keys,
    wait_for,
)
from tests.live_harness import running_service
from tests.rpc_proxy import RpcProxy

CONFIRMATIONS = 6
RANGE_SIZE = 16
KEEP_BLOCKS = 24  # undo logs the live service keeps: deeper forks make it rebuild (`reset`)
MAX_DEPTH = 64
GEN1, GEN2 = ["SILVER_V1", "GOLD_V1"], ["ALUMINUM_V1"]
KINDS = ("tip", "tip", "boundary", "snapshot", "cold_start")


def _seeds() -> tuple[int | None, list[int]]:
    one = os.environ.get("OBP_FORK_SEED")
    if one:
        return None, [int(one)]
    base = int(os.environ.get("OBP_FORK_BASE_SEED") or random.SystemRandom().getrandbits(32))
    n = int(os.environ.get("OBP_FORK_SCENARIOS", "50"))
    rng = random.Random(base)
    return base, [rng.getrandbits(32) for _ in range(n)]


BASE_SEED, SEEDS = _seeds()


@dataclass(frozen=True)
class Plan:
    seed: int
    kind: str
    depth: int  # blocks replaced (the old branch's length above the fork point)
    new_len: int  # length of the replacement branch
    boundary_at_end: bool = False  # boundary kind: the fork's first block ends a range (else it starts one)
    inner_after_logs: bool = False  # cold_start kind: the second fork lands after the catch-up's logs were read

    @property
    def replacement(self) -> str:
        return "shorter" if self.new_len < self.depth else "equal" if self.new_len == self.depth else "longer"


def draw(seed: int) -> Plan:
    rng = random.Random(seed)
    kind = rng.choice(KINDS)
    lo = {"cold_start": KEEP_BLOCKS + 1, "snapshot": CONFIRMATIONS + RANGE_SIZE + 1}.get(kind, 1)
    # tip and boundary forks: 1-64 deep, shallow ones more often (as on real chains, and cheaper to follow)
    depth = rng.randint(lo, MAX_DEPTH if lo > 1 or rng.random() < 0.4 else 2 * CONFIRMATIONS)
    how = rng.choice(("shorter", "equal", "longer")) if depth > 1 else rng.choice(("equal", "longer"))
    new_len = {"shorter": rng.randint(1, depth - 1) if depth > 1 else 1, "equal": depth,
               "longer": depth + rng.randint(1, 8)}[how]
    return Plan(seed, kind, depth, new_len, rng.random() < 0.5, rng.random() < 0.5)


@dataclass
class World:
    chain: DevChain
    db: str
    service: LiveService
    url: str
    gate: Gate
    truth: ChainTruth
    books: list[ResetBookClient]
    rows: RowsClient
    subscribed_at: int  # the head when the rows client subscribed: its trade stream covers later blocks
    snapshot_dir: Path
    failed: str | None = None

    @property
    def anvil(self) -> Anvil:
        return self.chain.anvil

    @property
    def client(self) -> ChainClient:
        return ChainClient(self.chain.anvil.url)

    def frontier(self) -> int | None:
        c = self.chain.config.chain
        with engine_for(self.db).connect() as conn:
            return frontier(conn, c.chain_id, c.start_block)

    def ingest_final(self) -> int | None:
        """Every complete final range not stored yet, in order, in process (the assets' and CLI's path)."""
        cfg, client = self.chain.config, self.client
        c = cfg.chain
        safe = client.safe_head(c.finality, c.confirmations)
        with engine_for(self.db).connect() as conn:
            done = {(cp.range_start, cp.processed_to) for cp in all_ranges(conn, c.chain_id)}
        for a, b in ranges_up_to(c.start_block, c.range_size, safe):
            if b <= safe and (a, b) not in done:
                ingest_range(cfg, client, engine_for(self.db), a, b)
        return self.frontier()

    def live_current(self, timeout: float = 60) -> None:
        follower, hub = self.service.follower, self.service.hub

        def current() -> bool:  # the books at the chain's head, and every update of theirs handed to the hub
            applied = follower.books.head
            if applied is None or (applied.number, applied.hash) != self.truth.head():
                return False
            return all((v := hub.views.get(m)) is not None and v.seq == follower.books.seq[m]
                       for m in follower.market_names)

        wait_for(current, lambda: f"live books at {self.service.follower.books.head}, chain at {self.truth.head()}",
                 timeout)


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    tmp = tmp_path_factory.mktemp("forks")
    anvil = Anvil()
    db = new_database()
    gate = Gate()
    try:
        chain = make_devchain(anvil, tmp, GEN1, GEN2, confirmations=CONFIRMATIONS, range_size=RANGE_SIZE)
        mine_branch(anvil, chain, random.Random(0), RANGE_SIZE + CONFIRMATIONS + 3, tag=7, busy_blocks=6)
        with RpcProxy(anvil.url, gate) as proxy:
            # the live service reads the chain through the proxy, where a test can fork it during a cold start
            doc = yaml.safe_load(chain.config_path.read_text())
            doc["chain"]["rpc_url"] = proxy.url
            live_path = tmp / "live.yaml"
            live_path.write_text(yaml.safe_dump(doc))
            live_chain = DevChain(anvil, chain.dep, live_path, load_config(live_path))
            options = ServiceOptions(poll_s=0.05, head_subscription=False, keep_blocks=KEEP_BLOCKS,
                                     markets_refresh_s=0.5)
            truth = ChainTruth(chain)
            w0 = World(chain, db, None, "", gate, truth, [], None, 0, tmp / "snapshots")  # type: ignore[arg-type]
            w0.ingest_final()
            with running_service(live_chain, db, Limits(idle_timeout_s=3600), options=options) as (service, url):
                w0.service, w0.url = service, url
                w0.live_current()
                w0.books = [ResetBookClient(url, m, depth=100) for m in GEN1 + GEN2]
                traders = [a.lower() for a in anvil.w3.eth.accounts[1:4]]
                w0.rows = RowsClient(url, GEN1 + GEN2, traders)
                w0.subscribed_at = truth.head()[0]
                yield w0
                for c in w0.books:
                    c.close()
                w0.rows.close()
    finally:
        gate.open()
        drop_database(db)
        anvil.stop()


def _describe(plan: Plan) -> str:
    rerun = f"OBP_FORK_SEED={plan.seed}" + (f" (whole run: OBP_FORK_BASE_SEED={BASE_SEED})" if BASE_SEED else "")
    return (f"scenario seed {plan.seed} [{plan.kind}, depth {plan.depth}, {plan.replacement} replacement of "
            f"{plan.new_len}]; rerun with {rerun}")


@pytest.mark.parametrize("seed", SEEDS, ids=[f"seed{s}" for s in SEEDS])
def test_fork_scenario(world: World, seed: int) -> None:
    if world.failed:
        pytest.skip(f"an earlier scenario failed ({world.failed}); the shared chain is in an unknown state")
    plan = draw(seed)
    print(_describe(plan))
    try:
        run_scenario(world, plan)
    except BaseException as exc:
        world.failed = f"seed {seed}"
        if isinstance(exc, AssertionError):
            raise AssertionError(f"{_describe(plan)}\n{exc}") from exc
        raise


def run_scenario(w: World, plan: Plan) -> None:
    rng = random.Random(plan.seed ^ 0x5EED)
    anvil, truth, cfg = w.anvil, w.truth, w.chain.config
    c = cfg.chain
    if plan.kind == "boundary":  # make the fork's first block start a range, or end one
        first = truth.head()[0] + 1
        target = (c.range_size - 1) if plan.boundary_at_end else 0
        pad = (target - (first - c.start_block)) % c.range_size
        if pad:
            anvil.mine(pad)
            w.live_current()
    w.rows.barrier()
    rows_mark = len(w.rows.messages)
    resets_before = [b.resets for b in w.books]
    fork_point = truth.head()[0] + 1
    evm_snapshot = anvil.rpc("evm_snapshot")

    mine_branch(anvil, w.chain, rng, plan.depth, tag=1)
    w.live_current()
    if plan.kind != "cold_start":
        w.ingest_final()
    if plan.kind == "snapshot":
        snaps, _ = build_snapshots(engine_for(w.db), chain_id=c.chain_id, start_block=c.start_block)
        store_snapshots(engine_for(w.db), snaps, w.snapshot_dir)
    stored_before = w.frontier()
    must_reset = plan.depth > KEEP_BLOCKS  # deeper than the undo logs kept: the books are rebuilt
    may_reset = plan.depth > CONFIRMATIONS  # blocks final at the last rebuild have no undo logs either

    if plan.kind == "cold_start":
        w.gate.close()  # the service sees nothing of the new branch until it is complete (and the hook armed)
    anvil.rpc("evm_revert", evm_snapshot)
    if plan.kind == "cold_start":
        split = rng.randint(1, plan.new_len - 1) if plan.new_len > 1 else 1
        mine_branch(anvil, w.chain, rng, split, tag=2)
        inner = anvil.rpc("evm_snapshot")
        mine_branch(anvil, w.chain, rng, plan.new_len - split, tag=2)
        inner_rng = random.Random(rng.getrandbits(32))
        inner_len = inner_rng.randint(plan.new_len - split + 1, plan.new_len - split + 8)

        def fork_again() -> None:
            anvil.rpc("evm_revert", inner)
            mine_branch(anvil, w.chain, inner_rng, inner_len, tag=3)

        w.gate.arm(fork_again, after_response=plan.inner_after_logs, upstream=anvil.url)
        w.gate.open()
    else:
        mine_branch(anvil, w.chain, rng, plan.new_len, tag=2)

    # Postgres: the runbook. A dry run names the fork when it reached stored (final) blocks; the repair heals it.
    forked_pg = stored_before is not None and fork_point <= stored_before
    since = max(c.start_block, fork_point - RANGE_SIZE)  # `orderbook reconcile --from ...` (earlier forks: walk back)
    dry = reconcile(cfg, w.client, engine_for(w.db), start=since, repair=False)
    assert (dry.reorg is not None) == forked_pg, (
        f"dry run: reorg {dry.reorg}, but the fork at {fork_point} {'did' if forked_pg else 'did not'} reach the "
        f"stored frontier {stored_before}")
    if forked_pg:
        assert dry.reorg is not None and dry.reorg.fork_block >= fork_point
        repaired = reconcile(cfg, w.client, engine_for(w.db), start=since)
        assert repaired.repaired
        again = reconcile(cfg, w.client, engine_for(w.db), start=since, repair=False)
        assert not again.mismatched, f"reconciliation still sees differences after the repair: {again.metadata()}"
    if plan.kind == "cold_start":
        wait_for(w.gate.fired.is_set, "the cold start never read the chain's logs (no second fork happened)", 60)
    w.live_current()
    top = w.ingest_final()
    w.truth.forget()  # from here on the chain stands still: each block's views are read once
    _check_postgres(w, top)
    _check_live(w, plan, fork_point, rows_mark, resets_before, must_reset, may_reset)


def _check_postgres(w: World, top: int | None) -> None:
    c = w.chain.config.chain
    assert top is not None, "nothing ingested"
    chain_logs = w.truth.log_keys(c.start_block, top)
    stored = stored_log_keys(w.db, c.chain_id, top)
    if stored != chain_logs:
        have, want = set(stored), set(chain_logs)
        dupes = len(stored) - len(have)
        raise AssertionError(f"stored logs up to {top} differ from the chain's: {len(want - have)} lost, "
                             f"{len(have - want)} not on the chain, {dupes} duplicated; first lost "
                             f"{min(want - have, default=None)}, first extra {min(have - want, default=None)}")
    for m, (addr, _views) in w.truth.markets.items():
        assert stored_levels(w.db, addr) == w.truth.levels(m, top), f"{m}: orders in Postgres at {top}"
    # the stored event stream as the cold start reads it (latest still-valid snapshot + stored events)
    with engine_for(w.db).connect() as conn:
        restored = books_at(conn, top, chain_id=c.chain_id)
    names = {v: k for k, v in w.service.follower.market_names.items()}
    for m in w.truth.markets:
        book = restored.books[names[m]].book
        got = tuple([(lv.price, lv.quantity, lv.orders) for lv in book.levels(s, 100)] for s in (BUY, SELL))
        assert got == w.truth.levels(m, top), f"{m}: books restored from the stored events (and snapshots) at {top}"


def _check_live(w: World, plan: Plan, fork_point: int, rows_mark: int, resets_before: list[int],
                must_reset: bool, may_reset: bool) -> None:
    head = w.truth.head()[0]
    follower = w.service.follower
    names = {v: k for k, v in follower.market_names.items()}
    for m in w.truth.markets:
        want = w.truth.levels(m, head)
        book = follower.books.books[names[m]]
        got = tuple([(lv.price, lv.quantity, lv.orders) for lv in book.levels(s, 100)] for s in (BUY, SELL))
        assert got == want, f"{m}: live book at {head}"
    for client in w.books:  # the live books are current: everything they sent is before the barrier's pong
        bids, asks = w.truth.levels(client.market, head)
        client.barrier()
        assert client.levels() == ([(p, q) for p, q, _ in bids], [(p, q) for p, q, _ in asks]), (
            f"{client.market}: the protocol client's book at {head}")
        assert client.gaps == 0 and client.checksum_failures == 0, (client.market, client.gaps,
                                                                    client.checksum_failures)
    resets = [b.resets - r for b, r in zip(w.books, resets_before, strict=True)]
    reset = follower.stats.resets and any(resets)
    if must_reset:
        assert all(resets), f"a fork {plan.depth} deep (> {KEEP_BLOCKS} kept) must reach clients as `reset`: {resets}"
    if not may_reset:
        assert not any(resets), f"a fork {plan.depth} deep was rolled back, yet clients got `reset`: {resets}"
    # trades/orders subscribers: `reverted` from the fork point (a rebuild may void from an earlier block)
    w.rows.barrier()
    reverted = w.rows.reverted(rows_mark)
    assert reverted, "no `reverted` after the fork"
    if any(resets):
        assert min(reverted) <= fork_point, (reverted, fork_point)
    else:
        assert not reset and reverted == [fork_point] * len(reverted), (reverted, fork_point)
    kept = {(m["block"]["number"], m["block"]["hash"], m["log_index"]) for m in w.rows.effective("trade")}
    chain_trades = w.truth.trade_keys(w.subscribed_at + 1, head)
    assert kept == chain_trades, (f"trades kept after applying `reverted`: {len(kept - chain_trades)} not on the "
                                  f"chain, {len(chain_trades - kept)} missing (first missing "
                                  f"{min(chain_trades - kept, default=None)})")
    canonical = {n: w.truth.block_hash(n) for n in {m["block"]["number"] for m in w.rows.effective("order")}}
    stale = [m for m in w.rows.effective("order") if canonical[m["block"]["number"]] != m["block"]["hash"]]
    assert not stale, f"order messages of replaced blocks not voided by `reverted`: {stale[:3]}"


def test_scenarios_cover_every_kind_and_replacement() -> None:
    """The draw itself: across the default run every kind and replacement occurs, and depths span the range."""
    if len(SEEDS) < 50:
        pytest.skip("a single-scenario rerun")
    plans = [draw(s) for s in SEEDS]
    assert {p.kind for p in plans} == set(KINDS)
    assert {p.replacement for p in plans} == {"shorter", "equal", "longer"}
    assert any(p.depth > KEEP_BLOCKS for p in plans)
