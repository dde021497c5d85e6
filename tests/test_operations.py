"""Every runbook, executed: each `orderbook …` line of docs/runbooks/*.md runs, in the runbook's order, against a
real anvil chain, Postgres, Redis, a running live service and the state exporter, and its exit code and effect are
checked. A runbook whose commands change fails here until the test follows it (`Runbook` compares each command
with the document, and the last test checks that every runbook was run to its end).

Also executed for real: an unregistered metric hash adopted by `markets register` reaching the running live
service; emergency (`live pause`) and durable (`markets pause`) pauses reaching it; `orderbook reconcile`'s exit
codes 0, 1, 3, 4 and 69 (a deep fork made with evm_snapshot/evm_revert, a market registered late, the repair cap,
a closed port); `finality: finalized` (anvil's `finalized` tag, `--slots-in-an-epoch`); and a scrape over HTTP
of the live service's `/metrics` and `orderbook metrics serve`, which must offer every metric an alert reads.

The tests share one chain, database and live service and run in file order: a runbook is a sequence, and the
chain's history (a backfill, a late market, then a deep reorg) is one story.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import secrets
import shlex
import subprocess
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis
import yaml
from eth_utils import keccak
from sqlalchemy import text
from typer.testing import CliRunner

from orderbook_pipelines.cli import app
from orderbook_pipelines.config import PROJECT_ROOT
from orderbook_pipelines.devchain.anvil import Anvil, free_port
from orderbook_pipelines.devchain.deploy import Deployment, deploy, project_config, write_config
from orderbook_pipelines.devchain.simulator import Simulator
from orderbook_pipelines.storage.db import drop_database, engine_for
from tests.conftest import ORDERBOOK, new_database
from tests.test_alerts import alert_metric_names
from tests.test_runbooks import RUNBOOKS, documented_commands
from tests.test_security import Logins

REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
TOKEN = "ops-" + secrets.token_hex(12)
SLOTS = 8  # anvil --slots-in-an-epoch: its `finalized` tag is head - 2 * SLOTS, its `safe` tag head - SLOTS
CONFIRMATIONS = 2
FORK_AT = 1290  # the deep reorg replaces every block after this one
HEAD = 1560  # the runbooks name blocks 1200-1499 and 0-1000: the chain reaches past them
UNCONFIGURED = ("COPPER_V1", "NICKEL_V1")  # deployed and traded, but not in the configuration: added by a runbook
COVERED: set[str] = set()  # runbooks run to their end


@dataclass
class Proc:
    """A long-running `orderbook …` process (live serve, metrics serve) and its HTTP address."""

    popen: subprocess.Popen[bytes]
    url: str
    log: Path

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.popen.kill()
                self.popen.wait(timeout=10)


@dataclass
class World:
    anvil: Anvil
    dep: Deployment
    config_path: Path
    db: str
    tmp: Path
    fork_snapshot: str
    redis_prefix: str = field(default_factory=lambda: f"obptest:{secrets.token_hex(4)}:")
    live: Proc | None = None

    def env(self, **extra: str | None) -> dict[str, str | None]:
        """What an operator's shell has: the database, the config, the admin token; nothing else of ours."""
        return {"DATABASE_URL": self.db, "OBP_CONFIG": str(self.config_path), "OBP_OPERATOR": "ops-test",
                "OBP_SNAPSHOT_DIR": str(self.tmp / "objects"), "OBP_ADMIN_TOKEN": TOKEN, "OBP_RPC_URL": None,
                "REDIS_URL": None, "OBP_REDIS_PREFIX": None, "OBP_LOG_LEVEL": "WARNING", **extra}

    def sql(self, query: str, **params: Any) -> list[Any]:
        with engine_for(self.db).connect() as conn:
            return list(conn.execute(text(query), params).all())


def _process_env(env: dict[str, str | None]) -> dict[str, str]:
    full = dict(os.environ)
    for k, v in env.items():
        if v is None:
            full.pop(k, None)
        else:
            full[k] = v
    return full


def run_cli(argv: list[str], env: dict[str, str | None], process: bool = False) -> tuple[int, str]:
    """One command: in-process (fast), or as a real `orderbook` process where its exit status is the point."""
    if process:
        p = subprocess.run([ORDERBOOK, *argv], env=_process_env(env), capture_output=True, text=True, timeout=300)
        return p.returncode, p.stdout + p.stderr
    r = CliRunner().invoke(app, argv, env=env)
    if r.exception is not None and not isinstance(r.exception, SystemExit):
        raise r.exception
    return r.exit_code, r.output


def wait_for(cond: Callable[[], Any], what: str, timeout: float = 60) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = cond()
        except (httpx.HTTPError, OSError):
            got = None
        if got:
            return got
        if time.monotonic() > deadline:
            raise TimeoutError(f"not within {timeout:.0f}s: {what}")
        time.sleep(0.2)


class Runbook:
    """Runs one runbook's commands in its order. Each `run`/`start` names the command as the runbook writes it
    (the test fails if the runbook says something else at that point); `subst` maps what only makes sense on an
    operator's machine (ports, the example address, file paths) to this test's values."""

    def __init__(self, world: World, name: str, subst: dict[str, str] | None = None):
        self.world, self.name, self.subst = world, name, subst or {}
        self.lines = [line for f, line in documented_commands() if f == name]
        assert self.lines, f"no commands in {name}"
        self.i = 0

    def _next(self, line: str) -> list[str]:
        assert self.i < len(self.lines), f"{self.name} has {len(self.lines)} commands; the test runs `{line}` too"
        assert self.lines[self.i] == line, (f"{self.name}, command {self.i + 1}: the runbook says "
                                            f"`{self.lines[self.i]}`, the test runs `{line}`: update the test")
        self.i += 1
        return [self.subst.get(a, a) for a in shlex.split(line)[1:]]

    def run(self, line: str, expect: int = 0, process: bool = False, **env: str | None) -> str:
        argv = self._next(line)
        t0 = time.perf_counter()
        code, out = run_cli(argv, self.world.env(**env), process)
        print(f"{self.name}: {time.perf_counter() - t0:6.2f}s  {shlex.join(argv)}")
        assert code == expect, f"{self.name}: `{shlex.join(argv)}` exited {code}, expected {expect}:\n{out[-3000:]}"
        return out

    def start(self, line: str, probe: str, **env: str | None) -> Proc:
        """A serving command: started as a process, done when `probe` answers 200 on the port it was given."""
        argv = self._next(line)
        host = argv[argv.index("--host") + 1] if "--host" in argv else "127.0.0.1"
        url = f"http://{host}:{argv[argv.index('--port') + 1]}"
        log = self.world.tmp / f"{argv[0]}-{argv[1]}-{secrets.token_hex(3)}.log"
        with log.open("wb") as out:
            popen = subprocess.Popen([ORDERBOOK, *argv], env=_process_env(self.world.env(**env)), stdout=out,
                                     stderr=subprocess.STDOUT)
        proc = Proc(popen, url, log)

        def up() -> bool:
            if popen.poll() is not None:
                raise AssertionError(f"`{shlex.join(argv)}` exited {popen.returncode}:\n{log.read_text()[-3000:]}")
            return httpx.get(url + probe, timeout=5).status_code == 200

        try:
            wait_for(up, f"{url}{probe} answers 200 (`{shlex.join(argv)}`; log {log})", timeout=120)
        except BaseException:
            proc.stop()
            raise
        return proc

    def done(self) -> None:
        assert self.i == len(self.lines), f"{self.name}: commands the test did not run: {self.lines[self.i:]}"
        COVERED.add(self.name)


def metrics_of(exposition: str) -> dict[str, float]:
    """Unlabelled samples of a Prometheus text exposition (`orderbook metrics show`, a scrape)."""
    out = {}
    for line in exposition.splitlines():
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*) (\S+)$", line.strip())
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


_SERIES = {"counter": ("",), "gauge": ("",), "histogram": ("_bucket", "_count", "_sum"), "summary": ("_count", "_sum"),
           "untyped": ("",)}


def scraped_names(exposition: str) -> set[str]:
    """Series names a scrape offers: every sample, and the series of every declared family (a labelled metric
    declares itself before its first child exists, and a query of it is valid then)."""
    names = set(re.findall(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)[{ ]", exposition, re.M))
    for name, kind in re.findall(r"^# TYPE (\S+) (\w+)$", exposition, re.M):
        names |= {name + sfx for sfx in _SERIES.get(kind, ("",))}
    return names


def published(live: Proc) -> set[str]:
    return {m["market"] for m in httpx.get(f"{live.url}/api/markets/summary", timeout=10).json()["markets"]}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[World]:
    """Five markets traded in bursts (blocks ~30, ~1200, ~1295), two of them not configured (COPPER_V1 from the
    start, NICKEL_V1 from block ~1206); a snapshot of the chain at FORK_AT for the deep reorg; an empty database."""
    tmp = tmp_path_factory.mktemp("ops")
    anvil = Anvil(extra=["--slots-in-an-epoch", str(SLOTS)], rpc_timeout_s=120)  # mining 1,000 blocks takes seconds
    db: str | None = None
    w: World | None = None
    try:
        dep = deploy(anvil.url, ["SILVER_V1", "GOLD_V1", "COPPER_V1"], ["ALUMINUM_V1", "NICKEL_V1"])
        doc = project_config(dep, confirmations=CONFIRMATIONS, range_size=250)
        doc["markets"] = [m for m in doc["markets"] if m["metric_id"] not in UNCONFIGURED]
        doc["chain"] |= {"rpc_retries": 2, "rpc_deadline_s": 2.0}  # a dead node is reported in seconds
        path = tmp / "config.yaml"
        write_config(doc, path)
        w3 = anvil.w3
        # NICKEL_V1 is deployed with the others but first traded after block 1200, as adding-a-market.md tells
        before_nickel = dataclasses.replace(dep, gen2_books={"ALUMINUM_V1": dep.gen2_books["ALUMINUM_V1"]})
        Simulator(w3, before_nickel, seed=1, traders=4).run_batches(100, per_block=20)
        anvil.mine(1195 - w3.eth.block_number)
        Simulator(w3, before_nickel, seed=2, traders=4).run_batches(120, per_block=20)
        Simulator(w3, dep, seed=4, traders=4).run_batches(60, per_block=20)
        anvil.mine(FORK_AT - w3.eth.block_number)
        fork = anvil.rpc("evm_snapshot")
        Simulator(w3, dep, seed=3, traders=4).run_batches(120, per_block=20)
        anvil.mine(HEAD - w3.eth.block_number)
        db = new_database()
        w = World(anvil, dep, path, db, tmp, fork)
        yield w
    finally:
        if w is not None and w.live is not None:
            w.live.stop()
        if w is not None:
            r = redis.Redis.from_url(REDIS_URL)
            keys = list(r.scan_iter(f"{w.redis_prefix}*"))
            if keys:
                r.delete(*keys)
        if db is not None:
            drop_database(db)
        anvil.stop()


# -- the runbooks, in the order of the chain's story ------------------------------------------------------------
def test_runbook_backfill(world: World) -> None:
    """A backfill that died after its third range: diagnose, resume (also with two workers), verify."""
    code, out = run_cli(["ingest", "--from", "0", "--to", "599"], world.env())
    assert code == 0, out
    frontier_before = world.sql("SELECT max(processed_to) FROM ingestion_checkpoints")[0][0]
    assert frontier_before < 700
    rb = Runbook(world, "backfill.md")
    out = rb.run("orderbook markets list")
    assert "SILVER_V1" in out and "\tunregistered" in out  # COPPER_V1's router events: a discovered hash
    out = rb.run("orderbook reconcile --from 0 --to 100000")
    assert out.count("\tok\t") == len(world.sql("SELECT 1 FROM ingestion_checkpoints")) > 0
    rb.run("orderbook check --from 0 --to 100000")
    out = rb.run("orderbook ingest --from 0 --to 100000")
    safe = world.anvil.w3.eth.block_number - CONFIRMATIONS
    assert world.sql("SELECT max(processed_to) FROM ingestion_checkpoints")[0][0] == safe
    assert re.search(rf"-{safe}: \d+ events", out), out  # the last range is written up to the safe head only
    events = world.sql("SELECT count(*) FROM order_events")[0][0]
    out = rb.run("orderbook ingest --from 0 --to 100000 --workers 2")
    assert world.sql("SELECT count(*) FROM order_events")[0][0] == events
    ranges = [ln for ln in out.splitlines() if re.match(r"\d+-\d+: ", ln)]  # one summary line per range (stdout)
    assert len(ranges) > 5 and all("(0 new)" in ln for ln in ranges), out  # idempotent
    shown = metrics_of(rb.run("orderbook metrics show"))
    assert shown["obp_indexed_block"] == safe and shown["obp_exporter_up"] == 1
    out = rb.run("orderbook ingest --from 42000 --to 100000")
    assert "not final yet" in out and world.sql("SELECT count(*) FROM order_events")[0][0] == events
    rb.run("orderbook reconcile --from 0 --to 100000 --repair")
    out = rb.run("orderbook reconcile --from 0 --to 100000")
    assert "DIFFERS" not in out and out.count("\tok\t") > 5
    out = rb.run("orderbook check --from 0 --to 100000")
    assert "FAILED" not in out and "\tbook\t" in out and "\tinvariants\tok" in out
    rb.done()


def test_runbook_local_stack(world: World) -> None:
    """The config gate, a check, and the live service on a given Redis prefix: it stays up for the next tests."""
    port = free_port()
    rb = Runbook(world, "local-stack.md", {".run/devchain.yaml": str(world.config_path), "8080": str(port),
                                           "obp:31337:5e938db73a:": world.redis_prefix})
    rb.run("orderbook wait-config .run/devchain.yaml")
    out = rb.run("orderbook check --from 1200 --to 1299")
    assert "\tinvariants\tok" in out and "FAILED" not in out
    world.live = rb.start("orderbook live serve --host 127.0.0.1 --port 8080 --redis-prefix obp:31337:5e938db73a:",
                          "/ready", REDIS_URL=REDIS_URL)
    rb.done()
    depth = httpx.get(f"{world.live.url}/api/depth", params={"market": "SILVER_V1", "levels": 100}).json()
    cached = wait_for(lambda: redis.Redis.from_url(REDIS_URL).get(f"{world.redis_prefix}depth:SILVER_V1"),
                      "the live service writes its books under the given prefix")
    assert json.loads(cached)["bids"] == depth["bids"] and depth["bids"]
    keys = {k.decode().removeprefix(world.redis_prefix) for k in
            redis.Redis.from_url(REDIS_URL).scan_iter(f"{world.redis_prefix}depth:*")}
    assert keys == {"depth:SILVER_V1", "depth:GOLD_V1", "depth:ALUMINUM_V1", "depth:" + "0x" + keccak(
        text="COPPER_V1").hex()}, keys  # named as the API names them (a discovered market by its hash), never by id
    assert published(world.live) == {"SILVER_V1", "GOLD_V1", "ALUMINUM_V1"}  # configured, active


def test_runbook_adding_a_market(world: World) -> None:
    """COPPER_V1 was traded but never configured: its hash was discovered; registering it publishes it on the
    running live service. NICKEL_V1 (gen 2) is registered with its address and promoted."""
    assert world.live is not None
    copper_hash = "0x" + keccak(text="COPPER_V1").hex()
    (discovered,) = world.sql("SELECT market_id, metric_id, status FROM markets WHERE metric_hash = :h", h=copper_hash)
    assert discovered.metric_id is None and discovered.status == "unregistered"
    assert "COPPER_V1" not in published(world.live) and copper_hash not in published(world.live)
    nickel = world.dep.gen2_books["NICKEL_V1"]
    rb = Runbook(world, "adding-a-market.md", {"0x5FbDB2315678afecb367f032d93F642f64180aa3": nickel})
    out = rb.run("orderbook markets list")
    assert re.search(rf"^{discovered.market_id}\t-\t.*\tunregistered$", out, re.M), out
    rb.run("orderbook markets canaries")
    rb.run("orderbook metrics show")
    out = rb.run("orderbook markets register NICKEL_V1 gen2_book --address 0x5FbDB2315678afecb367f032d93F642f64180aa3 "
                 "--decimals 18 --status canary")
    assert "market NICKEL_V1: registered" in out
    out = rb.run("orderbook markets register COPPER_V1 gen1_book --status canary")
    assert "market COPPER_V1: registered" in out
    (adopted,) = world.sql("SELECT market_id, metric_id, status FROM markets WHERE metric_hash = :h", h=copper_hash)
    assert tuple(adopted) == (discovered.market_id, "COPPER_V1", "canary")  # the discovered row, now named
    reconcile_finds_the_late_market_missing(world)
    rb.run("orderbook ingest --from 1200 --to 1499")
    code, out = run_cli(["reconcile", "--from", "0", "--to", "1499"], world.env(), process=True)
    assert code == 0 and "DIFFERS" not in out, out  # the re-run ranges now hold NICKEL_V1's events: exit 0
    rb.run("orderbook check --from 1200 --to 1499")
    out = rb.run('orderbook markets promote NICKEL_V1 --reason "checks green on 5 ranges, reviewed"')
    assert "market NICKEL_V1: canary -> active" in out
    canaries = rb.run("orderbook markets canaries")
    assert re.search(r"^COPPER_V1\t\d+/3\t", canaries, re.M), canaries
    out = rb.run("orderbook markets publishable")
    assert re.search(r"\tNICKEL_V1\tactive$", out, re.M), out
    out = rb.run("orderbook markets history NICKEL_V1")
    assert "canary -> active\tops-test\tchecks green on 5 ranges, reviewed" in out
    rb.done()
    if not re.search(r"^COPPER_V1\t.*\tpublishable$", canaries, re.M):  # not yet qualified: publish after review
        code, out = run_cli(["markets", "promote", "COPPER_V1", "--reason", "reviewed"], world.env())
        assert code == 0, out
    live = world.live
    wait_for(lambda: "COPPER_V1" in published(live), "the running live service publishes COPPER_V1", timeout=30)
    depth = httpx.get(f"{live.url}/api/depth", params={"market": "COPPER_V1"}).json()
    assert depth["bids"] or depth["asks"]  # its book, built from the events stored while it was unregistered


def reconcile_finds_the_late_market_missing(world: World) -> None:
    """Real `orderbook reconcile` processes. NICKEL_V1 was registered after the ranges holding its first events
    were ingested (backfill.md): exit 1 (differs), then 4 with a repair cap below the rewrite (nothing touched)."""
    nickel = world.sql("SELECT market_id FROM markets WHERE metric_id = 'NICKEL_V1'")[0][0]
    count = "SELECT count(*) FROM order_events WHERE market_id = :m"
    assert world.sql(count, m=nickel)[0][0] == 0
    code, out = run_cli(["reconcile", "--from", "0", "--to", "1199"], world.env(), process=True)
    assert code == 1 and "range(s) differ from the chain; run again with --repair" in out, out
    assert re.search(r"\tDIFFERS\t.*\tmissing [1-9]", out), out
    code, out = run_cli(["reconcile", "--from", "0", "--to", "1199", "--repair", "--max-events", "1"], world.env(),
                        process=True)
    assert code == 4 and "above the cap of 1; nothing was touched" in out, out
    assert world.sql(count, m=nickel)[0][0] == 0


def test_reconcile_exits_69_when_the_node_is_unreachable(world: World) -> None:
    port = free_port()  # bound once, never listened on: connection refused
    t0 = time.monotonic()
    code, out = run_cli(["reconcile", "--from", "0", "--to", "1499"], world.env(OBP_RPC_URL=f"http://127.0.0.1:{port}"),
                        process=True)
    assert code == 69 and f"node http://127.0.0.1:{port}" in out and "Traceback" not in out, out
    assert time.monotonic() - t0 < 60  # rpc_deadline_s 2 in this config: seconds, not minutes


def test_runbook_canary_markets(world: World) -> None:
    rb = Runbook(world, "canary-markets.md")

    def publishable() -> set[str]:
        return {r[0] for r in world.sql("SELECT metric_id FROM publishable_markets")}

    rb.run("orderbook markets list")
    rb.run("orderbook markets canaries")
    assert "SILVER_V1" in rb.run("orderbook markets publishable")
    rb.run("orderbook markets history SILVER_V1")
    rb.run("orderbook check --from 1200 --to 1499")
    out = rb.run("orderbook markets register NEW_MARKET_V1 gen2_book "
                 "--address 0x0000000000000000000000000000000000000001 --status canary")
    assert "registered" in out and "NEW_MARKET_V1" not in publishable()
    assert "active -> canary" in rb.run('orderbook markets demote SILVER_V1 --reason "contract upgrade, re-verify"')
    assert "SILVER_V1" not in publishable()  # no passed range since it became a canary again
    assert "canary -> active" in rb.run('orderbook markets promote SILVER_V1 --reason "3 ranges passed"')
    assert "SILVER_V1" in publishable()
    assert "active -> paused" in rb.run('orderbook markets pause SILVER_V1 --reason "incident 42: wrong prices"')
    assert "SILVER_V1" not in publishable()
    assert "paused -> active" in rb.run('orderbook markets resume SILVER_V1 --reason "incident 42 closed"')
    history = rb.run("orderbook markets history SILVER_V1").strip().splitlines()
    assert [line.split("\t")[1:] for line in history[:4]] == [
        ["paused -> active", "ops-test", "incident 42 closed"],
        ["active -> paused", "ops-test", "incident 42: wrong prices"],
        ["canary -> active", "ops-test", "3 ranges passed"],
        ["active -> canary", "ops-test", "contract upgrade, re-verify"]]
    assert re.search(r"\tSILVER_V1\tactive$", rb.run("orderbook markets publishable"), re.M)
    rb.done()


def test_runbook_emergency_pause(world: World) -> None:
    """Both pauses reach the running live service: `live pause` at once, `markets pause` at its next refresh."""
    live = world.live
    assert live is not None
    base = live.url
    rb = Runbook(world, "emergency-pause.md", {"http://127.0.0.1:8080": base})

    def health_paused() -> dict[str, Any]:
        return dict(httpx.get(f"{base}/health", timeout=10).json()["paused"])

    def depth(market: str) -> httpx.Response:
        # as a client should: a 429 (this module's requests all come from 127.0.0.1) waits for its Retry-After
        # a 404 may be a market the service has not loaded yet: asked again too, for a few seconds
        for _ in range(40):
            r = httpx.get(f"{base}/api/depth", params={"market": market}, timeout=10)
            if r.status_code not in (429, 404):
                break
            time.sleep(float(r.headers.get("retry-after", "0.25")))
        assert r.status_code in (200, 404), (r.status_code, r.text)
        return r

    rb.run("orderbook markets list")
    rb.run("orderbook markets publishable")
    rb.run("orderbook check --from 1200 --to 1499")
    assert health_paused() == {"global": False, "markets": []}
    out = rb.run("orderbook live pause --market SILVER_V1 --url http://127.0.0.1:8080")
    assert json.loads(out)["paused"] == {"global": False, "markets": ["SILVER_V1"]}
    assert depth("SILVER_V1").json()["paused"] is True and depth("GOLD_V1").json()["paused"] is False
    out = rb.run("orderbook live pause --url http://127.0.0.1:8080")
    assert json.loads(out)["paused"]["global"] is True and depth("GOLD_V1").json()["paused"] is True
    rb.run('orderbook markets pause SILVER_V1 --reason "wrong depth after upgrade"')
    wait_for(lambda: depth("SILVER_V1").status_code == 404 and "SILVER_V1" not in published(live),
             "the durable pause reaches the running service", timeout=30)
    assert depth("SILVER_V1").json()["error"]["code"] == "unknown_market"
    rb.run("orderbook live pause --market SILVER_V1 --resume --url http://127.0.0.1:8080")
    out = rb.run("orderbook live pause --resume --url http://127.0.0.1:8080")
    assert json.loads(out)["paused"] == {"global": False, "markets": []}
    assert depth("GOLD_V1").json()["paused"] is False and depth("SILVER_V1").status_code == 404  # still durable
    rb.run('orderbook markets resume SILVER_V1 --reason "fixed in config v42"')
    wait_for(lambda: depth("SILVER_V1").status_code == 200, "the durable resume reaches the running service",
             timeout=30)
    assert depth("SILVER_V1").json()["paused"] is False and "SILVER_V1" in published(live)
    assert "paused -> active\tops-test\tfixed in config v42" in rb.run("orderbook markets history SILVER_V1")
    assert re.search(r"\tSILVER_V1\tactive$", rb.run("orderbook markets publishable"), re.M)
    assert health_paused() == {"global": False, "markets": []}
    rb.done()
    code, out = run_cli(["live", "pause", "--url", base], world.env(OBP_ADMIN_TOKEN="not-the-token"))
    assert code == 2 and "HTTP 403" in out and health_paused()["global"] is False


def test_runbook_frontend_migration(world: World) -> None:
    """A live service started as the migration runbook starts it (Pusher settings from the environment); the
    runbook's way out for one misbehaving market is the durable pause."""
    port = free_port()
    rb = Runbook(world, "frontend-migration.md", {"0.0.0.0": "127.0.0.1", "8080": str(port)})
    assert re.search(r"\tSILVER_V1\tactive$", rb.run("orderbook markets publishable"), re.M)
    rb.run("orderbook markets list")
    proc = rb.start("orderbook live serve --host 0.0.0.0 --port 8080", "/ready", OBP_PUSHER_KEY="exchange-test",
                    OBP_PUSHER_SECRET=secrets.token_hex(16), OBP_PUSHER_AUTH_TOKEN=secrets.token_hex(16))
    try:
        assert "SILVER_V1" in published(proc)
        out = rb.run('orderbook markets pause SILVER_V1 --reason "frontend migration: wrong depth on the Pusher '
                     'channel"')
        assert "market SILVER_V1: active -> paused" in out
        assert "SILVER_V1" not in rb.run("orderbook markets publishable")
        rb.done()
    finally:
        proc.stop()
        code, out = run_cli(["markets", "resume", "SILVER_V1", "--reason", "migration checked"], world.env())
        assert code == 0, out


def test_runbook_key_rotation_and_every_alert_metric_in_a_real_scrape(world: World) -> None:
    """A second live service and the exporter start on new credentials (the API and indexer group roles) next to
    the running one; both are scraped over HTTP: every metric an alert expression reads is offered, every metric
    offered is documented."""
    logins = Logins(world.db, "obp_api", "obp_indexer")
    live_port, exporter_port = free_port(), free_port()
    rb = Runbook(world, "key-rotation.md", {"0.0.0.0": "127.0.0.1", "8080": str(live_port),
                                            "9464": str(exporter_port)})
    procs: list[Proc] = []
    try:
        assert metrics_of(rb.run("orderbook metrics show"))["obp_exporter_up"] == 1
        assert "--market" in rb.run("orderbook live pause --help")
        live2 = rb.start("orderbook live serve --host 0.0.0.0 --port 8080", "/ready",
                         DATABASE_URL=logins.url("obp_api"))
        procs.append(live2)
        exporter = rb.start("orderbook metrics serve --port 9464", "/metrics", DATABASE_URL=logins.url("obp_indexer"))
        procs.append(exporter)
        users = {r[0] for r in world.sql("SELECT usename FROM pg_stat_activity WHERE datname = current_database()")}
        assert set(logins.names.values()) <= users  # each process runs on its new role

        assert httpx.get(f"{live2.url}/api/depth", params={"market": "GOLD_V1"}).status_code == 200  # a route child
        live_text = httpx.get(f"{live2.url}/metrics", timeout=10).text
        exporter_text = httpx.get(f"{exporter.url}/metrics", timeout=30).text
        state = metrics_of(exporter_text)
        frontier = world.sql("SELECT max(processed_to) FROM ingestion_checkpoints")[0][0]
        assert state["obp_exporter_up"] == 1 and state["obp_indexed_block"] == frontier
        head = world.anvil.w3.eth.block_number
        live_state = metrics_of(live_text)  # the last blocks hold no book event: applied all the same
        assert live_state["obp_live_applied_block"] == live_state["obp_live_chain_head_block"] == head
        offered = scraped_names(live_text) | scraped_names(exporter_text)
        needed = alert_metric_names()
        assert len(needed) >= 12
        assert sorted(needed - offered) == [], "alerts read metrics no real scrape offers"
        doc = (PROJECT_ROOT / "docs" / "observability.md").read_text()
        families = {re.sub(r"_(bucket|count|sum|created|total)$", "", n) for n in offered if n.startswith("obp_")}
        assert sorted(f for f in families if f not in doc) == [], "metrics missing from docs/observability.md"

        assert metrics_of(rb.run("orderbook metrics show"))["obp_exporter_up"] == 1
        assert "migrations applied: none pending" in rb.run("orderbook db init")
        rb.done()
    finally:
        for p in procs:
            p.stop()
        logins.drop()


def test_runbook_snapshot_restore(world: World) -> None:
    export = world.tmp / "gold.jsonl"
    # Snapshots are taken at range boundaries: the runbook's block 120 is this chain's first one.
    boundary = world.sql("SELECT min(range_end) FROM ingestion_checkpoints")[0][0]
    rb = Runbook(world, "snapshot-restore.md", {"/tmp/gold.jsonl": str(export), "120": str(boundary)})
    out = rb.run("orderbook snapshot list --market GOLD_V1")
    assert "0 snapshot(s)" in out
    assert "0 problem(s)" in rb.run("orderbook snapshot verify")
    out = rb.run("orderbook snapshot restore --market GOLD_V1")
    assert "no snapshot, full replay" in out
    state_hash = re.search(r"^state_hash (\w+)$", out, re.M)
    assert state_hash, out
    assert f"at block {boundary}:" in rb.run("orderbook snapshot restore --market GOLD_V1 --block 120")
    assert rb.run("orderbook snapshot create --block 120").startswith(f"block {boundary}:")
    rb.run("orderbook snapshot create --full")
    rb.run("orderbook ingest --from 0 --to 1000")
    rb.run("orderbook snapshot create")
    frontier = world.sql("SELECT max(processed_to) FROM ingestion_checkpoints")[0][0]
    assert world.sql("SELECT count(DISTINCT block_number) FROM depth_snapshots")[0][0] == 2  # boundary, frontier
    assert world.sql("SELECT max(block_number) FROM depth_snapshots")[0][0] == frontier
    out = rb.run("orderbook snapshot verify")
    assert "0 problem(s)" in out and re.search(r"[1-9]\d* snapshot\(s\)", out)
    rb.run("orderbook replay export --out /tmp/gold.jsonl --market GOLD_V1")
    assert export.stat().st_size > 0
    out = rb.run("orderbook replay run /tmp/gold.jsonl")
    assert f"GOLD_V1\t{state_hash.group(1)}" in out  # the same book, from a file, on any machine
    rb.done()


def test_finality_finalized_ingests_only_up_to_the_nodes_finalized_block(world: World) -> None:
    """anvil's `finalized` tag trails the head by two epochs (--slots-in-an-epoch 8: 16 blocks), further than
    the confirmation depth: ingestion with `finality: finalized` stops there, and follows it when it moves."""
    doc = yaml.safe_load(world.config_path.read_text())
    doc["chain"] |= {"finality": "finalized", "start_block": 1400}  # a fresh database: ingest the recent ranges
    path = world.tmp / "finalized.yaml"
    write_config(doc, path)
    db = new_database()
    try:
        env = world.env(DATABASE_URL=db, OBP_CONFIG=str(path))
        w3 = world.anvil.w3

        def finalized() -> int:
            return int(world.anvil.rpc("eth_getBlockByNumber", "finalized", False)["number"], 16)

        def stored(query: str) -> int:
            with engine_for(db).connect() as conn:
                return int(conn.execute(text(query)).scalar_one())

        fin = finalized()
        assert fin == w3.eth.block_number - 2 * SLOTS < w3.eth.block_number - CONFIRMATIONS
        code, out = run_cli(["ingest", "--from", "0", "--to", "100000"], env)
        assert code == 0, out
        assert stored("SELECT max(processed_to) FROM ingestion_checkpoints") == fin
        assert stored("SELECT max(number) FROM blocks") <= fin
        shown = metrics_of(run_cli(["metrics", "show"], env)[1])
        assert shown["obp_chain_safe_block"] == shown["obp_chain_finalized_block"] == fin
        assert shown["obp_indexed_block"] == fin and shown["obp_index_final_lag_blocks"] == 0
        world.anvil.mine(2 * SLOTS + 5)
        assert finalized() == fin + 2 * SLOTS + 5
        code, out = run_cli(["ingest", "--from", "1400", "--to", "100000"], env)
        assert code == 0, out
        assert stored("SELECT max(processed_to) FROM ingestion_checkpoints") == finalized()
    finally:
        drop_database(db)


def test_runbook_wrong_chain(world: World) -> None:
    """A node of another chain (anvil --chain-id 999) behind OBP_RPC_URL: exit 78, nothing read or written, no
    reorg recorded; pointed back at a node of the configured chain, everything works again."""
    other = Anvil(chain_id=999)
    right = world.anvil.url
    try:
        events = world.sql("SELECT count(*), max(block_number) FROM order_events")[0]
        rb = Runbook(world, "wrong-chain.md")
        out = rb.run("orderbook reconcile --lookback 1", 78, process=True, OBP_RPC_URL=other.url)
        assert "wrong chain" in out and "999" in out and "31337" in out and "Traceback" not in out, out
        assert "DIFFERS" not in rb.run("orderbook reconcile --lookback 20", OBP_RPC_URL=right)
        rb.run("orderbook ingest --from 1200 --to 1499", OBP_RPC_URL=right)
        assert "DIFFERS" not in rb.run("orderbook reconcile --lookback 20", OBP_RPC_URL=right)
        assert rb.run("orderbook reorgs list").strip() == ""  # not a reorg
        rb.done()
        assert world.sql("SELECT count(*), max(block_number) FROM order_events")[0] == events
    finally:
        other.stop()


def test_runbook_reorg_handling(world: World) -> None:
    """A fork deeper than the confirmation depth: everything after FORK_AT is replaced by another branch.
    reconcile exits 3 (found, also when repaired), then 0; the reorg is recorded and marked repaired."""
    if world.live is not None:  # a live service would be reset by the fork; it is not what this runbook is about
        world.live.stop()
        world.live = None
    anvil, w3 = world.anvil, world.anvil.w3
    stored_hash = world.sql("SELECT hash FROM blocks WHERE number = :n", n=FORK_AT + 5)[0][0]
    anvil.rpc("evm_revert", world.fork_snapshot)
    assert w3.eth.block_number == FORK_AT
    Simulator(w3, world.dep, seed=99, traders=4).run_batches(120, per_block=20)
    anvil.mine(HEAD + 60 - w3.eth.block_number)
    assert w3.eth.get_block(FORK_AT + 5)["hash"].to_0x_hex() != stored_hash
    rb = Runbook(world, "reorg-handling.md")
    assert rb.run("orderbook reorgs list").strip() == ""  # nothing ran into it yet
    out = rb.run("orderbook reconcile --lookback 50", 3, process=True)
    assert f"REORG deeper than {CONFIRMATIONS} confirmations" in out and "NOT repaired (add --repair)" in out, out
    assert "DIFFERS" in rb.run("orderbook reconcile --from 1200 --to 1499", 3)
    out = rb.run("orderbook reconcile --lookback 50 --repair", 3)
    assert re.search(r"from (\d+) .*; repaired$", out, re.M), out
    out = rb.run("orderbook reconcile --from 1200 --to 1499 --repair")  # nothing left to repair
    assert "DIFFERS" not in out
    assert "DIFFERS" not in rb.run("orderbook reconcile --from 1200 --to 1499 --repair --max-events 200000")
    rb.run("orderbook reconcile --lookback 50", 0, process=True)
    assert "FAILED" not in rb.run("orderbook check --from 1200 --to 1499")
    listed = rb.run("orderbook reorgs list").strip().splitlines()
    assert len(listed) == 1 and "repaired" in listed[0] and "NOT REPAIRED" not in listed[0], listed
    shown = metrics_of(rb.run("orderbook metrics show"))
    assert (shown["obp_deep_reorgs"], shown["obp_deep_reorgs_unrepaired"]) == (1, 0)
    rb.done()
    chain_hash = w3.eth.get_block(FORK_AT + 5)["hash"].to_0x_hex()
    assert world.sql("SELECT hash FROM blocks WHERE number = :n", n=FORK_AT + 5)[0][0] == chain_hash


def test_every_runbook_was_run_to_its_end() -> None:
    """The guard: a new runbook (or a command added to one) needs its executed test here."""
    names = {p.name for p in RUNBOOKS}
    tests = {n.removeprefix("test_runbook_").split("_and_")[0].replace("_", "-") + ".md"
             for n in globals() if n.startswith("test_runbook_")}
    assert names <= tests, f"runbooks without a test here: {sorted(names - tests)}"
    assert names == COVERED, f"runbooks not run to their end in this session: {sorted(names - COVERED)}"
