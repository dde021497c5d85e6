"""Real processes, really killed: SIGKILL of `orderbook live serve` mid-flow and a restart on the populated
database; SIGKILL of one of two cluster worker processes while an API process serves clients; SIGKILL of
`orderbook ingest` while a range's write transaction is open. The reference afterwards is the chain (the
contracts' getLevels) or an uninterrupted ingestion (tests/test_crash_resume.py's clean reference)."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import redis
from sqlalchemy import text

from orderbook_pipelines.config import PROJECT_ROOT
from orderbook_pipelines.devchain.anvil import Anvil, free_port
from orderbook_pipelines.devchain.simulator import Simulator
from orderbook_pipelines.ingestion.ingest import ingest_range
from orderbook_pipelines.ingestion.ranges import ranges_up_to
from orderbook_pipelines.live.cluster import owner_of
from orderbook_pipelines.storage.checkpoints import all_ranges
from orderbook_pipelines.storage.db import drop_database, engine_for
from tests.conftest import DevChain, cli_argv, make_devchain, new_database
from tests.fork_support import ChainTruth, ResetBookClient, wait_for
from tests.test_crash_resume import (
    APP,
    Reference,
    _assert_consistent,
    _dump,
    _final_ranges,
    _ingest_in_process,
    _resume,
    _wait_backends_gone,
)

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
MARKETS = ["SILVER_V1", "GOLD_V1", "COPPER_V1"]
GEN2 = ["ALUMINUM_V1"]
CLUSTER_TTL_S = 3.0  # live/cluster.py: a crashed worker's markets move once its heartbeat is this old


@pytest.fixture(scope="module")
def kchain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevChain]:
    anvil = Anvil()
    try:
        chain = make_devchain(anvil, tmp_path_factory.mktemp("kills"), MARKETS, GEN2, confirmations=2, range_size=10)
        Simulator(anvil.w3, chain.dep, seed=31, traders=4).run_batches(120, per_block=12)
        yield chain
    finally:
        anvil.stop()


def _ingest_final(chain: DevChain, db: str) -> None:
    """Every complete final range not stored yet, in process."""
    from orderbook_pipelines.chain.rpc import ChainClient

    c = chain.config.chain
    client = ChainClient(chain.anvil.url)
    safe = client.safe_head(c.finality, c.confirmations)
    with engine_for(db).connect() as conn:
        done = {cp.range_start for cp in all_ranges(conn, c.chain_id) if cp.processed_to == cp.range_end}
    for a, b in ranges_up_to(c.start_block, c.range_size, safe):
        if b <= safe and a not in done:
            ingest_range(chain.config, client, engine_for(db), a, b)


class Flow:
    """Order flow in a thread until stopped: the chain moves while processes die and come back."""

    def __init__(self, chain: DevChain, seed: int):
        self.sim = Simulator(chain.anvil.w3, chain.dep, seed=seed, traders=4)
        self.stop_event = threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            while not self.stop_event.is_set():
                self.sim.run_batches(12, per_block=6)
                time.sleep(0.05)
        except BaseException as exc:  # reported by stop()
            self.error = exc

    def __enter__(self) -> Flow:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        self.stop_event.set()
        self.thread.join(60)
        if self.error is not None:
            raise self.error


class LiveProcess:
    """`orderbook live serve` as its own OS process (own session, so only this test's signals reach it)."""

    def __init__(self, chain: DevChain, db: str, log_dir: Path, *args: str, cluster_prefix: str | None = None):
        self.port = free_port()
        self.url = f"127.0.0.1:{self.port}"
        env = {k: v for k, v in os.environ.items() if k not in ("REDIS_URL", "OBP_REDIS_PREFIX", "OBP_CRASH_AT")}
        env.update(DATABASE_URL=db, OBP_CONFIG=str(chain.config_path))
        if cluster_prefix is not None:
            env.update(REDIS_URL=REDIS_URL, OBP_REDIS_PREFIX=cluster_prefix)
        self.log = log_dir / f"live-{self.port}.log"
        with self.log.open("w") as out:
            self.proc = subprocess.Popen(cli_argv("live", "serve", "--port", str(self.port), *args), env=env,
                                         cwd=PROJECT_ROOT, stdout=out, stderr=subprocess.STDOUT,
                                         start_new_session=True)

    def tail(self) -> str:
        return "\n".join(self.log.read_text().splitlines()[-15:])

    def wait_ready(self, timeout: float = 90) -> None:
        def ready() -> bool:
            assert self.proc.poll() is None, f"live process exited {self.proc.returncode}:\n{self.tail()}"
            try:
                return httpx.get(f"http://{self.url}/ready", timeout=2).status_code == 200
            except httpx.HTTPError:
                return False

        wait_for(ready, lambda: f"{self.url} never became ready:\n{self.tail()}", timeout, step=0.1)

    def health(self) -> dict:
        return httpx.get(f"http://{self.url}/health", timeout=5).json()

    def sigkill(self) -> None:
        os.kill(self.proc.pid, signal.SIGKILL)
        assert self.proc.wait(30) == -signal.SIGKILL

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)


def _settle_equal(chain: DevChain, clients: list[ResetBookClient], timeout: float = 60) -> None:
    """Every client's book ends equal to the contract's levels at the head (the chain is quiet by now)."""
    truth = ChainTruth(chain)
    head = truth.head()[0]
    for c in clients:
        bids, asks = truth.levels(c.market, head)
        want = ([(p, q) for p, q, _ in bids], [(p, q) for p, q, _ in asks])
        assert c.pump(lambda cl=c, w=want: cl.levels() == w, timeout), (  # type: ignore[misc]
            f"{c.market}: the client's book never became the contract's at block {head}: client {c.levels()} "
            f"(seq {c.seq}, deltas {c.deltas}, gaps {c.gaps}, resets {c.resets}, last {c.stream[-1:]}), "
            f"contract {want}")
        assert c.checksum_failures == 0, (c.market, c.checksum_failures)


def test_live_service_sigkilled_mid_flow_restarts_on_the_populated_database(kchain: DevChain,
                                                                            tmp_path: Path) -> None:
    db = new_database()
    procs: list[LiveProcess] = []
    try:
        _ingest_final(kchain, db)
        first = LiveProcess(kchain, db, tmp_path)
        procs.append(first)
        first.wait_ready()
        before = [ResetBookClient(first.url, m) for m in MARKETS + GEN2]
        with Flow(kchain, seed=41):
            wait_for(lambda: sum(c.pump(lambda: False, 0.2) or c.deltas for c in before) > 10,
                     "the live service sent no deltas while the chain moved", 60)
            first.sigkill()  # mid-flow: blocks keep coming while it is dead
            for c in before:
                c.close()
            _ingest_final(kchain, db)  # ingestion goes on: the restart finds a database ahead of the dead process
            second = LiveProcess(kchain, db, tmp_path)
            procs.append(second)
            second.wait_ready()
            after = [ResetBookClient(second.url, m) for m in MARKETS + GEN2]
            wait_for(lambda: sum(c.pump(lambda: False, 0.2) or c.deltas for c in after) > 10,
                     "the restarted service sent no deltas while the chain moved", 60)
        _settle_equal(kchain, after)
        assert all(c.gaps == 0 for c in after), [(c.market, c.gaps) for c in after]
        with engine_for(db).connect() as conn:
            stored = max(cp.processed_to for cp in all_ranges(conn, kchain.config.chain.chain_id))
        assert second.health()["cold_start_s"] >= 0 and second.health()["applied_block"] >= stored
        for c in after:
            c.close()
    finally:
        for p in procs:
            p.stop()
        drop_database(db)


def test_cluster_worker_sigkilled_its_markets_move_within_the_ttl_and_api_clients_stay_correct(
        kchain: DevChain, tmp_path: Path) -> None:
    db = new_database()
    prefix = f"obptest:{uuid.uuid4().hex[:8]}:"
    names = MARKETS + GEN2
    first, second = next((f"k1-{i}", f"k2-{i}") for i in range(100)
                         if 0 < sum(owner_of(m, [f"k1-{i}", f"k2-{i}"]) == f"k1-{i}" for m in names) < len(names))
    r = redis.Redis.from_url(REDIS_URL)
    procs: list[LiveProcess] = []

    def owners() -> dict[str, str | None]:
        return {m: (v.decode() if (v := r.get(f"{prefix}owner:{m}")) else None) for m in names}

    try:
        _ingest_final(kchain, db)
        w1 = LiveProcess(kchain, db, tmp_path, "--cluster", "--worker-id", first, cluster_prefix=prefix)
        w2 = LiveProcess(kchain, db, tmp_path, "--cluster", "--worker-id", second, cluster_prefix=prefix)
        api = LiveProcess(kchain, db, tmp_path, "--cluster", cluster_prefix=prefix)
        procs += [w1, w2, api]
        for p in procs:
            p.wait_ready()
        wait_for(lambda: set(owners().values()) == {first, second}, lambda: f"no split: {owners()}", 30)
        moved = sorted(m for m, o in owners().items() if o == first)
        clients = [ResetBookClient(api.url, m) for m in names]
        with Flow(kchain, seed=43):
            wait_for(lambda: all(c.pump(lambda: False, 0.1) or c.deltas for c in clients),
                     "the API process sent no deltas for some market", 60)
            killed_at = time.monotonic()
            w1.sigkill()
            wait_for(lambda: set(owners().values()) == {second}, lambda: f"not adopted: {owners()}",
                     CLUSTER_TTL_S + 10, step=0.05)
            adopted_s = time.monotonic() - killed_at
            marks = {c.market: c.deltas for c in clients}
            wait_for(lambda: all(c.pump(lambda: False, 0.1) or c.deltas > marks[c.market] for c in clients),
                     "after the adoption some market's clients got no more deltas", 60)
        print(f"worker {first} SIGKILLed: its markets {moved} adopted by {second} after {adopted_s:.2f}s")
        # heartbeats every TTL/3: the markets move once the last beat is TTL old, at the survivor's next beat
        # (plus its claim and the Redis round trips: 2 s of slack for a loaded machine)
        assert adopted_s <= CLUSTER_TTL_S + CLUSTER_TTL_S / 3 + 2.0, adopted_s
        _settle_equal(kchain, clients)
        for c in clients:  # gap-free, or told to start over
            assert c.gaps == 0 or c.resets > 0, (c.market, c.gaps, c.resets)
            c.close()
        assert w2.health()["cluster"]["owned_markets"] == len(names)
    finally:
        for p in procs:
            p.stop()
        keys = list(r.scan_iter(f"{prefix}*"))
        if keys:
            r.delete(*keys)
        drop_database(db)


@pytest.fixture(scope="module")
def ichain(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevChain]:
    """Small ranges (4 blocks) with events in most of them: many short write transactions to be killed in."""
    anvil = Anvil()
    try:
        chain = make_devchain(anvil, tmp_path_factory.mktemp("ingest-kill"), MARKETS, GEN2, confirmations=2,
                              range_size=4)
        Simulator(anvil.w3, chain.dep, seed=47, traders=4).run_batches(300, per_block=5)
        anvil.mine(3)
        yield chain
    finally:
        anvil.stop()


@pytest.fixture(scope="module")
def iclean(ichain: DevChain) -> Iterator[Reference]:
    """The uninterrupted run over every final range, and the state after each of its ranges."""
    ranges = _final_ranges(ichain)
    assert len(ranges) >= 10, ranges
    db = new_database()
    try:
        after = {k: _dump(db) for k, _ in enumerate(_ingest_in_process(ichain, db, ranges, ranges[-1][1]), start=1)}
        yield Reference(ranges[0][0], ranges[-1][1], ranges, after[len(ranges)], after)
    finally:
        drop_database(db)


def _in_write_transaction(db: str) -> bool:
    """The ingest run holds an open transaction that has written (a range between its first write and commit)."""
    with engine_for(db).connect() as conn:
        return bool(conn.execute(text(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() AND application_name = :a "
            "AND backend_xid IS NOT NULL"), {"a": APP}).scalar())


@pytest.mark.parametrize("workers", [1, 2])
def test_ingest_sigkilled_inside_a_range_write_then_rerun_equals_a_clean_ingest(
        ichain: DevChain, iclean: Reference, workers: int) -> None:
    """Not a crash point: a real SIGKILL from outside while a range's transaction has written rows. With
    workers the parent is killed (as an OOM killer would): its worker processes must not leave half a range."""
    rng = random.Random(os.environ.get("OBP_KILL_SEED", "7"))
    db = new_database()
    try:
        env = {k: v for k, v in os.environ.items() if k != "OBP_CRASH_AT"}
        env.update(DATABASE_URL=db, OBP_CONFIG=str(ichain.config_path), PGAPPNAME=APP)
        args = ["ingest", "--from", str(iclean.start), "--to", str(iclean.end), "--workers", str(workers)]
        proc = subprocess.Popen(cli_argv(*args), env=env, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL,
                                stderr=subprocess.PIPE, text=True, start_new_session=True)
        skip = rng.randint(1, max(1, len(iclean.ranges) // 2))  # let a few ranges commit first

        def mid_write() -> bool:
            assert proc.poll() is None, f"ingest ended before it was killed: {proc.stderr and proc.stderr.read()}"
            with engine_for(db).connect() as conn:
                done = conn.execute(text("SELECT count(*) FROM ingestion_checkpoints")).scalar() or 0
            return done >= skip and _in_write_transaction(db)

        wait_for(mid_write, "never caught the run inside a range's write transaction", 300, step=0.005)
        os.kill(proc.pid, signal.SIGKILL)
        assert proc.wait(30) == -signal.SIGKILL
        _wait_backends_gone(db)  # the killed transaction rolls back (orphaned workers finish theirs and exit)
        done = _assert_consistent(ichain, iclean, db)
        assert len(done) < len(iclean.ranges), "the run was killed after everything had committed"
        _resume(ichain, iclean, db)  # rerun from the frontier, as the operator would: equal to the clean run
    finally:
        drop_database(db)
