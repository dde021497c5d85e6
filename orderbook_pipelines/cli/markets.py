"""`orderbook markets`: the market registry (list, register) and the rollout of a market (promote, demote, pause,
resume; every change recorded in market_status_history): one runbook step per command."""

from __future__ import annotations

import typer

from orderbook_pipelines.cli.common import config, engine, fail

app = typer.Typer(no_args_is_help=True, help="Market registry.")


def _change(metric_id: str, to_status: str, reason: str | None, by: str | None,
            allowed_from: tuple[str, ...]) -> None:
    from orderbook_pipelines.quality.canary import StatusChangeError, set_status

    cfg = config()
    try:
        with engine().begin() as conn:
            ch = set_status(conn, cfg.chain.chain_id, metric_id, to_status, reason, by, allowed_from)
    except StatusChangeError as exc:
        fail(str(exc))
    typer.echo(f"market {metric_id}: {ch.from_status} -> {ch.to_status} (recorded in market_status_history)")


@app.command("promote")
def promote(metric_id: str, reason: str = typer.Option("checks passed", help="why (recorded)"),
            by: str | None = typer.Option(None, help="operator name (default: OBP_OPERATOR or OS user)")) -> None:
    """Canary -> active: publish the market (API, WebSocket) from now on."""
    _change(metric_id, "active", reason, by, ("canary",))


@app.command("demote")
def demote(metric_id: str, reason: str = typer.Option(..., help="why (recorded)"),
           by: str | None = typer.Option(None, help="operator name")) -> None:
    """Active -> canary: stop publishing until its checks pass again for the configured number of ranges."""
    _change(metric_id, "canary", reason, by, ("active",))


@app.command("pause")
def pause(metric_id: str, reason: str = typer.Option(..., help="why (recorded)"),
          by: str | None = typer.Option(None, help="operator name")) -> None:
    """Stop publishing a market at once (it is still indexed and checked)."""
    _change(metric_id, "paused", reason, by, ("canary", "active"))


@app.command("resume")
def resume(metric_id: str, reason: str = typer.Option("resumed", help="why (recorded)"),
           by: str | None = typer.Option(None, help="operator name")) -> None:
    """Paused -> the status it had before the pause."""
    from sqlalchemy import text

    from orderbook_pipelines.quality.canary import status_before_pause

    cfg = config()
    with engine().connect() as conn:
        mid = conn.execute(text("SELECT market_id FROM markets WHERE chain_id = :c AND metric_id = :m"),
                           {"c": cfg.chain.chain_id, "m": metric_id}).scalar()
        target = status_before_pause(conn, mid) if mid is not None else "active"
    _change(metric_id, target, reason, by, ("paused",))


@app.command("history")
def history(metric_id: str) -> None:
    """Status changes of one market, newest first."""
    from sqlalchemy import text

    cfg = config()
    with engine().connect() as conn:
        rows = conn.execute(text(
            """SELECT h.changed_at, h.from_status, h.to_status, h.changed_by, h.reason
               FROM market_status_history h JOIN markets m USING (market_id)
               WHERE m.chain_id = :c AND m.metric_id = :m ORDER BY h.changed_at DESC, h.id DESC"""),
            {"c": cfg.chain.chain_id, "m": metric_id}).all()
    for r in rows:
        typer.echo(f"{r.changed_at:%Y-%m-%d %H:%M:%S}\t{r.from_status} -> {r.to_status}\t{r.changed_by}\t"
                   f"{r.reason or ''}")


@app.command("canaries")
def canaries() -> None:
    """Canary markets: consecutive passed ranges vs the required number, and whether they are published."""
    from orderbook_pipelines.quality.canary import canary_progress, sync_policy

    cfg = config()
    with engine().begin() as conn:
        sync_policy(conn, cfg)
        rows = canary_progress(conn, cfg.chain.chain_id)
    for r in rows:
        typer.echo(f"{r['metric_id']}\t{r['consecutive_passed']}/{r['ranges_required']}\t"
                   f"{'publishable' if r['publishable'] else 'not published'}")


@app.command("publishable")
def publishable() -> None:
    """Markets the API and the live service may publish (view publishable_markets)."""
    from sqlalchemy import text

    with engine().connect() as conn:
        for r in conn.execute(text("SELECT market_id, metric_id, status FROM publishable_markets "
                                   "ORDER BY market_id")):
            typer.echo(f"{r.market_id}\t{r.metric_id}\t{r.status}")


@app.command("list")
def markets_list() -> None:
    from sqlalchemy import text

    with engine(migrate=False).connect() as conn:
        for r in conn.execute(text("SELECT market_id, metric_id, address, source, decimals, status "
                                   "FROM markets ORDER BY market_id")):
            typer.echo(f"{r.market_id}\t{r.metric_id or '-'}\t{r.address or '-'}\t{r.source}\t{r.decimals}\t{r.status}")


@app.command("register")
def markets_register(metric_id: str, source: str, address: str | None = typer.Option(None),
                     decimals: int = typer.Option(18), status: str = typer.Option("active")) -> None:
    """Name a market (or adopt a discovered `unregistered` hash) without a code change."""
    from pydantic import ValidationError

    from orderbook_pipelines.config import Market
    from orderbook_pipelines.storage.registry import upsert_market

    cfg = config()
    try:
        m = Market.model_validate({"metric_id": metric_id, "source": source, "address": address,
                                   "decimals": decimals, "status": status})  # status: checked here, not typed
        cfg.source(source)
    except (ValidationError, KeyError) as exc:
        fail(f"invalid market: {exc}")
    with engine(migrate=False).begin() as conn:
        n = upsert_market(conn, cfg.chain.chain_id, m)
    typer.echo(f"market {metric_id}: {'registered' if n else 'unchanged'}")
