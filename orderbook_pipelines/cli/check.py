"""`orderbook check`: the book-vs-chain and invariant checks of stored ranges outside Dagster; their recorded
results are what a canary market needs to be promoted."""

from __future__ import annotations

import json

import typer

from orderbook_pipelines.cli.common import chain_client, config, engine, fail

app = typer.Typer(help="Run the book-vs-chain and invariant checks on stored ranges (outside Dagster).")


@app.callback(invoke_without_command=True)
def check_cmd(start: int = typer.Option(..., "--from", min=0), end: int = typer.Option(..., "--to", min=0),
              record: bool = typer.Option(True, help="record results in market_checks (canary progress)")) -> None:
    """Book-vs-chain and invariant checks of every stored range overlapping [from, to]. Exit 1 on a failure."""
    from orderbook_pipelines.quality.checks import check_books, check_invariants
    from orderbook_pipelines.storage.checkpoints import in_scope

    cfg = config()
    eng = engine()
    client = chain_client(cfg)
    with eng.connect() as conn:
        scope = in_scope(conn, cfg.chain.chain_id, start, end)
    failed = 0
    for cp in scope:
        for what, rep in (("book", check_books(cfg, client, eng, cp.range_start, cp.range_end, record=record)),
                          ("invariants", check_invariants(cfg, eng, cp.range_start, cp.range_end, record=record))):
            bad = [m.metric_id for m in rep.failed]
            status = "skipped: " + rep.skipped if rep.skipped else ("ok" if rep.passed else f"FAILED {bad}")
            typer.echo(f"{cp.range_start}-{cp.range_end}\t{what}\t{status}")
            for name, why in sorted(rep.not_evaluated.items()):
                typer.echo(f"  {name} not evaluated: {why}")
            for m in rep.failed[:5]:
                typer.echo(f"  {m.metric_id}: {json.dumps(m.details, default=str)[:500]}")
            failed += not rep.passed
    if failed:
        fail(f"{failed} check(s) failed", 1)
