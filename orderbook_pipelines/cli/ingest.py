"""`orderbook ingest` (manual ingestion outside Dagster, same code path as the assets) and `orderbook wait-config`
(the Procfile's gate until the dev chain has written its configuration)."""

from __future__ import annotations

import gc
import sys
import time
from pathlib import Path

import typer

from orderbook_pipelines.cli.common import config, database_url, fail
from orderbook_pipelines.gc_pause import gc_paused


def ingest(start: int = typer.Option(..., "--from", min=0,
                                     help="first block (ingestion starts at the beginning of its range)"),
           end: int = typer.Option(..., "--to", min=0,
                                   help="last block: an upper bound, nothing beyond it is written"),
           workers: int = typer.Option(1, "--workers", min=1, max=64,
                                       help="ranges in flight, one process each (a backfill: 2 per core)")) -> None:
    # `\[` keeps the rich help renderer from taking "[from, to]" for a style tag and dropping it.
    r"""Ingest and project blocks \[from, to] outside Dagster, range by range (same code path as the assets).

    --to is an upper bound: nothing beyond it is written, even where its range goes further.
    """
    if end < start:  # before anything is loaded or migrated: a typo costs nothing
        fail(f"--to {end} is before --from {start}")
    # `orderbook ingest` start-up (and exit): the imports below leave ~100k GC-tracked objects that live as long as
    # the process. Full collections re-scan them all: two while they load (~0.15 s, the "self time" -X importtime
    # charges to whichever module runs then, e.g. ingestion.backfill), and the interpreter's exit collects them
    # once more before it ends (~0.5 s after the last line is printed). So the collector is paused while they load
    # and they are frozen (gc.freeze, as the live service does): collections only see what the ranges allocate, and
    # the OS takes the rest back at exit. Once per process (tests invoke this command repeatedly).
    first_load = "orderbook_pipelines.ingestion.backfill" not in sys.modules
    with gc_paused():
        from orderbook_pipelines.ingestion.backfill import run_ranges
        from orderbook_pipelines.ingestion.ranges import ranges_between
        from orderbook_pipelines.storage.db import migrate

        if first_load:
            gc.freeze()
    cfg = config()
    url = database_url()
    migrate(url)
    c = cfg.chain
    ranges = ranges_between(c.start_block, c.range_size, max(start, c.start_block), end)
    for out in run_ranges(cfg, url, ranges, workers, upto=end):
        r = out.report
        if r is None:
            typer.echo(f"{out.start}-{out.end}: not final yet; stopping here")
            break
        typer.echo(f"{out.start}-{r.processed_to}: {r.events} events ({r.events_inserted} new), {r.rejected} "
                   f"rejected, {r.projection.orders_changed} orders changed")
        if not r.complete:
            break


def wait_config(path: Path, timeout: float = typer.Option(120.0)) -> None:
    """Block until the configuration file exists and validates (used by the Procfile)."""
    from orderbook_pipelines.config import ConfigError, load_config

    deadline = time.monotonic() + timeout
    while True:
        if path.exists():
            try:
                load_config(path)
                return
            except ConfigError:
                pass
        if time.monotonic() > deadline:
            fail(f"{path} did not appear (or is invalid) within {timeout:.0f}s; is the `sim` process running?")
        time.sleep(0.5)
