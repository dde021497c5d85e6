"""Operator commands: market rollout (promote/demote/pause/resume, recorded), reconciliation and book checks.

Mounted by cli.py: the market commands join the existing `orderbook markets` group; `orderbook reconcile`,
`orderbook check` and `orderbook reorgs` are sub-apps. Every command is one step of a runbook.
"""

from __future__ import annotations

import json

import typer
from sqlalchemy import Engine, text

from orderbook_pipelines.config import ConfigError, EnvSettings, ProjectConfig, load_config

reconcile_app = typer.Typer(help="Re-check stored block ranges against the chain; --repair fixes what differs.")
check_app = typer.Typer(help="Run the book-vs-chain and invariant checks on stored ranges (outside Dagster).")
reorgs_app = typer.Typer(no_args_is_help=True, help="Reorgs deeper than the confirmation depth found so far.")


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(msg, fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _config() -> ProjectConfig:
    try:
        return load_config()
    except ConfigError as exc:
        _fail(str(exc))
        raise  # unreachable, for type checkers


def _engine() -> Engine:
    from orderbook_pipelines.storage.db import engine_for, migrate

    url = EnvSettings().database_url
    migrate(url)
    return engine_for(url)


def _client(cfg: ProjectConfig):  # type: ignore[no-untyped-def]
    from orderbook_pipelines.chain.rpc import ChainClient

    c = cfg.chain
    return ChainClient.from_config(c)


# -- markets ---------------------------------------------------------------------------------------------------
def _change(metric_id: str, to_status: str, reason: str | None, by: str | None,
            allowed_from: tuple[str, ...]) -> None:
    from orderbook_pipelines.quality.canary import StatusChangeError, set_status

    cfg = _config()
    try:
        with _engine().begin() as conn:
            ch = set_status(conn, cfg.chain.chain_id, metric_id, to_status, reason, by, allowed_from)
    except StatusChangeError as exc:
        _fail(str(exc))
        return
    typer.echo(f"market {metric_id}: {ch.from_status} -> {ch.to_status} (recorded in market_status_history)")


def register_market_commands(markets_app: typer.Typer) -> None:
    """Add the rollout commands to the existing `orderbook markets` group."""

    @markets_app.command("promote")
    def promote(metric_id: str, reason: str = typer.Option("checks passed", help="why (recorded)"),
                by: str | None = typer.Option(None, help="operator name (default: OBP_OPERATOR or OS user)")) -> None:
        """Canary -> active: publish the market (API, WebSocket) from now on."""
        _change(metric_id, "active", reason, by, ("canary",))

    @markets_app.command("demote")
    def demote(metric_id: str, reason: str = typer.Option(..., help="why (recorded)"),
               by: str | None = typer.Option(None, help="operator name")) -> None:
        """Active -> canary: stop publishing until its checks pass again for the configured number of ranges."""
        _change(metric_id, "canary", reason, by, ("active",))

    @markets_app.command("pause")
    def pause(metric_id: str, reason: str = typer.Option(..., help="why (recorded)"),
              by: str | None = typer.Option(None, help="operator name")) -> None:
        """Stop publishing a market at once (it is still indexed and checked)."""
        _change(metric_id, "paused", reason, by, ("canary", "active"))

    @markets_app.command("resume")
    def resume(metric_id: str, reason: str = typer.Option("resumed", help="why (recorded)"),
               by: str | None = typer.Option(None, help="operator name")) -> None:
        """Paused -> the status it had before the pause."""
        from orderbook_pipelines.quality.canary import status_before_pause

        cfg = _config()
        with _engine().connect() as conn:
            mid = conn.execute(text("SELECT market_id FROM markets WHERE chain_id = :c AND metric_id = :m"),
                               {"c": cfg.chain.chain_id, "m": metric_id}).scalar()
            target = status_before_pause(conn, mid) if mid is not None else "active"
        _change(metric_id, target, reason, by, ("paused",))

    @markets_app.command("history")
    def history(metric_id: str) -> None:
        """Status changes of one market, newest first."""
        cfg = _config()
        with _engine().connect() as conn:
            rows = conn.execute(text(
                """SELECT h.changed_at, h.from_status, h.to_status, h.changed_by, h.reason
                   FROM market_status_history h JOIN markets m USING (market_id)
                   WHERE m.chain_id = :c AND m.metric_id = :m ORDER BY h.changed_at DESC, h.id DESC"""),
                {"c": cfg.chain.chain_id, "m": metric_id}).all()
        for r in rows:
            typer.echo(f"{r.changed_at:%Y-%m-%d %H:%M:%S}\t{r.from_status} -> {r.to_status}\t{r.changed_by}\t"
                       f"{r.reason or ''}")

    @markets_app.command("canaries")
    def canaries() -> None:
        """Canary markets: consecutive passed ranges vs the required number, and whether they are published."""
        from orderbook_pipelines.quality.canary import canary_progress, sync_policy

        cfg = _config()
        with _engine().begin() as conn:
            sync_policy(conn, cfg)
            rows = canary_progress(conn, cfg.chain.chain_id)
        for r in rows:
            typer.echo(f"{r['metric_id']}\t{r['consecutive_passed']}/{r['ranges_required']}\t"
                       f"{'publishable' if r['publishable'] else 'not published'}")

    @markets_app.command("publishable")
    def publishable() -> None:
        """Markets the API and the live service may publish (view publishable_markets)."""
        with _engine().connect() as conn:
            for r in conn.execute(text("SELECT market_id, metric_id, status FROM publishable_markets "
                                       "ORDER BY market_id")):
                typer.echo(f"{r.market_id}\t{r.metric_id}\t{r.status}")


# -- reconcile -------------------------------------------------------------------------------------------------
@reconcile_app.callback(invoke_without_command=True)
def reconcile_cmd(start: int | None = typer.Option(None, "--from", min=0, help="first block (default: recent ranges)"),
                  end: int | None = typer.Option(None, "--to", min=0, help="last block"),
                  repair: bool = typer.Option(False, "--repair", help="delete and re-ingest differing ranges"),
                  max_events: int | None = typer.Option(None, help="cap on events one repair may rewrite"),
                  lookback: int | None = typer.Option(None, help="without --from/--to: how many recent ranges")
                  ) -> None:
    """Compare stored ranges with the chain (hashes, logs per range and market). Exit 1 if anything differs
    and was not repaired, 3 if a deep reorg was found (even if repaired), 4 if the repair cap was hit."""
    from orderbook_pipelines.ingestion.reconcile import RepairCapExceeded, reconcile

    cfg = _config()
    try:
        report = reconcile(cfg, _client(cfg), _engine(), start=start, end=end, lookback_ranges=lookback,
                           repair=repair, max_repair_events=max_events)
    except RepairCapExceeded as exc:
        _fail(str(exc), 4)
        return
    for d in report.diffs:
        state = "DIFFERS" if d.mismatch else "ok"
        typer.echo(f"{d.key}\t{state}\tstored {d.stored_events}+{d.stored_rejected}r\tchain "
                   f"{d.chain_events}+{d.chain_rejected}r\tmissing {d.missing}\textra {d.extra}\t"
                   f"bad blocks {len(d.bad_blocks)}" + (f"\tmarkets {json.dumps(d.markets)}" if d.markets else ""))
    typer.echo(json.dumps(report.metadata()))
    if report.reorg:
        r = report.reorg
        _fail(f"REORG deeper than {cfg.chain.confirmations} confirmations: {r.depth} block(s) from {r.fork_block} "
              f"({r.old_hash} -> {r.new_hash}); {'repaired' if report.repaired else 'NOT repaired (add --repair)'}",
              3)
    if report.mismatched and not report.repaired:
        _fail(f"{len(report.mismatched)} range(s) differ from the chain; run again with --repair", 1)


# -- checks ----------------------------------------------------------------------------------------------------
@check_app.callback(invoke_without_command=True)
def check_cmd(start: int = typer.Option(..., "--from", min=0), end: int = typer.Option(..., "--to", min=0),
              record: bool = typer.Option(True, help="record results in market_checks (canary progress)")) -> None:
    """Book-vs-chain and invariant checks of every stored range overlapping [from, to]. Exit 1 on a failure."""
    from orderbook_pipelines.quality.checks import check_books, check_invariants
    from orderbook_pipelines.storage.checkpoints import in_scope

    cfg = _config()
    engine = _engine()
    client = _client(cfg)
    with engine.connect() as conn:
        scope = in_scope(conn, cfg.chain.chain_id, start, end)
    failed = 0
    for cp in scope:
        for what, rep in (("book", check_books(cfg, client, engine, cp.range_start, cp.range_end, record=record)),
                          ("invariants", check_invariants(cfg, engine, cp.range_start, cp.range_end, record=record))):
            bad = [m.metric_id for m in rep.failed]
            status = "skipped: " + rep.skipped if rep.skipped else ("ok" if rep.passed else f"FAILED {bad}")
            typer.echo(f"{cp.range_start}-{cp.range_end}\t{what}\t{status}")
            for m in rep.failed[:5]:
                typer.echo(f"  {m.metric_id}: {json.dumps(m.details, default=str)[:500]}")
            failed += not rep.passed
    if failed:
        _fail(f"{failed} check(s) failed", 1)


# -- reorgs ----------------------------------------------------------------------------------------------------
@reorgs_app.command("list")
def reorgs_list(limit: int = typer.Option(20)) -> None:
    """Most recent deep reorgs: when, where, how deep, repaired or not."""
    with _engine().connect() as conn:
        for r in conn.execute(text("SELECT detected_at, chain_id, fork_block, depth, old_hash, new_hash, repaired, "
                                   "events_deleted, events_inserted FROM reorgs ORDER BY detected_at DESC LIMIT :n"),
                              {"n": limit}):
            typer.echo(f"{r.detected_at:%Y-%m-%d %H:%M:%S}\tchain {r.chain_id}\tblock {r.fork_block}\tdepth "
                       f"{r.depth}\t{r.old_hash} -> {r.new_hash}\t{'repaired' if r.repaired else 'NOT REPAIRED'}\t"
                       f"-{r.events_deleted}/+{r.events_inserted} events")
