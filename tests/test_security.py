"""Least privilege and secret hygiene, against a real Postgres and a real anvil chain.

Each role is exercised by logging in as a fresh LOGIN role (random name) granted the group role from
sql/0005.roles-rls.sql; shared group roles are never dropped. Secrets: a DSN password and the admin token must
not appear in JSON logs (structlog and stdlib lines, exceptions, request logs of the live service), and
`<VAR>_FILE` secrets reach a real `orderbook` process.
"""

from __future__ import annotations

import io
import json
import logging
import os
import secrets
import subprocess
import sys
from collections.abc import Iterator
from decimal import Decimal
from pathlib import Path

import httpx
import psycopg
import pytest
import structlog
from sqlalchemy import create_engine, text
from sqlalchemy.engine import make_url
from websockets.sync.client import connect

from orderbook_pipelines import obs
from orderbook_pipelines.chain.rpc import ChainClient
from orderbook_pipelines.devchain.simulator import Simulator
from orderbook_pipelines.ingestion.ingest import ingest_range
from orderbook_pipelines.ingestion.ranges import ranges_up_to
from orderbook_pipelines.storage.db import drop_database, engine_for, libpq_url, sqlalchemy_url
from tests.conftest import ORDERBOOK, PG_SERVER, Anvil, DevChain, make_devchain, new_database
from tests.live_harness import running_service

GROUPS = ("obp_indexer", "obp_api", "obp_analyst", "obp_user")


def ingest_all(chain: DevChain, engine_url: str) -> None:
    cfg = chain.config
    safe = chain.anvil.w3.eth.block_number - cfg.chain.confirmations
    client = ChainClient(chain.anvil.url)
    eng = create_engine(sqlalchemy_url(engine_url), pool_size=1)
    try:
        for a, b in ranges_up_to(cfg.chain.start_block, cfg.chain.range_size, safe):
            ingest_range(cfg, client, eng, a, b)
    finally:
        eng.dispose()


class Logins:
    """LOGIN roles with random names and passwords, one per group role (default: all four); dropped at the end.
    Also the credentials a key rotation creates (tests/test_operations.py)."""

    def __init__(self, db_url: str, *groups: str):
        self.db_url = db_url
        self.groups = groups or GROUPS
        self.tag = secrets.token_hex(4)
        self.names = {g: f"obp_t{self.tag}_{g.removeprefix('obp_')}" for g in self.groups}
        self.passwords = {g: secrets.token_urlsafe(12) for g in self.groups}
        with psycopg.connect(libpq_url(db_url), autocommit=True) as c:
            for g in self.groups:
                c.execute(f"CREATE ROLE {self.names[g]} LOGIN PASSWORD '{self.passwords[g]}' IN ROLE {g}")

    def url(self, group: str) -> str:
        u = make_url(sqlalchemy_url(self.db_url)).set(username=self.names[group], password=self.passwords[group])
        return u.render_as_string(hide_password=False)

    def connect(self, group: str) -> psycopg.Connection:
        return psycopg.connect(libpq_url(self.url(group)), autocommit=True)

    def drop(self) -> None:
        with psycopg.connect(libpq_url(new_admin()), autocommit=True) as c:
            for name in self.names.values():
                c.execute(f"DROP ROLE IF EXISTS {name}")


@pytest.fixture(scope="module")
def world(anvil_factory: type[Anvil], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict]:
    """One chain with flow; db `owner` ingested by the schema owner, db `indexed` created empty (migrated)."""
    chain = make_devchain(anvil_factory(), tmp_path_factory.mktemp("sec"), ["SILVER_V1", "GOLD_V1"], ["ALUMINUM_V1"],
                          confirmations=2, range_size=20)
    Simulator(chain.anvil.w3, chain.dep, seed=5, traders=4).run_batches(300, per_block=20)
    chain.anvil.mine(3)
    owner_db, indexed_db = new_database(), new_database()
    ingest_all(chain, owner_db)
    logins = Logins(owner_db)
    logins_idx = Logins(indexed_db)
    try:
        yield {"chain": chain, "owner": owner_db, "indexed": indexed_db, "logins": logins, "logins_idx": logins_idx}
    finally:
        drop_database(owner_db)
        drop_database(indexed_db)
        logins.drop()
        logins_idx.drop()


def _denied(conn: psycopg.Connection, sql: str) -> bool:
    try:
        conn.execute(sql)
    except psycopg.errors.InsufficientPrivilege:
        return True
    return False


def _owner_rows(db: str, sql: str, params: dict | None = None) -> list[tuple]:
    with engine_for(db).connect() as c:
        return [tuple(r) for r in c.execute(text(sql), params or {})]


def test_group_roles_exist_without_login(world: dict) -> None:
    rows = dict(_owner_rows(world["owner"], "SELECT rolname, rolcanlogin FROM pg_roles WHERE rolname = ANY(:r)",
                            {"r": list(GROUPS)}))
    assert rows == dict.fromkeys(GROUPS, False)


def test_api_role_reads_everything_and_writes_nothing(world: dict) -> None:
    owner_orders = _owner_rows(world["owner"], "SELECT count(*) FROM orders")[0][0]
    owner_trades = _owner_rows(world["owner"], "SELECT count(*) FROM trades")[0][0]
    assert owner_orders > 0 and owner_trades > 0
    with world["logins"].connect("obp_api") as c:
        assert c.execute("SELECT count(*) FROM orders").fetchone()[0] == owner_orders  # RLS policy: all rows
        assert c.execute("SELECT count(*) FROM trades").fetchone()[0] == owner_trades
        assert _denied(c, "DELETE FROM orders")
        assert _denied(c, "UPDATE markets SET decimals = 0")
        assert _denied(c, "INSERT INTO blocks (chain_id, number, hash, parent_hash, block_time) "
                          "VALUES (1, 1, 'x', 'y', now())")
        assert _denied(c, "CREATE TABLE sneaky (x int)")


def test_analyst_reads_only_the_analytics_views_in_human_units(world: dict) -> None:
    raw = _owner_rows(world["owner"], "SELECT m.metric_id, t.block_number, t.log_index, t.price, t.quantity, "
                      "m.decimals FROM trades t JOIN markets m USING (market_id)")
    expected = {(r[0], r[1], r[2]): (Decimal(r[3]) / Decimal(10) ** r[5], Decimal(r[4]) / Decimal(10) ** r[5])
                for r in raw}
    with world["logins"].connect("obp_analyst") as c:
        got = {(r[0], r[1], r[2]): (r[3], r[4]) for r in c.execute(
            "SELECT market, block_number, log_index, price, quantity FROM analytics_trades")}
        daily = c.execute("SELECT market, sum(trades)::int FROM analytics_market_daily GROUP BY market").fetchall()
        for table in ("trades", "orders", "positions", "order_events", "markets"):
            assert _denied(c, f"SELECT 1 FROM {table} LIMIT 1"), table
        assert _denied(c, "DELETE FROM trades")
    assert got == expected and expected
    per_market: dict[str, int] = {}
    for market, *_ in raw:
        per_market[market] = per_market.get(market, 0) + 1
    assert dict(daily) == per_market


def test_user_role_reads_only_its_own_orders_and_positions(world: dict) -> None:
    # Two traders with orders *and* positions: every count below is > 0, so an empty answer (a policy that
    # hides everything) cannot pass for the right one.
    traders = [r[0] for r in _owner_rows(world["owner"], "SELECT o.trader FROM orders o JOIN positions p USING "
                                                         "(trader) GROUP BY o.trader ORDER BY 1")]
    assert len(traders) >= 2
    a, b = traders[0], traders[1]
    own = {t: (_owner_rows(world["owner"], "SELECT count(*) FROM orders WHERE trader = :t", {"t": t})[0][0],
               _owner_rows(world["owner"], "SELECT count(*) FROM positions WHERE trader = :t", {"t": t})[0][0])
           for t in (a, b)}
    assert all(n > 0 for counts in own.values() for n in counts), own
    with world["logins"].connect("obp_user") as c:
        assert c.execute("SELECT count(*) FROM orders").fetchone()[0] == 0  # no identity: nothing
        c.execute("SELECT set_config('obp.trader', %s, false)", (a.upper().replace("0X", "0x"),))
        rows = c.execute("SELECT DISTINCT trader FROM orders").fetchall()
        assert rows == [(a,)]
        assert c.execute("SELECT count(*) FROM orders").fetchone()[0] == own[a][0]
        assert c.execute("SELECT count(*) FROM positions").fetchone()[0] == own[a][1]
        assert c.execute("SELECT count(*) FROM orders WHERE trader = %s", (b,)).fetchone()[0] == 0
        # Supabase / PostgREST style: the JWT claims as JSON
        c.execute("SELECT set_config('obp.trader', '', false)")
        c.execute("SELECT set_config('request.jwt.claims', %s, false)", (json.dumps({"sub": b, "role": "x"}),))
        assert c.execute("SELECT count(*) FROM orders").fetchone()[0] == own[b][0]
        assert c.execute("SELECT DISTINCT trader FROM positions").fetchall() == [(b,)]
        assert c.execute("SELECT count(*) FROM positions").fetchone()[0] == own[b][1]
        assert _denied(c, "SELECT 1 FROM trades LIMIT 1")
        assert _denied(c, "SELECT 1 FROM order_events LIMIT 1")
        assert _denied(c, f"UPDATE orders SET status = 'cancelled' WHERE trader = '{b}'")
        assert _denied(c, "DELETE FROM positions")


def test_indexer_role_ingests_and_projects_exactly_like_the_owner(world: dict) -> None:
    """The whole write path (partitions on demand, COPY, projections with RLS enabled) as obp_indexer."""
    chain, logins = world["chain"], world["logins_idx"]
    ingest_all(chain, logins.url("obp_indexer"))
    for table, key in (("order_events", "chain_id, block_number, log_index"),
                       ("orders", "market_id, contract, order_id"), ("positions", "market_id, trader"),
                       ("trades", "market_id, block_number, log_index")):
        cols = "*" if table != "positions" else "market_id, trader, net_quantity, bought, sold, trade_count"
        sql = f"SELECT {cols} FROM {table} ORDER BY {key}"
        expected = _owner_rows(world["owner"], sql)
        got = _owner_rows(world["indexed"], sql)
        if table == "orders":  # timestamps of the projection run differ
            expected = [r[:16] for r in expected]
            got = [r[:16] for r in got]
        if table == "order_events":
            expected = [r[:-1] for r in expected]
            got = [r[:-1] for r in got]
        assert got == expected and got, table
    owner_orders = _owner_rows(world["owner"], "SELECT count(*) FROM orders")[0][0]
    with logins.connect("obp_indexer") as c:
        assert c.execute("SELECT count(*) FROM orders").fetchone()[0] == owner_orders  # RLS: the indexer sees all
        assert _denied(c, "DROP TABLE trades")
        assert _denied(c, "CREATE TABLE sneaky (x int)")
        assert _denied(c, "ALTER TABLE orders DISABLE ROW LEVEL SECURITY")
        assert _denied(c, "CREATE ROLE sneaky_role")


# -- secrets ------------------------------------------------------------------------------------------------
def _lines(buf: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in buf.getvalue().splitlines() if line.strip()]


@pytest.fixture
def captured_logs(monkeypatch: pytest.MonkeyPatch) -> Iterator[tuple[io.StringIO, str, str, str]]:
    password = "pw-" + secrets.token_hex(8)
    token = "tok-" + secrets.token_hex(12)
    rpc_key = secrets.token_hex(16)
    monkeypatch.setenv("DATABASE_URL", f"postgresql://indexer:{password}@db.internal:5432/orderbook")
    monkeypatch.setenv("OBP_ADMIN_TOKEN", token)
    monkeypatch.setenv("OBP_RPC_URL", f"https://rpc.example/v3/{rpc_key}")
    buf = io.StringIO()
    obs.configure_logging("DEBUG", stream=buf, force=True)
    yield buf, password, token, rpc_key
    obs.configure_logging(force=True)


def test_log_lines_go_to_the_stderr_of_the_moment(monkeypatch: pytest.MonkeyPatch) -> None:
    """Logging configured while one stderr was in place (a CLI runner's, since closed) writes to the stderr in
    place when a line is emitted: nothing lands on a closed stream as a 'Logging error' in a command's output."""
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    obs.configure_logging("INFO", force=True)
    try:
        first.close()
        second = io.StringIO()
        monkeypatch.setattr(sys, "stderr", second)
        logging.getLogger("test.stderr").info("after the swap %d", 7)
        (line,) = _lines(second)
        assert line["event"] == "after the swap 7" and line["level"] == "info"
    finally:
        monkeypatch.undo()
        obs.configure_logging(force=True)


def test_secrets_are_redacted_from_json_logs(captured_logs: tuple[io.StringIO, str, str, str]) -> None:
    buf, password, token, rpc_key = captured_logs
    dsn = os.environ["DATABASE_URL"]
    other_dsn = "postgresql://analyst:an0ther-Secret@10.0.0.5/db"  # never registered: caught by the URL pattern
    log = structlog.get_logger("test.sec")
    with obs.trace(block_range="1-20"):
        log.info("connecting", dsn=dsn, other=other_dsn, headers={"Authorization": f"Bearer {token}", "Accept": "x"})
        logging.getLogger("stdlib.user").warning("db at %s, rpc %s", dsn, os.environ["OBP_RPC_URL"])
        logging.getLogger("stdlib.user").info("libpq style: host=db password=%s user=x", password)
        try:
            raise RuntimeError(f"auth failed with token {token}")
        except RuntimeError:
            log.exception("request failed", admin_token=token)
    out = buf.getvalue()
    lines = _lines(buf)
    assert len(lines) == 4
    for secret in (password, token, rpc_key, "an0ther-Secret"):
        assert secret not in out, secret
    first = lines[0]
    assert first["dsn"] == "postgresql://indexer:***@db.internal:5432/orderbook"  # the useful part stays
    assert first["other"] == "postgresql://analyst:***@10.0.0.5/db"
    assert first["headers"] == {"Authorization": "***", "Accept": "x"}
    assert all(line["trace_id"] == first["trace_id"] and line["block_range"] == "1-20" for line in lines)
    assert lines[1]["logger"] == "stdlib.user" and "db.internal" in lines[1]["event"]
    assert "password=***" in lines[2]["event"]
    assert "RuntimeError" in lines[3]["exception"] and lines[3]["admin_token"] == "***"


def test_live_service_request_logs_carry_ids_and_no_secrets(world: dict,
                                                           captured_logs: tuple[io.StringIO, str, str, str]) -> None:
    buf, _, token, _ = captured_logs
    db = new_database()
    try:
        ingest_all(world["chain"], db)
        with running_service(world["chain"], db, admin_token=token) as (_, url):
            base = f"http://{url}"
            r = httpx.post(f"{base}/admin/pause", json={"paused": False}, headers={"Authorization": f"Bearer {token}"})
            assert r.status_code == 200
            bad = httpx.post(f"{base}/admin/pause", json={"paused": True}, headers={"Authorization": "Bearer nope"})
            assert bad.status_code == 403
            q = httpx.get(f"{base}/api/depth", params={"market": "SILVER_V1", "token": token},
                          headers={"X-Request-ID": "trace-abc-123"})
            assert q.status_code == 400 and q.headers["x-request-id"] == "trace-abc-123"
            with connect(f"ws://{url}/ws") as ws:
                ws.send(json.dumps({"op": "ping", "id": 1}))
                assert json.loads(ws.recv(timeout=10))["type"] == "pong"
    finally:
        drop_database(db)
    out = buf.getvalue()
    assert token not in out
    reqs = [x for x in _lines(buf) if x.get("logger") == "obp.http"]
    by_path = {(x["event"], x["path"], x["status"]) for x in reqs}
    assert {("request", "/admin/pause", 200), ("request", "/admin/pause", 403), ("request", "/api/depth", 400),
            ("websocket closed", "/ws", 101)} <= by_path
    depth = next(x for x in reqs if x["path"] == "/api/depth")
    assert depth["request_id"] == "trace-abc-123" and "token=***" in depth["query"]
    ws_line = next(x for x in reqs if x["path"] == "/ws")
    assert len(ws_line["conn_id"]) == 16 and ws_line["duration_ms"] > 0
    ids = [x["request_id"] for x in reqs if x["event"] == "request"]
    assert len(set(ids)) == len(ids)  # one id per request


def test_secret_files_reach_a_real_process_and_are_not_printed(tmp_path: Path) -> None:
    password = "filepw-" + secrets.token_hex(6)
    name = f"obp_test_{secrets.token_hex(5)}"
    url = make_url(sqlalchemy_url(PG_SERVER)).set(database=name, password=password)
    secret = tmp_path / "database_url"
    secret.write_text(url.render_as_string(hide_password=False) + "\n")
    env = {k: v for k, v in os.environ.items() if k != "DATABASE_URL"}
    env["DATABASE_URL_FILE"] = str(secret)
    try:
        r = subprocess.run([ORDERBOOK, "db", "init"], env=env,
                           capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr
        assert password not in r.stdout + r.stderr
        exists = _owner_rows(new_admin(), "SELECT 1 FROM pg_database WHERE datname = :n", {"n": name})
        assert exists == [(1,)]  # the URL came from the file, nowhere else
    finally:
        drop_database(url.render_as_string(hide_password=False))


def new_admin() -> str:
    return make_url(sqlalchemy_url(PG_SERVER)).set(database="postgres").render_as_string(hide_password=False)


def test_environment_wins_over_a_secret_file(tmp_path: Path) -> None:
    f = tmp_path / "tok"
    f.write_text("from-file\n")
    env = {"OBP_ADMIN_TOKEN_FILE": str(f), "REDIS_URL_FILE": str(f), "REDIS_URL": "redis://env"}
    assert obs.load_secret_files(env) == ["OBP_ADMIN_TOKEN"]
    assert env["OBP_ADMIN_TOKEN"] == "from-file" and env["REDIS_URL"] == "redis://env"
