"""`orderbook replay`: export the canonical stored event stream and replay such a file into books (state hashes).

Reads DATABASE_URL only (`run` not even that): recovery must work without the chain or the YAML config.
"""

from __future__ import annotations

import sys
from pathlib import Path

import typer

from orderbook_pipelines.cli.common import engine, fail

app = typer.Typer(no_args_is_help=True, help="Deterministic replay: export the stored stream, replay files.")


@app.command("export")
def replay_export(out: Path = typer.Option(..., help="JSON-lines file to write ('-' for stdout)"),
                  market: str | None = typer.Option(None, help="market id or metric id (default: all)"),
                  to_block: int | None = typer.Option(None, min=0, help="default: the ingested frontier")) -> None:
    """Write the canonical stored event stream (open/fill/cancel, chain order, integers as decimal strings)."""
    from orderbook_pipelines.storage.events import export_events

    eng = engine()
    try:
        if str(out) == "-":
            rep = export_events(eng, sys.stdout, market, to_block)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".tmp")
            with tmp.open("w", encoding="utf-8", newline="\n") as f:
                rep = export_events(eng, f, market, to_block)
            tmp.replace(out)
    except LookupError as exc:
        fail(str(exc))
    typer.echo(f"{rep.events} events up to block {rep.to_block} written to {out}", err=True)


@app.command("run")
def replay_run(file: Path = typer.Argument(..., help="JSON-lines file written by `orderbook replay export`"),
               check: bool = typer.Option(True, help="check the book invariants after every block")) -> None:
    """Replay a file into books; print one state hash per market and the combined hash."""
    from orderbook_pipelines.book.replay import ReplayError, replay_file

    if not file.is_file():
        fail(f"{file}: no such file")

    try:
        res = replay_file(file, strict=True, check_each_block=check)
    except ReplayError as exc:
        fail(f"invalid event stream: {exc}", 1)
    for m in sorted(res.hashes, key=lambda s: s.encode()):
        typer.echo(f"{m}\t{res.hashes[m]}")
    typer.echo(f"combined\t{res.combined}")
    typer.echo(f"{res.events} events, {res.blocks} blocks, last block {res.last_block}", err=True)
