"""`orderbook` command line: database setup, dev chain, manual ingestion and the market registry."""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer

from orderbook_pipelines import obs
from orderbook_pipelines.cli.metrics import metrics_app
from orderbook_pipelines.cli.ops import check_app, reconcile_app, register_market_commands, reorgs_app
from orderbook_pipelines.cli.recovery import replay_app, snapshot_app
from orderbook_pipelines.config import ConfigError, EnvSettings, Market, load_config

app = typer.Typer(no_args_is_help=True, add_completion=False, help=__doc__)
db_app = typer.Typer(no_args_is_help=True, help="Database: create and migrate.")
dev_app = typer.Typer(no_args_is_help=True, help="Local dev chain: deploy reference contracts, simulate flow.")
markets_app = typer.Typer(no_args_is_help=True, help="Market registry.")
app.add_typer(db_app, name="db")
app.add_typer(dev_app, name="devchain")
app.add_typer(markets_app, name="markets")
live_app = typer.Typer(no_args_is_help=True, help="Live depth service: WebSocket + REST.")
app.add_typer(live_app, name="live")
app.add_typer(snapshot_app, name="snapshot")
app.add_typer(replay_app, name="replay")
app.add_typer(reconcile_app, name="reconcile")
app.add_typer(check_app, name="check")
app.add_typer(reorgs_app, name="reorgs")
register_market_commands(markets_app)
app.add_typer(metrics_app, name="metrics")
app.callback()(obs.bootstrap)  # secret files, JSON logs: before any command runs

GEN1_MARKETS = ["SILVER_V1", "GOLD_V1", "COPPER_V1", "OIL_WTI_V1", "GAS_HH_V1", "CORN_V1", "WHEAT_V1", "BTC_HASH_V1"]
GEN2_MARKETS = ["ALUMINUM_V1", "NICKEL_V1", "ZINC_V1", "LITHIUM_V1"]


def _fail(msg: str) -> None:
    typer.secho(msg, fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@db_app.command("init")
def db_init(reset: bool = typer.Option(False, help="drop the database first (dev chains start empty)")) -> None:
    """Create the database named in DATABASE_URL if missing, then apply pending migrations."""
    from orderbook_pipelines.storage.db import drop_database, ensure_database, migrate

    url = EnvSettings().database_url
    if reset:
        drop_database(url)
    created = ensure_database(url)
    applied = migrate(url)
    typer.echo(f"database {'created' if created else 'exists'}; migrations applied: {applied or 'none pending'}")


@dev_app.command("deploy")
def devchain_deploy(rpc_url: str = typer.Option("http://127.0.0.1:8545"),
                    config_out: Path = typer.Option(Path(".run/devchain.yaml")),
                    gen1: int = typer.Option(8, min=0, max=len(GEN1_MARKETS)),
                    gen2: int = typer.Option(4, min=0, max=len(GEN2_MARKETS)),
                    confirmations: int = typer.Option(2, min=0),
                    range_size: int = typer.Option(100, min=1)) -> None:
    """Deploy router + books and write the indexer configuration for them."""
    from orderbook_pipelines.devchain.deploy import deploy, project_config, write_config

    dep = deploy(rpc_url, GEN1_MARKETS[:gen1], GEN2_MARKETS[:gen2])
    write_config(project_config(dep, confirmations, range_size), config_out)
    typer.echo(f"deployed router {dep.router}, {gen1} gen-1 and {gen2} gen-2 markets from block "
               f"{dep.start_block}; config written to {config_out}")


@dev_app.command("up")
def devchain_up(rpc_url: str = typer.Option("http://127.0.0.1:8545"),
                config_out: Path = typer.Option(Path(".run/devchain.yaml")),
                rate: float = typer.Option(5.0, min=0.1, help="orders per second"),
                seed: int = typer.Option(7)) -> None:
    """Deploy, write the config, then simulate order flow until interrupted."""
    from orderbook_pipelines.devchain.deploy import deploy, project_config, write_config
    from orderbook_pipelines.devchain.simulator import Simulator

    dep = deploy(rpc_url, GEN1_MARKETS, GEN2_MARKETS)
    write_config(project_config(dep), config_out)
    typer.echo(f"deployed; config at {config_out}; simulating {rate}/s (seed {seed})")
    from orderbook_pipelines.devchain.deploy import wait_for_chain

    sim = Simulator(wait_for_chain(rpc_url), dep, seed=seed)
    sim.run_forever(rate, report=lambda s: typer.echo(
        f"sim: sent={s.sent} limit={s.limit} market={s.market} cancels={s.cancels} reverted={s.reverted}"))


@app.command("wait-config")
def wait_config(path: Path, timeout: float = typer.Option(120.0)) -> None:
    """Block until the configuration file exists and validates (used by the Procfile)."""
    deadline = time.monotonic() + timeout
    while True:
        if path.exists():
            try:
                load_config(path)
                return
            except ConfigError:
                pass
        if time.monotonic() > deadline:
            _fail(f"{path} did not appear (or is invalid) within {timeout:.0f}s; is the `sim` process running?")
        time.sleep(0.5)


@app.command("ingest")
def ingest(start: int = typer.Option(..., "--from", min=0), end: int = typer.Option(..., "--to", min=0),
           workers: int = typer.Option(1, "--workers", min=1, max=64,
                                       help="ranges in flight, one process each (a backfill: 2 per core)")) -> None:
    """Ingest and project blocks [from, to] outside Dagster, range by range (same code path as the assets)."""
    from orderbook_pipelines.ingestion.backfill import run_ranges
    from orderbook_pipelines.ingestion.ranges import ranges_between
    from orderbook_pipelines.storage.db import migrate

    cfg = _config()
    env = EnvSettings()
    migrate(env.database_url)
    c = cfg.chain
    if end < start:
        _fail(f"--to {end} is before --from {start}")
    ranges = ranges_between(c.start_block, c.range_size, max(start, c.start_block), end)
    for out in run_ranges(cfg, env.database_url, ranges, workers, upto=end):
        r = out.report
        if r is None:
            typer.echo(f"{out.start}-{out.end}: not final yet; stopping here")
            break
        typer.echo(f"{out.start}-{r.processed_to}: {r.events} events ({r.events_inserted} new), {r.rejected} "
                   f"rejected, {r.orders_changed} orders changed")
        if not r.complete:
            break


@markets_app.command("list")
def markets_list() -> None:
    from sqlalchemy import text

    from orderbook_pipelines.storage.db import engine_for

    with engine_for(EnvSettings().database_url).connect() as conn:
        for r in conn.execute(text("SELECT market_id, metric_id, address, source, decimals, status "
                                   "FROM markets ORDER BY market_id")):
            typer.echo(f"{r.market_id}\t{r.metric_id or '-'}\t{r.address or '-'}\t{r.source}\t{r.decimals}\t{r.status}")


@markets_app.command("register")
def markets_register(metric_id: str, source: str, address: str | None = typer.Option(None),
                     decimals: int = typer.Option(18), status: str = typer.Option("active")) -> None:
    """Name a market (or adopt a discovered `unregistered` hash) without a code change."""
    from pydantic import ValidationError

    from orderbook_pipelines.storage.db import engine_for
    from orderbook_pipelines.storage.registry import upsert_market

    cfg = _config()
    try:
        m = Market(metric_id=metric_id, source=source, address=address, decimals=decimals, status=status)
        cfg.source(source)
    except (ValidationError, KeyError) as exc:
        _fail(f"invalid market: {exc}")
    with engine_for(EnvSettings().database_url).begin() as conn:
        n = upsert_market(conn, cfg.chain.chain_id, m)
    typer.echo(f"market {metric_id}: {'registered' if n else 'unchanged'}")


@live_app.command("serve")
def live_serve(host: str = typer.Option("127.0.0.1"), port: int = typer.Option(8080, min=1, max=65535),
               cluster: bool = typer.Option(False, help="share markets with other processes through REDIS_URL"),
               worker_id: str | None = typer.Option(None, help="with --cluster: follow the chain as this worker "
                                                          "(omit for an API-only process)")) -> None:
    """Follow the chain tip and serve /ws, /api/*, /health, /ready, /metrics."""
    import os

    from orderbook_pipelines.live.service import LiveService, serve
    from orderbook_pipelines.storage.db import engine_for, migrate

    cfg = _config()
    url = EnvSettings().database_url
    migrate(url)
    redis_url = os.environ.get("REDIS_URL") or None
    if cluster and not redis_url:
        _fail("--cluster needs REDIS_URL (the processes share markets and streams through Redis)")
    service = LiveService(cfg, engine_for(url), redis_url=redis_url, cluster=cluster, worker_id=worker_id)
    serve(service, host, port)


@live_app.command("pause")
def live_pause(market: str | None = typer.Option(None, help="one market; all markets when omitted"),
               resume: bool = typer.Option(False, help="resume instead of pause"),
               url: str = typer.Option("http://127.0.0.1:8080")) -> None:
    """Emergency pause (or resume) of publishers; needs OBP_ADMIN_TOKEN, the same the service was started with."""
    import os

    import httpx

    token = os.environ.get("OBP_ADMIN_TOKEN")
    if not token:
        _fail("OBP_ADMIN_TOKEN is not set")
    body = {"paused": not resume, **({"market": market} if market else {})}
    r = httpx.post(f"{url}/admin/pause", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=10)
    if r.status_code != 200:
        _fail(f"pause failed: HTTP {r.status_code}: {r.text}")
    typer.echo(r.text)


def _config():  # type: ignore[no-untyped-def]
    try:
        return load_config()
    except ConfigError as exc:
        _fail(str(exc))


def main() -> None:
    sys.exit(app())
