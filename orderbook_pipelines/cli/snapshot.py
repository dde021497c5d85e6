"""`orderbook snapshot`: depth snapshots (list, create, restore, verify): the fast restart of the live service.

Reads DATABASE_URL and OBP_SNAPSHOT_* only: recovery must work without the chain or the YAML config.
"""

from __future__ import annotations

import time

import typer

from orderbook_pipelines.cli.common import engine, fail, market_id

app = typer.Typer(no_args_is_help=True, help="Depth snapshots: list, create, restore, verify.")


@app.command("list")
def snapshot_list(market: str | None = typer.Option(None, help="market id or metric id")) -> None:
    """Stored snapshots, newest first: market, block, block hash, resting orders, levels, CRC32, state hash."""
    from sqlalchemy import text

    mid = market_id(market)
    with engine().connect() as conn:
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


@app.command("create")
def snapshot_create(block: int | None = typer.Option(None, min=0, help="default: the latest contiguous checkpoint"),
                    full: bool = typer.Option(False, help="full replay instead of previous snapshot + events"),
                    retention: bool = typer.Option(True, help="apply the retention policy afterwards")) -> None:
    """Snapshot every market at a range boundary (what the depth_snapshots asset does per range)."""
    from orderbook_pipelines.recovery.restore import build_snapshots
    from orderbook_pipelines.recovery.retention import RetentionPolicy, apply_retention
    from orderbook_pipelines.recovery.snapshots import SnapshotSettings
    from orderbook_pipelines.recovery.store import store_snapshots
    from orderbook_pipelines.storage.checkpoints import NotIngested

    env = SnapshotSettings()
    eng = engine()
    t0 = time.perf_counter()
    try:
        snaps, books = build_snapshots(eng, block, incremental=not full)
    except NotIngested as exc:
        fail(str(exc))
    rep = store_snapshots(eng, snaps, env.dir)
    deleted = apply_retention(eng, env.dir, RetentionPolicy(env.keep_last, env.keep_daily)) if retention else 0
    for mid, why in books.fallbacks.items():
        typer.echo(f"market {mid}: full replay ({why})", err=True)
    typer.echo(f"block {books.block}: {rep.markets} market(s), {rep.orders} resting orders, {rep.bytes} bytes "
               f"under {env.dir}, {rep.incremental} incremental, {books.events} events replayed, "
               f"{deleted} expired snapshot(s) deleted, {time.perf_counter() - t0:.3f}s")


@app.command("restore")
def snapshot_restore(market: str = typer.Option(..., help="market id or metric id"),
                     block: int | None = typer.Option(None, min=0, help="default: the ingested frontier"),
                     depth: int = typer.Option(5, min=0, help="levels to print per side")) -> None:
    """Rebuild a book from the latest snapshot <= block plus the stored events after it; print its state hash."""
    from orderbook_pipelines.book.model import BUY, SELL
    from orderbook_pipelines.recovery.restore import restore
    from orderbook_pipelines.storage.checkpoints import NotIngested

    mid = market_id(market)
    assert mid is not None
    t0 = time.perf_counter()
    try:
        books, info = restore(engine(), block, market_ids=[mid])
    except NotIngested as exc:
        fail(str(exc))
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


@app.command("verify")
def snapshot_verify(block: int | None = typer.Option(None, min=0)) -> None:
    """Every stored snapshot (row + Parquet object) and the restored books against a strict full replay."""
    from orderbook_pipelines.book.replay import ReplayError
    from orderbook_pipelines.recovery.restore import verify
    from orderbook_pipelines.recovery.snapshots import SnapshotSettings
    from orderbook_pipelines.storage.checkpoints import NotIngested

    t0 = time.perf_counter()
    try:
        rep = verify(engine(), SnapshotSettings().dir, block)
    except (NotIngested, ReplayError) as exc:
        fail(str(exc))
    for p in rep.problems:
        typer.secho(p, fg=typer.colors.RED, err=True)
    typer.echo(f"block {rep.block}: {rep.snapshots} snapshot(s), {rep.objects} object(s), {rep.markets} restored "
               f"market(s) checked against a full replay: {len(rep.problems)} problem(s) "
               f"({time.perf_counter() - t0:.3f}s)")
    if rep.problems:
        raise typer.Exit(1)
