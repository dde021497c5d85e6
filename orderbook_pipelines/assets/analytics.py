"""Analytics assets, one Dagster partition per market (keys = markets.market_id, fed by the registry sensor).

Each materialization rebuilds one market's rows in the sink (delete-then-insert), so re-running a partition
is idempotent and backfilling thousands of markets is thousands of small, independent runs. The time grain
(1m..1d candles, daily stats, snapshot times) lives inside the tables, not in Dagster: see docs/analytics.md.
"""


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
    MaterializeResult,
    MetadataValue,
    asset,
)

from orderbook_pipelines.analytics import queries, transforms
from orderbook_pipelines.analytics.sink import CANDLES, LIQUIDITY, MARKET_DAILY, TRADES, AnalyticsSink
from orderbook_pipelines.partitions import markets
from orderbook_pipelines.resources import AnalyticsResource, PostgresResource

GROUP = "analytics"
REPLAY_SAMPLE_BLOCKS = 100  # liquidity sampling grain when no depth_snapshots exist (one default block range)


def _market_id(context: AssetExecutionContext) -> int:
    try:
        return int(context.partition_key)
    except ValueError:
        raise ValueError(f"not a market partition key: {context.partition_key!r} (expected a market_id)") from None


# ------------------------------------------------------------------------------------------- metadata --
_SPARK = "▁▂▃▄▅▆▇█"


def sparkline(values: list[float]) -> str:
    """A one-line unicode chart: Dagster has no plot metadata type, markdown shows this anywhere."""
    vals = [v for v in values if v is not None]
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


def vega_line(df: pl.DataFrame, x: str, ys: list[str], title: str) -> MetadataValue:
    """A vega-lite spec with the data inlined (paste into any vega-lite viewer)."""
    data = [{x: str(r[x]), **{y: r[y] for y in ys}} for r in df.select([x, *ys]).tail(500).iter_rows(named=True)]
    spec = {"$schema": "https://vega.github.io/schema/vega-lite/v5.json", "title": title,
            "data": {"values": data}, "transform": [{"fold": ys}],
            "mark": "line", "encoding": {"x": {"field": x, "type": "temporal"},
                                         "y": {"field": "value", "type": "quantitative", "scale": {"zero": False}},
                                         "color": {"field": "key", "type": "nominal"}}}
    return MetadataValue.json(spec)


# --------------------------------------------------------------------------------------------- assets --
@asset(partitions_def=markets, group_name=GROUP, deps=[AssetDep("trades", partition_mapping=AllPartitionMapping())],
       description="Trades fact table of one market: raw uint256 amounts as exact digit strings, human-unit "
       "price/quantity as DECIMAL(38,18) (scaled by Postgres), float notional, time keys (ts, day).")
def analytics_trades(context: AssetExecutionContext, postgres: PostgresResource,
                     analytics: AnalyticsResource) -> MaterializeResult:
    mid = _market_id(context)
    with postgres.engine().connect() as conn:
        m = transforms.market(conn, mid)
        df = transforms.extract_trades(conn, mid)
    with analytics.open() as sink:
        n = sink.replace_market(TRADES, mid, df)
    daily = df.group_by("day").agg(pl.col("notional").sum()).sort("day") if n else pl.DataFrame()
    return MaterializeResult(metadata={
        "market": m.label, "backend": analytics.backend_name(), **_time_meta(df, "block_time"), "rows_written": n,
        "notional_total": float(df["notional"].sum()) if n else 0.0,
        "daily_notional": MetadataValue.md(sparkline(daily["notional"].to_list()) if n else ""),
        "preview": preview_md(df.select("block_number", "log_index", "block_time", "price", "quantity", "buyer")),
    })


def _sink_trades(sink: AnalyticsSink, market_id: int) -> pl.DataFrame:
    df = sink.query(f"SELECT * FROM {TRADES.name} WHERE market_id = {int(market_id)} ORDER BY block_number, log_index")
    if df.is_empty():
        return pl.DataFrame(schema=TRADES.polars_schema())
    return df.select(TRADES.names).cast(TRADES.polars_schema())  # type: ignore[arg-type]


def _sink_frame(sink: AnalyticsSink, table: str, schema: dict, market_id: int, order: str) -> pl.DataFrame:
    df = sink.query(f"SELECT * FROM {table} WHERE market_id = {int(market_id)} ORDER BY {order}")
    if df.is_empty():
        return pl.DataFrame(schema=schema)
    return df.select(list(schema)).cast(schema)


CANDLE_CHECKS = ("candles_match_trades", "vwap_within_low_high", "candle_volumes_sum_to_trades")


def check_candles(sink: AnalyticsSink, market_id: int) -> list[AssetCheckResult]:
    """Candles against the fact table, recomputed by the engine (not by the polars code that built them)."""
    c = _sink_frame(sink, CANDLES.name, CANDLES.polars_schema(), market_id, "grain, ts")
    t = _sink_trades(sink, market_id)
    exp = queries.ohlc_from_trades(sink, market_id)
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
    total_q, total_n = t["quantity"].sum(), t.height
    sums = c.group_by("grain").agg(pl.col("volume").sum(), pl.col("trades").sum())
    wrong = [r["grain"] for r in sums.iter_rows(named=True) if r["volume"] != total_q or r["trades"] != total_n]
    grains_missing = total_n > 0 and sums.height != len(transforms.INTERVALS)
    results.append(AssetCheckResult(
        check_name="candle_volumes_sum_to_trades", passed=not wrong and not grains_missing,
        severity=AssetCheckSeverity.ERROR,
        metadata={"trade_volume": str(total_q), "trades": total_n, "grains_off": ", ".join(wrong) or "none"}))
    return results


@asset(partitions_def=markets, group_name=GROUP, deps=[analytics_trades],
       check_specs=[AssetCheckSpec(n, asset="analytics_candles") for n in CANDLE_CHECKS],
       description="OHLCV candles (1m, 5m, 1h, 1d) with VWAP and TWAP per window, computed in polars from the "
       "market's trades fact rows; guarded by checks that recompute OHLC in the engine.")
def analytics_candles(context: AssetExecutionContext, analytics: AnalyticsResource) -> MaterializeResult:
    mid = _market_id(context)
    with analytics.open() as sink:
        c = transforms.candles(_sink_trades(sink, mid))
        sink.replace_market(CANDLES, mid, c)
        checks = check_candles(sink, mid)
    hourly = c.filter(pl.col("grain") == "1h").sort("ts")
    per_grain = {f"rows_{g}": c.filter(pl.col("grain") == g).height for g in transforms.INTERVALS}
    return MaterializeResult(check_results=checks, metadata={
        **_time_meta(c, "bucket_start"), **per_grain,
        "hourly_close": MetadataValue.md(sparkline([float(v) for v in hourly["close"].to_list()])),
        "preview_1h": preview_md(hourly.tail(8).select("bucket_start", "open", "high", "low", "close", "volume",
                                                       "vwap", "twap")),
        "plot_1h_vega_lite": vega_line(hourly.with_columns(close=pl.col("close").cast(pl.Float64)),
                                       "bucket_start", ["close", "vwap", "twap"], "hourly close / VWAP / TWAP"),
    })


@asset(partitions_def=markets, group_name=GROUP,
       deps=[AssetDep("order_events", partition_mapping=AllPartitionMapping())],
       description="Liquidity per book snapshot: spread, depth within +/-0.5/1/2% of mid, imbalance, resting "
       "notional per side. From depth_snapshots when the recovery tier wrote any for the market, else from a "
       f"replay of its order events sampled every {REPLAY_SAMPLE_BLOCKS} blocks.")
def analytics_liquidity(context: AssetExecutionContext, postgres: PostgresResource,
                        analytics: AnalyticsResource) -> MaterializeResult:
    mid = _market_id(context)
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
        "market": m.label, "source": source, **_time_meta(df, "snapshot_time"),
        "spread_bps": MetadataValue.md(sparkline(df["spread_bps"].to_list())),
        "preview": preview_md(df.tail(8).select("snapshot_time", "block_number", "mid", "spread_bps",
                                                "bid_depth_1", "ask_depth_1", "imbalance_1")),
    })


@asset(partitions_def=markets, group_name=GROUP, deps=[analytics_trades],
       check_specs=[AssetCheckSpec("daily_volumes_sum_to_trades", asset="analytics_market_daily")],
       description="Per market and UTC day: trades, base volume, notional, distinct traders/buyers/sellers. "
       "Aggregated by the engine's SQL from the trades fact table.")
def analytics_market_daily(context: AssetExecutionContext, analytics: AnalyticsResource) -> MaterializeResult:
    mid = _market_id(context)
    with analytics.open() as sink:
        d = queries.market_daily(sink, mid)
        if d.height:
            d = d.cast(MARKET_DAILY.polars_schema())  # type: ignore[arg-type]
        sink.replace_market(MARKET_DAILY, mid, d)
        t = _sink_trades(sink, mid)
    ok = (d["volume"].sum() if d.height else 0) == (t["quantity"].sum() if t.height else 0) and \
        (int(d["trades"].sum()) if d.height else 0) == t.height
    check = AssetCheckResult(check_name="daily_volumes_sum_to_trades", passed=bool(ok),
                             severity=AssetCheckSeverity.ERROR, metadata={"days": d.height, "trades": t.height})
    return MaterializeResult(check_results=[check], metadata={
        **_time_meta(d, "day"), "traders_max_day": int(d["traders"].max()) if d.height else 0,  # type: ignore[arg-type]
        "daily_volume": MetadataValue.md(sparkline([float(v) for v in d["volume"].to_list()])),
        "preview": preview_md(d.tail(8)),
    })


analytics_assets = [analytics_trades, analytics_candles, analytics_liquidity, analytics_market_daily]
