"""Analyst queries and the engine-side aggregations, in SQL that DuckDB and ClickHouse (18.16+) both run.

Portability rules that keep one text per query: time buckets from the epoch-seconds column `ts`
(`ts - ts % 3600`), `argMin`/`argMax` (DuckDB aliases them), joins with USING, no engine-specific functions,
and no alias that shadows a column used in WHERE (ClickHouse resolves aliases there).
Parameters are rendered as validated integer literals, never interpolated strings.
The same texts are shown in docs/analytics.md and executed by tests against both backends.
"""

from __future__ import annotations

import polars as pl

from orderbook_pipelines.analytics.sink import AnalyticsSink
from orderbook_pipelines.analytics.transforms import INTERVALS


def _int(v: int) -> int:
    if not isinstance(v, int) or isinstance(v, bool):
        raise TypeError(f"expected an int, got {v!r}")
    return v


# --- documented analyst queries ---------------------------------------------------------------------------
TOP_MARKETS_BY_VOLUME = """
SELECT market_id, max(metric_id) AS metric_id, count(*) AS trades, sum(notional) AS notional,
       sum(quantity) AS volume, max(block_time) AS last_trade
FROM trades_fact
GROUP BY market_id
ORDER BY notional DESC, market_id
LIMIT {limit}
"""

VWAP_VS_MID = """
SELECT hour, bucket_start, vwap, close, book_mid AS mid, book_spread_bps AS spread_bps,
       (vwap - book_mid) / book_mid * 10000 AS vwap_minus_mid_bps
FROM (SELECT ts AS hour, bucket_start, vwap, close FROM candles WHERE market_id = {market_id} AND grain = '1h') AS c
JOIN (SELECT ts - ts % 3600 AS hour, avg(mid) AS book_mid, avg(spread_bps) AS book_spread_bps
      FROM liquidity WHERE market_id = {market_id} AND mid IS NOT NULL GROUP BY ts - ts % 3600) AS l
USING (hour)
ORDER BY hour
"""

LIQUIDITY_OVER_TIME = """
SELECT ts - ts % {bucket_s} AS bucket, count(*) AS snapshots, avg(spread_bps) AS spread_bps,
       avg(bid_depth_1) AS bid_depth_1, avg(ask_depth_1) AS ask_depth_1, avg(imbalance_1) AS imbalance_1,
       max(bid_notional) AS max_bid_notional, max(ask_notional) AS max_ask_notional
FROM liquidity
WHERE market_id = {market_id}
GROUP BY ts - ts % {bucket_s}
ORDER BY bucket
"""


def top_markets_by_volume(sink: AnalyticsSink, limit: int = 10) -> pl.DataFrame:
    """Markets ranked by traded notional (quote units), with trade count and base volume."""
    return sink.query(TOP_MARKETS_BY_VOLUME.format(limit=_int(limit)))


def vwap_vs_mid(sink: AnalyticsSink, market_id: int) -> pl.DataFrame:
    """Hourly VWAP against the average book mid of the same hour (hours that have both trades and a mid)."""
    return sink.query(VWAP_VS_MID.format(market_id=_int(market_id)))


def liquidity_over_time(sink: AnalyticsSink, market_id: int, bucket_s: int = 3600) -> pl.DataFrame:
    """Average spread, 1% depth and imbalance per time bucket of one market's book snapshots."""
    return sink.query(LIQUIDITY_OVER_TIME.format(market_id=_int(market_id), bucket_s=_int(bucket_s)))


# --- engine-side aggregations and check queries ------------------------------------------------------------
MARKET_DAILY_SQL = """
SELECT market_id, day, sum(leg) AS trades, sum(CASE WHEN leg = 1 THEN quantity END) AS volume,
       sum(notional * leg) AS notional, count(DISTINCT trader) AS traders,
       count(DISTINCT CASE WHEN leg = 1 THEN trader END) AS buyers,
       count(DISTINCT CASE WHEN leg = 0 THEN trader END) AS sellers
FROM (SELECT market_id, day, buyer AS trader, 1 AS leg, quantity, notional FROM trades_fact
      WHERE market_id = {market_id} AND ts >= {since_ts}
      UNION ALL
      SELECT market_id, day, seller AS trader, 0 AS leg, quantity, notional FROM trades_fact
      WHERE market_id = {market_id} AND ts >= {since_ts}) AS legs
GROUP BY market_id, day
ORDER BY day
"""

OHLC_FROM_TRADES_SQL = """
SELECT '{grain}' AS grain, ts - ts % {secs} AS bucket_ts, argMin(price, block_number * 1000000 + log_index) AS open,
       max(price) AS high, min(price) AS low, argMax(price, block_number * 1000000 + log_index) AS close,
       sum(quantity) AS volume, count(*) AS trades
FROM trades_fact WHERE market_id = {market_id} AND ts >= {since_ts}
GROUP BY ts - ts % {secs}
"""


def market_daily(sink: AnalyticsSink, market_id: int, since_ts: int = 0) -> pl.DataFrame:
    """Per-day trades, base volume, notional and distinct traders (buyers or sellers) of one market (from the
    day-aligned epoch second `since_ts` on: an incremental load)."""
    return sink.query(MARKET_DAILY_SQL.format(market_id=_int(market_id), since_ts=_int(since_ts)))


def ohlc_from_trades(sink: AnalyticsSink, market_id: int, since_ts: int = 0) -> pl.DataFrame:
    """OHLCV recomputed by the engine from the fact table (windows from the day-aligned `since_ts` on): the asset
    check compares candles against it."""
    parts = [sink.query(OHLC_FROM_TRADES_SQL.format(grain=name, secs=secs, market_id=_int(market_id),
                                                    since_ts=_int(since_ts)))
             for name, secs in INTERVALS.items()]
    parts = [p for p in parts if p.height]
    return pl.concat(parts) if parts else pl.DataFrame()
