"""Benchmark: the real mix, end to end - what a user waits for from process start to exit.

Workload ("realmix" profile): the reference generation-1 contracts (OrderRouter plus one OrderBook per market,
deployed by `devchain.deploy`) driven by the seeded order-flow simulator (`devchain.simulator`): limit orders that
rest or cross (price-time matching in the book: OrderMatched, two OrderExecuted, often OrderRemoved), market
orders, cancels; one market per transaction. The chain therefore carries exactly what the contracts emit,
including the book library's events. (bench.backfill's EventSpammer is the other, named profile: opens only.)

Measured on that chain, each in a fresh database, wall time of whole processes from spawn to exit:
- `orderbook ingest --from S --to E --workers 1` and `--workers 2` (confirmations and range size from the
  deployment's configuration, 12 and 2,000 by default);
- a Dagster backfill of `ingest_block_range` over the same blocks: one `dagster asset materialize --partition K`
  process per block-range partition (a run launcher starts one process per run), `--dagster-concurrency` at once.
Per run: events/s, CPU seconds per event of the node, Postgres and the indexer processes, and the indexer's stage
seconds (summed over ranges) from its "range ingested" log lines.

Baseline (same run, before and after the ingest runs): the node's bare rate - one eth_getLogs over every
configured contract for the whole span plus `json.loads` of the answer; each figure is reported as a ratio to it.

    .venv/bin/python -m bench.realmix [--actions 38000] [--markets 50] [--per-block 200] [--seed 13]
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import defaultdict
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from eth_abi import encode as abi_encode
from sqlalchemy.engine import make_url
from web3 import Web3

from bench.common import (
    TICK,
    UNIT,
    Anvil,
    Report,
    anvil,
    bench_database,
    children_cpu_s,
    log,
    postgres_cpu_s,
    process_cpu_s,
    process_env,
    warm_up,
)
from orderbook_pipelines.config import PROJECT_ROOT, load_config
from orderbook_pipelines.devchain.deploy import Deployment, deploy, project_config, write_config
from orderbook_pipelines.ingestion.ranges import range_key, ranges_between
from orderbook_pipelines.storage.db import drop_database, engine_for, ensure_database

BIN = Path(sys.executable).parent
ORDERBOOK = str(BIN / "orderbook")
DAGSTER = str(BIN / "dagster")
INGEST_ASSETS = "order_events,trades,orders,positions"


def market_names(n: int) -> list[str]:
    return [f"REAL_{i:03d}_V1" for i in range(n)]


class Flow:
    """The seeded price-time matching flow of `devchain.simulator` (same action mix: ~22% cancels of resting
    orders, ~13% market orders, limit orders around a random-walk mid, a few crossing), sent a block at a time in
    one batched JSON-RPC request; resting orders are tracked from the mined block's router logs instead of a
    receipt request and a `getOrder` call per transaction (what made the simulator too slow for 100k events)."""

    def __init__(self, chain: Anvil, dep: Deployment, seed: int, traders: int = 8, cross_ticks: int = 6) -> None:
        self.url, self.rng = chain.url, random.Random(seed)
        self.router = dep.router
        self.traders = [a.lower() for a in chain.w3.eth.accounts[1 : 1 + traders]]
        self.markets = sorted(dep.gen1_books)
        self.mid = {m: (100 + 10 * i) * UNIT for i, m in enumerate(self.markets)}
        self.resting: dict[str, dict[int, str]] = {m: {} for m in self.markets}  # market -> order id -> owner
        self.cross = cross_ticks
        self.stats = {"sent": 0, "limit": 0, "market": 0, "cancels": 0, "reverted": 0, "blocks": 0}
        self._rpc_id = 0
        self.nonces: dict[str, int] = {}
        self._topics = {Web3.keccak(text=sig).hex().removeprefix("0x"): name for name, sig in (
            ("placed", "OrderPlaced(uint256,address,string,uint8,uint8,uint256,uint256)"),
            ("executed", "OrderExecuted(uint256,address,uint256,uint256,uint256)"),
            ("cancelled", "OrderCancelled(uint256,address,uint256)"))}
        self._market_of: dict[int, str] = {}
        self._left: dict[int, int] = {}
        self._hash = {"0x" + Web3.keccak(text=m).hex().removeprefix("0x"): m for m in self.markets}

    def _rpc(self, calls: list[tuple[str, list[Any]]]) -> list[Any]:
        body = []
        for method, params in calls:
            self._rpc_id += 1
            body.append({"jsonrpc": "2.0", "id": self._rpc_id, "method": method, "params": params})
        req = urllib.request.Request(self.url, json.dumps(body).encode(), {"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=600) as resp:
            out = sorted(json.loads(resp.read()), key=lambda r: r["id"])
        for r in out:
            if "error" in r:
                raise RuntimeError(f"RPC error: {r['error']}")
        return [r["result"] for r in out]

    def _tx(self, sender: str, data: bytes) -> tuple[str, list[Any]]:
        """Explicit nonces: a node may run a batch's items concurrently and give two of them one nonce."""
        self.stats["sent"] += 1
        nonce = self.nonces[sender]
        self.nonces[sender] += 1
        return "eth_sendTransaction", [{"from": sender, "to": self.router, "data": "0x" + data.hex(),
                                        "gas": hex(3_000_000), "gasPrice": hex(2 * 10**9), "nonce": hex(nonce)}]

    def _action(self) -> tuple[str, list[Any]]:
        rng = self.rng
        m = rng.choice(self.markets)
        trader = rng.choice(self.traders)
        roll = rng.random()
        self.mid[m] = max(20 * TICK, self.mid[m] + rng.randint(-2, 2) * TICK)
        qty = rng.randint(1, 20) * UNIT // 10
        side = rng.randint(0, 1)
        if roll < 0.22 and self.resting[m]:
            oid = rng.choice(sorted(self.resting[m]))
            owner = self.resting[m].pop(oid)
            self.stats["cancels"] += 1
            return self._tx(owner, _CANCEL + abi_encode(["uint256"], [oid]))
        if roll < 0.35:
            self.stats["market"] += 1
            return self._tx(trader, _PLACE + abi_encode(_PLACE_ARGS, [m, 0, side, qty, 0]))
        offset = rng.randint(-self.cross, 12) * TICK
        price = self.mid[m] - offset if side == 0 else self.mid[m] + offset
        self.stats["limit"] += 1
        return self._tx(trader, _PLACE + abi_encode(_PLACE_ARGS, [m, 1, side, qty, max(TICK, price)]))

    def _settle(self, block: int) -> None:
        """Resting orders after the block, from its receipts' router logs (eth_getBlockReceipts: a block lookup,
        where anvil's eth_getLogs scans the whole chain and slows down as it grows)."""
        receipts = self._rpc([("eth_getBlockReceipts", [hex(block)])])[0]
        self.stats["reverted"] += sum(1 for r in receipts if int(r["status"], 16) != 1)
        for lg in (lg for r in receipts for lg in r["logs"]):
            if lg["address"].lower() != self.router:
                continue
            kind = self._topics.get(lg["topics"][0][2:])
            oid = int(lg["topics"][1], 16)
            data = bytes.fromhex(lg["data"][2:])
            if kind == "placed":
                otype, qty = int.from_bytes(data[:32], "big"), int.from_bytes(data[64:96], "big")
                if otype == 1:
                    self._left[oid] = qty
                    self._market_of[oid] = self._hash[lg["topics"][3]]
                    self.resting[self._market_of[oid]][oid] = "0x" + lg["topics"][2][-40:]
            elif kind == "executed" and oid in self._left:
                self._left[oid] -= int.from_bytes(data[:32], "big")
                if self._left[oid] <= 0:
                    self.resting[self._market_of[oid]].pop(oid, None)
            elif kind == "cancelled" and oid in self._market_of:
                self.resting[self._market_of[oid]].pop(oid, None)

    def run(self, actions: int, per_block: int) -> dict[str, int]:
        counts = self._rpc([("eth_getTransactionCount", [t, "pending"]) for t in self.traders])
        self.nonces = {t: int(n, 16) for t, n in zip(self.traders, counts, strict=True)}
        self._rpc([("evm_setAutomine", [False])])
        try:
            done = 0
            while done < actions:
                n = min(per_block, actions - done)
                self._rpc([self._action() for _ in range(n)])
                block = int(self._rpc([("evm_mine", []), ("eth_blockNumber", [])])[1], 16)
                self._settle(block)
                done += n
                self.stats["blocks"] += 1
        finally:
            self._rpc([("evm_setAutomine", [True])])
        return self.stats


_PLACE = Web3.keccak(text="placeOrder(string,uint8,uint8,uint256,uint256)")[:4]
_PLACE_ARGS = ["string", "uint8", "uint8", "uint256", "uint256"]
_CANCEL = Web3.keccak(text="cancelOrder(uint256)")[:4]


def generate(chain: Anvil, markets: int, actions: int, per_block: int, seed: int,
             confirmations: int, cross_ticks: int = 6) -> tuple[Deployment, dict[str, int]]:
    """Deploy router + books, run the seeded flow, mine past the confirmation depth."""
    dep = deploy(chain.url, market_names(markets), [])
    stats = Flow(chain, dep, seed, cross_ticks=cross_ticks).run(actions, per_block)
    chain.mine(confirmations + 1)
    return dep, stats


CACHE = PROJECT_ROOT / ".run" / "bench"


@contextlib.contextmanager
def realmix_chain(markets: int, actions: int, per_block: int, seed: int, confirmations: int,
                  cross_ticks: int) -> Iterator[tuple[Anvil, Deployment, dict[str, int]]]:
    """The generated chain, from the cache when this exact workload was generated before (anvil's own state dump
    keeps blocks, receipts and logs; generating 100k events takes minutes), else generated and dumped on exit."""
    key = f"realmix-m{markets}-a{actions}-b{per_block}-s{seed}-x{cross_ticks}-c{confirmations}"
    state, meta = CACHE / f"{key}.state.json", CACHE / f"{key}.json"
    if state.exists() and meta.exists():
        info = json.loads(meta.read_text())
        with anvil(accounts=10, extra=["--load-state", str(state)]) as chain:
            log(f"chain {key} loaded from {state}")
            yield chain, Deployment(**{**info["deployment"], "rpc_url": chain.url}), info["simulated"]
        return
    CACHE.mkdir(parents=True, exist_ok=True)
    tmp = state.with_suffix(".partial")
    with anvil(accounts=10, extra=["--dump-state", str(tmp)]) as chain:
        t = time.perf_counter()
        dep, sim = generate(chain, markets, actions, per_block, seed, confirmations, cross_ticks)
        log(f"generated {sim} in {time.perf_counter() - t:.1f}s")
        meta.write_text(json.dumps({"deployment": dataclasses.asdict(dep), "simulated": sim}))
        yield chain, dep, sim
    if tmp.exists():  # written by anvil when it stopped
        tmp.replace(state)


def node_rate(url: str, addresses: list[str], start: int, end: int) -> dict[str, float]:
    """One eth_getLogs over [start, end] for every configured contract, plus json.loads: the node's bare rate."""
    body = json.dumps({"jsonrpc": "2.0", "id": 1, "method": "eth_getLogs", "params": [
        {"fromBlock": hex(start), "toBlock": hex(end), "address": addresses}]}).encode()
    req = urllib.request.Request(url, body, {"Content-Type": "application/json"})
    t0 = time.perf_counter()
    with urllib.request.urlopen(req, timeout=600) as resp:
        raw = resp.read()
    logs = json.loads(raw)["result"]
    secs = time.perf_counter() - t0
    return {"logs": len(logs), "seconds": secs, "logs_per_s": len(logs) / secs, "mbytes": len(raw) / 2**20}


def _stages(stderr: str) -> dict[str, float]:
    """Stage seconds summed over the ranges, from the JSON "range ingested" log lines of a process."""
    out: dict[str, float] = defaultdict(float)
    for line in stderr.splitlines():
        if '"stages"' not in line:
            continue
        try:
            rec = json.loads(line)
        except json.JSONDecodeError:
            continue
        for k, v in (rec.get("stages") or {}).items():
            out[k] += float(v)
    return dict(out)


class BackendCpu:
    """CPU seconds of the Postgres backends serving one database, sampled from /proc (their command lines name
    the database) every 50 ms: on a shared machine the server-wide figure also holds other people's queries."""

    def __init__(self, database: str) -> None:
        self.tag = f" {database} ".encode()
        self.seen: dict[str, float] = {}
        self.other: set[str] = set()  # pids checked and not ours (scanned once, not every sample)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _sample(self) -> None:
        for d in os.listdir("/proc"):
            if not d.isdigit() or d in self.other:
                continue
            try:
                if self.tag not in Path(f"/proc/{d}/cmdline").read_bytes():
                    self.other.add(d)
                    continue
                self.seen[d] = max(self.seen.get(d, 0.0), process_cpu_s(d))
            except (FileNotFoundError, ProcessLookupError, IndexError):
                continue

    def _loop(self) -> None:
        while not self._stop.wait(0.05):
            self._sample()

    def __enter__(self) -> BackendCpu:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    @property
    def seconds(self) -> float:
        return sum(self.seen.values())

    def wait_gone(self, timeout_s: float = 3.0) -> None:
        """Until the backends seen have exited and the postmaster has reaped them: one read in between is in
        neither the live processes nor the postmaster's children's time, and a run's CPU would lose it."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline and any(Path(f"/proc/{d}").exists() for d in self.seen):
            time.sleep(0.01)


def timed(argvs: list[list[str]], env: dict[str, str], concurrency: int, anvil_pid: int) -> dict[str, Any]:
    """Run the commands, `concurrency` at once; wall time from the first spawn to the last exit, CPU by group."""
    backends = BackendCpu(env["DATABASE_URL"].rsplit("/", 1)[1]).__enter__()
    cpu0 = (process_cpu_s(anvil_pid), postgres_cpu_s(), children_cpu_s())
    t0 = time.perf_counter()
    pending = list(argvs)
    running: list[tuple[subprocess.Popen[str], list[str], Any]] = []
    stderr_all = []
    failed = 0
    while pending or running:
        while pending and len(running) < concurrency:
            argv = pending.pop(0)
            err = tempfile.TemporaryFile("w+")  # noqa: SIM115 - closed when its process is reaped
            running.append((subprocess.Popen(argv, cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=err,
                                             text=True), argv, err))
        for item in list(running):
            proc, argv, err = item
            if proc.poll() is None:
                continue
            running.remove(item)
            err.seek(0)
            text = err.read()
            err.close()
            if proc.returncode != 0:
                log(f"{' '.join(argv)} exited {proc.returncode}:\n{text[-1500:]}")
                failed += 1
            stderr_all.append(text)
        time.sleep(0.005)
    secs = time.perf_counter() - t0
    backends.__exit__()
    backends.wait_gone()
    cpu1 = (process_cpu_s(anvil_pid), postgres_cpu_s(), children_cpu_s())
    cpu = {k: b - a for k, a, b in zip(("node", "postgres_server", "indexer"), cpu0, cpu1, strict=True)}
    cpu["postgres_backends"] = backends.seconds
    return {"seconds": secs, "cpu": cpu, "stages": _stages("\n".join(stderr_all)), "failed": failed}


def stored(db: str) -> dict[str, int]:
    with engine_for(db).connect() as conn:
        return {k: conn.exec_driver_sql(q).scalar_one() for k, q in {
            "events": "SELECT count(*) FROM order_events",
            "trades": "SELECT count(*) FROM trades",
            "orders": "SELECT count(*) FROM orders",
            "positions": "SELECT count(*) FROM positions",
            "unresolved": "SELECT count(*) FROM order_events WHERE market_id IS NULL",
            "markets": "SELECT count(DISTINCT market_id) FROM order_events",
        }.items()}


def digest(db: str) -> str:
    """A content hash of the projections, to show that every way of ingesting ends in the same rows."""
    with engine_for(db).connect() as conn:
        return conn.exec_driver_sql("""SELECT md5(string_agg(x, ',' ORDER BY x)) FROM (
            SELECT concat_ws(':', contract, order_id, market_id, status, filled, remaining, fill_count) AS x
            FROM orders
            UNION ALL SELECT concat_ws(':', block_number, log_index, market_id, price, quantity) FROM trades
            UNION ALL SELECT concat_ws(':', market_id, trader, net_quantity, trade_count) FROM positions) t
            """).scalar_one()


def dagster_backfill(config_path: Path, db: str, keys: list[str], concurrency: int,
                     anvil_pid: int) -> dict[str, Any]:
    """The partitions added to a throwaway Dagster instance, then one materialize process per partition. The
    instance keeps its runs and events in Postgres, as `make run`'s does (scripts/run.sh): every run process opens
    that storage and writes its events there."""
    home = Path(tempfile.mkdtemp(prefix="obp-bench-dagster-"))
    url = make_url(db)
    storage = url.set(drivername="postgresql+psycopg2", database=f"{url.database}_dagster")
    storage_url = storage.render_as_string(hide_password=False)
    ensure_database(storage_url)
    try:
        (home / "dagster.yaml").write_text(json.dumps({"storage": {"postgres": {"postgres_url": storage_url}},
                                                       "telemetry": {"enabled": False}}))  # JSON is YAML
        env = {**process_env(), "DAGSTER_HOME": str(home), "OBP_CONFIG": str(config_path), "DATABASE_URL": db}
        subprocess.run([sys.executable, "-c", "import sys; from dagster import DagsterInstance; "
                        "DagsterInstance.get().add_dynamic_partitions('block_ranges', sys.argv[1:])", *keys],
                       env=env, check=True)
        argvs = [[DAGSTER, "asset", "materialize", "-m", "orderbook_pipelines.definitions", "--select",
                  INGEST_ASSETS, "--partition", k] for k in keys]
        return timed(argvs, env, concurrency, anvil_pid)
    finally:
        drop_database(storage_url)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--actions", type=int, default=38_000, help="simulated actions (orders and cancels)")
    ap.add_argument("--markets", type=int, default=50)
    ap.add_argument("--per-block", type=int, default=200,
                    help="actions per block (anvil's CPU per mined block grows with the chain: ~1,000 blocks took "
                         "over an hour; fewer, fuller blocks keep generation to minutes)")
    ap.add_argument("--seed", type=int, default=13)
    ap.add_argument("--confirmations", type=int, default=12)
    ap.add_argument("--range-size", type=int, default=237,
                    help="blocks per range; the default splits the flow's 191 blocks (after 101 deployment blocks) "
                         "71/29 into two ranges, as a range size of 2,000 splits the issue's 2,829 blocks")
    ap.add_argument("--workers", default="1,2", help="worker counts of `orderbook ingest` to measure")
    ap.add_argument("--dagster-concurrency", type=int, default=1,
                    help="runs at once in the Dagster backfill (0: skip). With 2, the later (smaller) range may "
                         "commit first: its checks report what needs the earlier range as not evaluated yet")
    ap.add_argument("--rounds", type=int, default=1, help="rounds of every measurement, interleaved")
    ap.add_argument("--cross-ticks", type=int, default=6, help="how far (ticks) a limit order may cross the mid")
    ap.add_argument("--generate-only", action="store_true", help="generate (and cache) the chain, measure nothing")
    args = ap.parse_args()
    rep = Report("realmix")
    with realmix_chain(args.markets, args.actions, args.per_block, args.seed, args.confirmations,
                       args.cross_ticks) as (chain, dep, sim), tempfile.TemporaryDirectory() as tmp:
        head = chain.w3.eth.block_number
        start, end = dep.start_block, head - args.confirmations
        log(f"real mix in blocks {start}-{end}")
        if args.generate_only:
            return
        path = Path(tmp) / "realmix.yaml"
        write_config(project_config(dep, confirmations=args.confirmations, range_size=args.range_size), path)
        cfg = load_config(path)
        addresses = sorted({dep.router, *dep.gen1_books.values()})
        keys = [range_key(a, b) for a, b in ranges_between(cfg.chain.start_block, cfg.chain.range_size, start, end)]
        env = {**process_env(), "OBP_CONFIG": str(path)}
        warm_up(env, [ORDERBOOK, "--help"], [DAGSTER, "--help"],
                [sys.executable, "-c", "import orderbook_pipelines.definitions, orderbook_pipelines.cli.ingest"])
        load = os.getloadavg()
        node: list[dict[str, float]] = [node_rate(chain.url, addresses, start, end) for _ in range(3)]
        runs: dict[str, list[dict[str, Any]]] = defaultdict(list)
        counts: dict[str, dict[str, int]] = {}
        digests: dict[str, str] = {}
        workers = [int(w) for w in args.workers.split(",") if w]
        for _ in range(args.rounds):
            for w in workers:
                name = f"ingest_workers_{w}"
                with bench_database(f"realmix_w{w}") as db:
                    log(f"{name}: orderbook ingest --from {start} --to {end} --workers {w} ...")
                    r = timed([[ORDERBOOK, "ingest", "--from", str(start), "--to", str(end), "--workers", str(w)]],
                              {**env, "DATABASE_URL": db}, 1, chain.proc.pid)
                    counts[name], digests[name] = stored(db), digest(db)
                    runs[name].append(r)
                    log(f"{name}: {r['seconds']:.2f}s {counts[name]}")
            if args.dagster_concurrency:
                name = f"dagster_backfill_concurrency_{args.dagster_concurrency}"
                with bench_database("realmix_dagster") as db:
                    log(f"{name}: {len(keys)} partitions ...")
                    r = dagster_backfill(path, db, keys, args.dagster_concurrency, chain.proc.pid)
                    counts[name], digests[name] = stored(db), digest(db)
                    runs[name].append(r)
                    log(f"{name}: {r['seconds']:.2f}s {counts[name]}")
            node.append(node_rate(chain.url, addresses, start, end))
        node_lps = statistics.median(n["logs_per_s"] for n in node)
        events = next(iter(counts.values()))["events"]
        params = {"events": events, "logs": node[0]["logs"], "blocks": end - start + 1, "markets": args.markets,
                  "ranges": len(keys), "range_size": args.range_size, "confirmations": args.confirmations,
                  "seed": args.seed, "load_avg_1m_at_start": round(load[0], 2), "cores": os.cpu_count()}
        for k, v in sim.items():
            rep.figure(f"simulated_{k}", v, "count")
        for k, v in next(iter(counts.values())).items():
            rep.figure(f"stored_{k}", v, "rows")
        rep.figure("node_getlogs_json_logs_per_s", node_lps, "logs/s", runs=len(node),
                   min=round(min(n["logs_per_s"] for n in node)), max=round(max(n["logs_per_s"] for n in node)),
                   mbytes=round(node[0]["mbytes"], 1))
        for name, rs in runs.items():
            best = min(rs, key=lambda r: r["seconds"])
            eps = events / best["seconds"]
            p = {**params, "runs": len(rs), "seconds": round(best["seconds"], 2),
                 "seconds_all": [round(r["seconds"], 2) for r in rs], "failed_processes": best["failed"]}
            rep.figure(f"{name}_events_per_s", eps, "events/s", **p)
            rep.figure(f"{name}_ratio_to_node", eps / node_lps, "x", target=0.5)
            # The best round above; the median round says how much of that a run can expect on this machine.
            median_s = statistics.median(r["seconds"] for r in rs)
            rep.figure(f"{name}_ratio_to_node_median_round", events / median_s / node_lps, "x",
                       seconds=round(median_s, 2))
            for k, v in best["cpu"].items():
                rep.figure(f"{name}_cpu_us_per_event_{k}", v / events * 1e6, "us/event")
            # Whether the run waited or had no CPU left: its processes' CPU against every core for the whole run,
            # and the ratio it could reach with that CPU if no core ever idled (start-up and the last range's
            # projections run on one core). Below the target, the CPU per event has to come down, not the waits.
            used = sum(best["cpu"][k] for k in ("node", "postgres_server", "indexer"))
            cores = os.cpu_count() or 1
            rep.figure(f"{name}_cpu_busy_share", used / (cores * best["seconds"]), "of all cores", cores=cores)
            rep.figure(f"{name}_ratio_if_no_core_idled", events / (used / cores) / node_lps, "x",
                       cpu_s=round(used, 2))
            for k, v in sorted(best["stages"].items()):
                rep.figure(f"{name}_stage_s_{k}", v, "s", summed_over_ranges=True)
        if len(set(digests.values())) != 1:
            rep.figure("projections_differ_between_runs", len(set(digests.values())), "distinct")
        else:
            rep.figure("projections_equal_across_runs", len(digests), "runs")
        rep.table("real mix end to end (process start to exit)")


if __name__ == "__main__":
    main()
