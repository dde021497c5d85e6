"""`orderbook reconcile`: re-check stored ranges against the chain; its exit code tells the runbook what to do next
(1 differs, 3 deep reorg, 4 repair cap hit)."""

from __future__ import annotations

import json

import typer

from orderbook_pipelines.cli.common import chain_client, config, engine, fail

app = typer.Typer(help="Re-check stored block ranges against the chain; --repair fixes what differs.")


@app.callback(invoke_without_command=True)
def reconcile_cmd(start: int | None = typer.Option(None, "--from", min=0, help="first block (default: recent ranges)"),
                  end: int | None = typer.Option(None, "--to", min=0, help="last block"),
                  repair: bool = typer.Option(False, "--repair", help="delete and re-ingest differing ranges"),
                  max_events: int | None = typer.Option(None, help="cap on events one repair may rewrite"),
                  lookback: int | None = typer.Option(None, help="without --from/--to: how many recent ranges")
                  ) -> None:
    """Compare stored ranges with the chain (hashes, logs per range and market). Exit 1 if anything differs
    and was not repaired, 3 if a deep reorg was found (even if repaired), 4 if the repair cap was hit."""
    from orderbook_pipelines.ingestion.reconcile import RepairCapExceeded, reconcile

    cfg = config()
    try:
        report = reconcile(cfg, chain_client(cfg), engine(), start=start, end=end, lookback_ranges=lookback,
                           repair=repair, max_repair_events=max_events)
    except RepairCapExceeded as exc:
        fail(str(exc), 4)
    for d in report.diffs:
        state = "DIFFERS" if d.mismatch else "ok"
        typer.echo(f"{d.key}\t{state}\tstored {d.stored_events}+{d.stored_rejected}r\tchain "
                   f"{d.chain_events}+{d.chain_rejected}r\tmissing {d.missing}\textra {d.extra}\t"
                   f"bad blocks {len(d.bad_blocks)}" + (f"\tmarkets {json.dumps(d.markets)}" if d.markets else ""))
    typer.echo(json.dumps(report.metadata()))
    if report.reorg:
        r = report.reorg
        fail(f"REORG deeper than {cfg.chain.confirmations} confirmations: {r.depth} block(s) from {r.fork_block} "
             f"({r.old_hash} -> {r.new_hash}); {'repaired' if report.repaired else 'NOT repaired (add --repair)'}",
             3)
    if report.mismatched and not report.repaired:
        fail(f"{len(report.mismatched)} range(s) differ from the chain; run again with --repair", 1)
