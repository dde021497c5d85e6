"""`orderbook snapshot ...` (depth snapshots, restore, verify) and `orderbook replay ...` (canonical event files).

They read DATABASE_URL and OBP_SNAPSHOT_* only: recovery must work without the chain or the YAML config.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

import typer

from orderbook_pipelines.config import EnvSettings

snapshot_app = typer.Typer(no_args_is_help=True, help="Depth snapshots: list, create, restore, verify.")
replay_app = typer.Typer(no_args_is_help=True, help="Deterministic replay: export the stored stream, replay files.")


def _fail(msg: str, code: int = 2) -> None:
    typer.secho(msg, fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def _engine():  # type: ignore[no-untyped-def]
    from orderbook_pipelines.storage.db import engine_for, migrate

    url = EnvSettings().database_url
    migrate(url)
    return engine_for(url)


def _market_id(market: str | None) -> int | None:
    if market is None:
        return None
    from orderbook_pipelines.storage.registry import resolve_market

    with _engine().connect() as conn:
        try:
            return resolve_market(conn, market)[0]
        except LookupError as exc:
            _fail(str(exc))
    return None


@snapshot_app.command("list")
def snapshot_list(market: str | None = typer.Option(None, help="market id or metric id")) -> None:
    """Stored snapshots, newest first: market, block, block hash, resting orders, levels, CRC32, state hash."""
    from sqlalchemy import text

    mid = _market_id(market)
    with _engine().connect() as conn:
        rows = conn.execute(text(
            "SELECT s.market_id, COALESCE(m.metric_id, m.metric_hash, m.address) AS name, s.block_number, "
            "s.block_hash, s.orders, jsonb_array_length(s.levels->'bids') AS bids, "
            "jsonb_array_length(s.levels->'asks') AS asks, s.checksum, s.state_hash, s.parquet_key "
            "FROM depth_snapshots s JOIN markets m USING (market_id) "
            "WHERE CAST(:m AS integer) IS NULL OR s.market_id = :m ORDER BY s.block_number DESC, s.market_id"),
            {"m": mid}).all()
    typer.echo("market\tblock\tblock_hash\torders\tbids\tasks\tchecksum\tstate_hash\tobject")
    for r in rows:
        typer.echo(f"{r.name}\t{r.block_number}\t{r.block_hash[:18]}\t{r.orders}\t{r.bids}\t{r.asks}\t{r.checksum}\t"
                   f"{r.state_hash[:16]}\t{r.parquet_key}")
    typer.echo(f"{len(rows)} snapshot(s)", err=True)


@snapshot_app.command("create")
def snapshot_create(block: int | None = typer.Option(None, min=0, help="default: the latest contiguous checkpoint"),
                    full: bool = typer.Option(False, help="full replay instead of previous snapshot + events"),
                    retention: bool = typer.Option(True, help="apply the retention policy afterwards")) -> None:
    """Snapshot every market at a range boundary (what the depth_snapshots asset does per range)."""
    from orderbook_pipelines.recovery.snapshots import (
        RetentionPolicy,
        SnapshotSettings,
        apply_retention,
        build_snapshots,
        store_snapshots,
    )
    from orderbook_pipelines.storage.checkpoints import NotIngested

    env = SnapshotSettings()
    engine = _engine()
    t0 = time.perf_counter()
    try:
        snaps, books = build_snapshots(engine, block, incremental=not full)
    except NotIngested as exc:
        _fail(str(exc))
    rep = store_snapshots(engine, snaps, env.dir)
    deleted = apply_retention(engine, env.dir, RetentionPolicy(env.keep_last, env.keep_daily)) if retention else 0
    for mid, why in books.fallbacks.items():
        typer.echo(f"market {mid}: full replay ({why})", err=True)
    typer.echo(f"block {books.block}: {rep.markets} market(s), {rep.orders} resting orders, {rep.bytes} bytes "
               f"under {env.dir}, {rep.incremental} incremental, {books.events} events replayed, "
               f"{deleted} expired snapshot(s) deleted, {time.perf_counter() - t0:.3f}s")


@snapshot_app.command("restore")
def snapshot_restore(market: str = typer.Option(..., help="market id or metric id"),
                     block: int | None = typer.Option(None, min=0, help="default: the ingested frontier"),
                     depth: int = typer.Option(5, min=0, help="levels to print per side")) -> None:
    """Rebuild a book from the latest snapshot <= block plus the stored events after it; print its state hash."""
    from orderbook_pipelines.book.model import BUY, SELL
    from orderbook_pipelines.recovery.snapshots import restore
    from orderbook_pipelines.storage.checkpoints import NotIngested

    mid = _market_id(market)
    assert mid is not None
    t0 = time.perf_counter()
    try:
        books, info = restore(_engine(), block, market_ids=[mid])
    except NotIngested as exc:
        _fail(str(exc))
    seconds = time.perf_counter() - t0
    mr, at = books[mid]
    base = info.base[mid]
    typer.echo(f"market {market} (id {mid}) at block {at}: "
               f"{'snapshot at block ' + str(base) if base is not None else 'no snapshot, full replay'} "
               f"+ {info.events} events; {len(mr.book.orders)} resting orders; restored in {seconds * 1000:.1f} ms")
    if mid in info.fallbacks:
        typer.echo(f"warning: {info.fallbacks[mid]}", err=True)
    for side, name in ((BUY, "bid"), (SELL, "ask")):
        for lv in mr.book.levels(side, depth):
            typer.echo(f"  {name}\t{lv.price}\t{lv.quantity}\t{lv.orders}")
    typer.echo(f"state_hash {mr.book.state_hash()}")


@snapshot_app.command("verify")
def snapshot_verify(block: int | None = typer.Option(None, min=0)) -> None:
    """Every stored snapshot (row + Parquet object) and the restored books against a strict full replay."""
    from orderbook_pipelines.book.replay import ReplayError
    from orderbook_pipelines.recovery.snapshots import SnapshotSettings, verify
    from orderbook_pipelines.storage.checkpoints import NotIngested

    t0 = time.perf_counter()
    try:
        rep = verify(_engine(), SnapshotSettings().dir, block)
    except (NotIngested, ReplayError) as exc:
        _fail(str(exc))
    for p in rep.problems:
        typer.secho(p, fg=typer.colors.RED, err=True)
    typer.echo(f"block {rep.block}: {rep.snapshots} snapshot(s), {rep.objects} object(s), {rep.markets} restored "
               f"market(s) checked against a full replay: {len(rep.problems)} problem(s) "
               f"({time.perf_counter() - t0:.3f}s)")
    if rep.problems:
        raise typer.Exit(1)


@replay_app.command("export")
def replay_export(out: Path = typer.Option(..., help="JSON-lines file to write ('-' for stdout)"),
                  market: str | None = typer.Option(None, help="market id or metric id (default: all)"),
                  to_block: int | None = typer.Option(None, min=0, help="default: the ingested frontier")) -> None:
    """Write the canonical stored event stream (open/fill/cancel, chain order, integers as decimal strings)."""
    from orderbook_pipelines.storage.events import export_events

    engine = _engine()
    try:
        if str(out) == "-":
            rep = export_events(engine, sys.stdout, market, to_block)
        else:
            out.parent.mkdir(parents=True, exist_ok=True)
            tmp = out.with_name(out.name + ".tmp")
            with tmp.open("w", encoding="utf-8", newline="\n") as f:
                rep = export_events(engine, f, market, to_block)
            tmp.replace(out)
    except LookupError as exc:
        _fail(str(exc))
    typer.echo(f"{rep.events} events up to block {rep.to_block} written to {out}", err=True)


@replay_app.command("run")
def replay_run(file: Path = typer.Argument(..., help="JSON-lines file written by `orderbook replay export`"),
               check: bool = typer.Option(True, help="check the book invariants after every block")) -> None:
    """Replay a file into books; print one state hash per market and the combined hash."""
    from orderbook_pipelines.book.replay import ReplayError, replay_file

    if not file.is_file():
        _fail(f"{file}: no such file")

    try:
        res = replay_file(file, strict=True, check_each_block=check)
    except ReplayError as exc:
        _fail(f"invalid event stream: {exc}", 1)
    for m in sorted(res.hashes, key=lambda s: s.encode()):
        typer.echo(f"{m}\t{res.hashes[m]}")
    typer.echo(f"combined\t{res.combined}")
    typer.echo(f"{res.events} events, {res.blocks} blocks, last block {res.last_block}", err=True)
