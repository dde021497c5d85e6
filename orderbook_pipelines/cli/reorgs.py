"""`orderbook reorgs`: the deep reorgs reconciliation has recorded, for the reorg-handling runbook."""

from __future__ import annotations

import typer

from orderbook_pipelines.cli.common import engine

app = typer.Typer(no_args_is_help=True, help="Reorgs deeper than the confirmation depth found so far.")


@app.command("list")
def reorgs_list(limit: int = typer.Option(20)) -> None:
    """Most recent deep reorgs: when, where, how deep, repaired or not."""
    from sqlalchemy import text

    with engine().connect() as conn:
        for r in conn.execute(text("SELECT detected_at, chain_id, fork_block, depth, old_hash, new_hash, repaired, "
                                   "events_deleted, events_inserted FROM reorgs ORDER BY detected_at DESC LIMIT :n"),
                              {"n": limit}):
            typer.echo(f"{r.detected_at:%Y-%m-%d %H:%M:%S}\tchain {r.chain_id}\tblock {r.fork_block}\tdepth "
                       f"{r.depth}\t{r.old_hash} -> {r.new_hash}\t{'repaired' if r.repaired else 'NOT REPAIRED'}\t"
                       f"-{r.events_deleted}/+{r.events_inserted} events")
