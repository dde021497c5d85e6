"""Analytics assets, one Dagster partition per market, keyed by the market's public name (its metric id).

Trades, candles and daily rows load incrementally (analytics/incremental.py): a run rewrites only what changed
in Postgres since the market's last load, a reorg repair included; run config `full_refresh: true` rebuilds the
market. Loads replace rows (delete-then-insert), so re-running a partition is idempotent and backfilling
thousands of markets is thousands of small, independent runs. The time grain
(1m..1d candles, daily stats, snapshot times) lives inside the tables, not in Dagster: see docs/analytics.md.
Metadata is what the OSS UI draws: numbers (plotted across materializations), markdown tables and sparklines.
"""

import math
from collections.abc import Sequence
from decimal import Decimal
from typing import Any

import polars as pl
from dagster import (
    AllPartitionMapping,
    AssetCheckResult,
    AssetCheckSeverity,
    AssetCheckSpec,
    AssetDep,
    AssetExecutionContext,
    Config,
    MaterializeResult,
    MetadataValue,
    asset,
)
from sqlalchemy import Connection

from orderbook_pipelines.analytics import incremental, queries, transforms
from orderbook_pipelines.analytics.sink import (
    CANDLES,
    LIQUIDITY,
    MARKET_DAILY,
    TRADES,
    AnalyticsSink,
    Table,
    where_market,
)
from orderbook_pipelines.partitions import markets
from orderbook_pipelines.resources import AnalyticsResource, PostgresResource
from orderbook_pipelines.storage.registry import market_names, resolve_market

GROUP = "analytics"


class LoadConfig(Config):
    """Run config of every analytics asset."""

    full_refresh: bool = False  # rebuild the market's rows instead of loading what changed
REPLAY_SAMPLE_BLOCKS = 100  # liquidity sampling grain when no depth_snapshots exist (one default block range)
SERIES_POINTS = 48  # points per sparkline: two days of hourly candles


def resolve_partition(conn: Connection, key: str) -> tuple[int, str]:
    """A `markets` partition key -> (market_id, public name).

    Keys are public names (storage/registry.py MARKET_NAME_SQL). The numeric keys of an instance from before
    (the internal market_id as text) still resolve, because resolve_market accepts ids too; a digits-only key
    that is both some market's id and another market's metric id belongs to the metric id.
    """
    mid, name = resolve_market(conn, key)
    if name != key and key.isdigit():
        named = [m for m, n in market_names(conn).items() if n == key]
        if named:
            return named[0], key
    return mid, name


def _market_id(context: AssetExecutionContext, postgres: PostgresResource) -> int:
    with postgres.engine().connect() as conn:
        try:
            return resolve_partition(conn, context.partition_key)[0]
        except LookupError as exc:
            raise LookupError(f"markets partition {context.partition_key!r}: {exc}") from None


# ------------------------------------------------------------------------------------------- metadata --
_SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: Sequence[float | None]) -> str:
    """A one-line unicode chart: Dagster has no plot metadata type, markdown shows this anywhere."""
    vals = [float(v) for v in values if v is not None and not math.isnan(float(v))]
    if not vals:
        return ""
    lo, hi = min(vals), max(vals)
    span = (hi - lo) or 1.0
    return "".join(_SPARK[int((v - lo) / span * (len(_SPARK) - 1))] for v in vals)


def preview_md(df: pl.DataFrame, n: int = 8) -> MetadataValue:
    head = df.head(n)
    if head.is_empty():
        return MetadataValue.md("_no rows_")
    cols = head.columns
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for row in head.iter_rows():
        lines.append("| " + " | ".join(_fmt(v) for v in row) + " |")
    return MetadataValue.md("\n".join(lines))


def series_md(df: pl.DataFrame, cols: list[str], n: int = SERIES_POINTS) -> MetadataValue:
    """The last `n` points of some columns as a markdown table: sparkline, last, min, max per series.

    What a line chart of those series showed, in a form the UI renders (each sparkline has its own scale,
    so the figures carry the levels).
    """
    tail = df.tail(n)
    if tail.is_empty():
        return MetadataValue.md("_no data_")
    lines = [f"| series (last {tail.height}) | trend | last | min | max |", "|---|---|---|---|---|"]
    for c in cols:
        vals = [float(v) for v in tail[c].to_list() if v is not None and not math.isnan(float(v))]
        if not vals:
            lines.append(f"| {c} | | | | |")
            continue
        lines.append(f"| {c} | {sparkline(vals)} | {_fmt(vals[-1])} | {_fmt(min(vals))} | {_fmt(max(vals))} |")
    return MetadataValue.md("\n".join(lines))


def last_value(df: pl.DataFrame, col: str) -> MetadataValue:
    """The column's last non-null value as a number, so the UI plots it across materializations (NaN if none)."""
    vals = [v for v in df[col].to_list() if v is not None] if df.height else []
    return MetadataValue.float(float(vals[-1]) if vals else math.nan)


def _fmt(v: object) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, Decimal):
        return f"{v.normalize():f}"
    return str(v)


def _time_meta(df: pl.DataFrame, col: str) -> dict[str, Any]:
    if df.is_empty():
        return {"rows": 0}
    return {"rows": df.height, "time_min": MetadataValue.text(str(df[col].min())),
            "time_max": MetadataValue.text(str(df[col].max()))}


# --------------------------------------------------------------------------------------------- assets --
@asset(partitions_def=markets, group_name=GROUP, deps=[AssetDep("trades", partition_mapping=AllPartitionMapping())],
       description="Trades fact table of one market up to the ingested frontier, loaded incrementally: raw uint256 "
       "amounts as exact digit strings, human-unit price/quantity as DECIMAL(38,18) (scaled by Postgres), float "
       "notional, time keys (ts, day).")
def analytics_trades(context: AssetExecutionContext, config: LoadConfig, postgres: PostgresResource,
                     analytics: AnalyticsResource) -> MaterializeResult:
    mid = _market_id(context, postgres)
    with postgres.engine().connect() as conn:
        m = transforms.market(conn, mid)
    with analytics.open() as sink:
        load = incremental.load_trades(postgres.engine(), sink, mid, full=config.full_refresh)
        where = where_market(mid)
        totals = sink.query(f"SELECT count(*) AS n, sum(notional) AS notional, min(block_time) AS t0, "
                            f"max(block_time) AS t1 FROM {TRADES.name} WHERE {where}").row(0, named=True)
        daily = sink.query(f"SELECT day, sum(notional) AS notional, count(*) AS trades FROM {TRADES.name} "
                           f"WHERE {where} GROUP BY day ORDER BY day DESC LIMIT {SERIES_POINTS}").sort("day")
    df = load.frame
    total = int(totals["n"] or 0)
    return MaterializeResult(metadata={
        "market": m.label, "market_id": mid, "backend": analytics.backend_name(),
        "rows": total, **({"time_min": MetadataValue.text(str(totals["t0"])),
                           "time_max": MetadataValue.text(str(totals["t1"]))} if total else {}),
        "rows_written": load.rows, "full_load": load.full, "loaded_from_block": load.from_block,
        "loaded_to_block": load.to_block,
        "notional_total": MetadataValue.float(float(totals["notional"] or 0.0)),
        "daily": series_md(daily, ["notional", "trades"]),
        "preview": preview_md(df.select("block_number", "log_index", "block_time", "price", "quantity", "buyer")),
    })


def _sink_frame(sink: AnalyticsSink, table: Table, market_id: int, order: str) -> pl.DataFrame:
    """The market's stored rows in the table's own schema (an engine's empty result carries its own types)."""
    df = sink.query(f"SELECT * FROM {table.name} WHERE {where_market(market_id)} ORDER BY {order}")
    schema = table.polars_schema()
    if df.is_empty():
        return pl.DataFrame(schema=schema)
    return df.select(table.names).cast(schema)  # type: ignore[arg-type]


CANDLE_CHECKS = {
    "candles_match_trades": "Every window's open/high/low/close/volume and trade count equal the engine's own "
    "recomputation from the trades fact table (argMin/argMax over block and log index), compared exactly.",
    "vwap_within_low_high": "Every window's VWAP lies between its low and high.",
    "candle_volumes_sum_to_trades": "Each grain (1m, 5m, 1h, 1d) is present and its volumes and trade counts sum "
    "to the market's trades total.",
}


def _stored_candles(sink: AnalyticsSink, market_id: int) -> pl.DataFrame:
    """The market's candles ordered by grain, ts: a grain's rows are in time order (the hourly series relies on it)."""
    return _sink_frame(sink, CANDLES, market_id, "grain, ts")


def check_candles(sink: AnalyticsSink, market_id: int, since_ts: int = 0,
                  stored: pl.DataFrame | None = None) -> list[AssetCheckResult]:
    """Candles against the fact table, recomputed by the engine (not by the polars code that built them); the
    windows from the day-aligned `since_ts` on (what a load rewrote) for OHLC, every window for the sums.
    `stored`: the market's candles as _stored_candles read them, when the caller has them already."""
    c = _stored_candles(sink, market_id) if stored is None else stored
    exp = queries.ohlc_from_trades(sink, market_id, since_ts)
    c_all, c = c, c.filter(pl.col("ts") >= since_ts)
    dec = pl.Decimal(38, 18)
    cols = ["open", "high", "low", "close", "volume"]
    if exp.height:
        exp = exp.rename({"bucket_ts": "ts"}).with_columns([pl.col(k).cast(dec) for k in cols],
                                                           ts=pl.col("ts").cast(pl.Int64),
                                                           trades=pl.col("trades").cast(pl.Int64))
    else:
        exp = pl.DataFrame(schema={"grain": pl.String, "ts": pl.Int64, **dict.fromkeys(cols, dec), "trades": pl.Int64})
    j = c.join(exp, on=["grain", "ts"], how="full", suffix="_exp", coalesce=True)
    bad = j.filter(pl.any_horizontal([pl.col(k).ne_missing(pl.col(f"{k}_exp")) for k in [*cols, "trades"]]))
    results = [AssetCheckResult(
        check_name="candles_match_trades", passed=bad.is_empty(), severity=AssetCheckSeverity.ERROR,
        metadata={"candles": c.height, "mismatched_windows": bad.height,
                  "sample": preview_md(bad.select("grain", "ts", "open", "open_exp", "high", "high_exp"), 5)})]
    eps = 1e-9
    out = c.filter((pl.col("vwap") < pl.col("low").cast(pl.Float64) * (1 - eps))
                   | (pl.col("vwap") > pl.col("high").cast(pl.Float64) * (1 + eps)))
    results.append(AssetCheckResult(check_name="vwap_within_low_high", passed=out.is_empty(),
                                    severity=AssetCheckSeverity.ERROR, metadata={"violations": out.height}))
    totals = sink.query(f"SELECT sum(quantity) AS q, count(*) AS n FROM {TRADES.name} "
                        f"WHERE {where_market(market_id)}").row(0, named=True)
    total_q, total_n = totals["q"] or 0, int(totals["n"] or 0)
    sums = c_all.group_by("grain").agg(pl.col("volume").sum(), pl.col("trades").sum())
    wrong = [r["grain"] for r in sums.iter_rows(named=True) if r["volume"] != total_q or r["trades"] != total_n]
    grains_missing = total_n > 0 and sums.height != len(transforms.INTERVALS)
    results.append(AssetCheckResult(
        check_name="candle_volumes_sum_to_trades", passed=not wrong and not grains_missing,
        severity=AssetCheckSeverity.ERROR,
        metadata={"trade_volume": str(total_q), "trades": total_n, "grains_off": ", ".join(wrong) or "none"}))
    return results


@asset(partitions_def=markets, group_name=GROUP, deps=[analytics_trades],
       check_specs=[AssetCheckSpec(n, asset="analytics_candles", description=d) for n, d in CANDLE_CHECKS.items()],
       description="OHLCV candles (1m, 5m, 1h, 1d) with VWAP and TWAP per window, computed in polars from the "
       "market's trades fact rows; guarded by checks that recompute OHLC in the engine.")
def analytics_candles(context: AssetExecutionContext, config: LoadConfig, postgres: PostgresResource,
                      analytics: AnalyticsResource) -> MaterializeResult:
    mid = _market_id(context, postgres)
    with analytics.open() as sink:
        load = incremental.load_candles(sink, mid, full=config.full_refresh)
        since = 0 if load.since is None else incremental.epoch(load.since)
        stored = _stored_candles(sink, mid)  # read once: the checks and the metadata use the same rows
        checks = check_candles(sink, mid, since, stored)
    hourly = stored.filter(pl.col("grain") == "1h").tail(SERIES_POINTS)  # ordered by grain, ts
    per_grain = dict(stored.group_by("grain").len().iter_rows())
    prices = hourly.select(pl.col("close").cast(pl.Float64), "vwap", "twap")
    return MaterializeResult(check_results=checks, metadata={
        **_time_meta(load.frame, "bucket_start"),
        **{f"rows_{g}": int(per_grain.get(g, 0)) for g in transforms.INTERVALS},
        "recomputed_from_day": MetadataValue.text(str(load.since) if load.since else "nothing new"),
        "full_load": load.full,
        "last_close": last_value(prices, "close"), "last_vwap_1h": last_value(prices, "vwap"),
        "last_twap_1h": last_value(prices, "twap"),
        "hourly": series_md(prices, ["close", "vwap", "twap"]),
        "preview_1h": preview_md(hourly.tail(8).select("bucket_start", "open", "high", "low", "close", "volume",
                                                       "vwap", "twap")),
    })


@asset(partitions_def=markets, group_name=GROUP,
       deps=[AssetDep("order_events", partition_mapping=AllPartitionMapping())],
       description="Liquidity per book snapshot: spread, depth within +/-0.5/1/2% of mid, imbalance, resting "
       "notional per side. From depth_snapshots when the recovery tier wrote any for the market, else from a "
       f"replay of its order events sampled every {REPLAY_SAMPLE_BLOCKS} blocks.")
def analytics_liquidity(context: AssetExecutionContext, postgres: PostgresResource,
                        analytics: AnalyticsResource) -> MaterializeResult:
    mid = _market_id(context, postgres)
    with postgres.engine().connect() as conn:
        m = transforms.market(conn, mid)
        snaps = transforms.snapshots_from_depth_table(conn, mid, m.decimals)
        source = "depth_snapshots"
        if not snaps:
            snaps = list(transforms.snapshots_from_replay(conn, mid, m.decimals, REPLAY_SAMPLE_BLOCKS))
            source = "replay"
    df = transforms.liquidity(mid, snaps, source)
    with analytics.open() as sink:
        sink.replace_market(LIQUIDITY, mid, df)
    return MaterializeResult(metadata={
        "market": m.label, "market_id": mid, "source": source, **_time_meta(df, "snapshot_time"),
        "last_mid": last_value(df, "mid"), "last_spread_bps": last_value(df, "spread_bps"),
        "snapshots": series_md(df, ["mid", "spread_bps", "bid_depth_1", "ask_depth_1", "imbalance_1"]),
        "preview": preview_md(df.tail(8).select("snapshot_time", "block_number", "mid", "spread_bps",
                                                "bid_depth_1", "ask_depth_1", "imbalance_1")),
    })


@asset(partitions_def=markets, group_name=GROUP, deps=[analytics_trades],
       check_specs=[AssetCheckSpec("daily_volumes_sum_to_trades", asset="analytics_market_daily",
                                   description="The days' volumes and trade counts sum to the trades fact table.")],
       description="Per market and UTC day: trades, base volume, notional, distinct traders/buyers/sellers. "
       "Aggregated by the engine's SQL from the trades fact table.")
def analytics_market_daily(context: AssetExecutionContext, config: LoadConfig, postgres: PostgresResource,
                           analytics: AnalyticsResource) -> MaterializeResult:
    mid = _market_id(context, postgres)
    with analytics.open() as sink:
        load = incremental.load_market_daily(sink, mid, full=config.full_refresh)
        d = _sink_frame(sink, MARKET_DAILY, mid, "day")
        t = sink.query(f"SELECT sum(quantity) AS q, count(*) AS n FROM {TRADES.name} "
                       f"WHERE {where_market(mid)}").row(0, named=True)
    trades = int(t["n"] or 0)
    ok = (d["volume"].sum() if d.height else 0) == (t["q"] or 0) and \
        (int(d["trades"].sum()) if d.height else 0) == trades
    check = AssetCheckResult(check_name="daily_volumes_sum_to_trades", passed=bool(ok),
                             severity=AssetCheckSeverity.ERROR, metadata={"days": d.height, "trades": trades})
    return MaterializeResult(check_results=[check], metadata={
        **_time_meta(d, "day"), "traders_max_day": int(d["traders"].max()) if d.height else 0,  # type: ignore[arg-type]
        "rows_written": load.rows, "full_load": load.full,
        "recomputed_from_day": MetadataValue.text(str(load.since) if load.since else "nothing new"),
        "last_day_volume": last_value(d, "volume") if d.height else MetadataValue.float(0.0),
        "days": series_md(d, ["volume", "notional", "trades", "traders"]),
        "preview": preview_md(d.tail(8)),
    })


analytics_assets = [analytics_trades, analytics_candles, analytics_liquidity, analytics_market_daily]
