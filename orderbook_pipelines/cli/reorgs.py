"""`orderbook reorgs`: the deep reorgs on record (one row each, ingestion/reorgs.py), for the reorg-handling runbook."""

from __future__ import annotations

import typer

from orderbook_pipelines.cli.common import engine

app = typer.Typer(no_args_is_help=True, help="Reorgs deeper than the confirmation depth found so far.")


@app.command("list")
def reorgs_list(limit: int = typer.Option(20)) -> None:
    """Most recent deep reorgs, one line each: when found, where, how deep, repaired (and when) or not."""
    from sqlalchemy import text

    with engine().connect() as conn:
        for r in conn.execute(text("SELECT detected_at, chain_id, fork_block, depth, old_hash, new_hash, repaired, "
                                   "repaired_at, events_deleted, events_inserted FROM reorgs "
                                   "ORDER BY detected_at DESC LIMIT :n"), {"n": limit}):
            state = f"repaired {r.repaired_at:%Y-%m-%d %H:%M:%S}" if r.repaired else "NOT REPAIRED"
            typer.echo(f"{r.detected_at:%Y-%m-%d %H:%M:%S}\tchain {r.chain_id}\tblock {r.fork_block}\tdepth "
                       f"{r.depth}\t{r.old_hash} -> {r.new_hash}\t{state}\t"
                       f"-{r.events_deleted}/+{r.events_inserted} events")
