"""Polars transformations: Postgres trades -> fact rows, trades -> candles with VWAP/TWAP, book levels -> liquidity.

Extraction reads one market at a time (the Dagster partition grain). Scaling raw integers to human units is done
by Postgres' exact NUMERIC arithmetic; floats only appear in derived analytics columns (notional, VWAP, TWAP,
liquidity), never in the raw or OHLC columns.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime

import polars as pl
from sqlalchemy import Connection, text

from orderbook_pipelines.analytics.sink import CANDLES, LIQUIDITY, TRADES
from orderbook_pipelines.book.model import BUY, SELL
from orderbook_pipelines.book.replay import MarketReplay
from orderbook_pipelines.storage.events import stored_events
from orderbook_pipelines.storage.registry import MARKET_NAME_SQL

INTERVALS: dict[str, int] = {"1m": 60, "5m": 300, "1h": 3600, "1d": 86400}
DEPTH_BANDS: tuple[tuple[str, float], ...] = (("0_5", 0.5), ("1", 1.0), ("2", 2.0))


@dataclass(frozen=True)
class MarketRow:
    market_id: int
    metric_id: str | None
    decimals: int
    status: str
    label: str  # the public name (storage.registry.MARKET_NAME_SQL)


def market(conn: Connection, market_id: int) -> MarketRow:
    r = conn.execute(text(f"SELECT market_id, metric_id, decimals, status, {MARKET_NAME_SQL} AS name "
                          "FROM markets m WHERE market_id = :m"), {"m": market_id}).one_or_none()
    if r is None:
        raise LookupError(f"market {market_id} is not in the markets table (partition key of a deleted market?)")
    return MarketRow(r.market_id, r.metric_id, r.decimals, r.status, r.name)


_TRADES_SQL = f"""
SELECT t.market_id, {MARKET_NAME_SQL} AS metric_id, t.chain_id, t.block_number,
       t.log_index, t.block_time, t.tx_hash, m.decimals, t.price::text AS price_raw, t.quantity::text AS quantity_raw,
       (t.price / power(10::numeric, m.decimals))::numeric(38,18) AS price,
       (t.quantity / power(10::numeric, m.decimals))::numeric(38,18) AS quantity,
       t.buyer, t.seller
FROM trades t JOIN markets m USING (market_id)
WHERE t.market_id = :m AND t.block_number BETWEEN :lo AND :hi
ORDER BY t.block_number, t.log_index
"""


def extract_trades(conn: Connection, market_id: int, from_block: int = 0, to_block: int = 2**62) -> pl.DataFrame:
    """One market's trades in blocks [from_block, to_block] in chain order, with exact human-unit price/quantity
    computed by Postgres."""
    res = conn.execute(text(_TRADES_SQL), {"m": market_id, "lo": from_block, "hi": to_block})
    names = list(res.keys())
    rows = [tuple(r) for r in res]
    schema: dict[str, pl.DataType | type[pl.DataType]] = {
        "market_id": pl.Int32, "metric_id": pl.String, "chain_id": pl.Int64, "block_number": pl.Int64,
        "log_index": pl.Int32, "block_time": pl.Datetime("us", "UTC"), "tx_hash": pl.String, "decimals": pl.Int32,
        "price_raw": pl.String, "quantity_raw": pl.String, "price": pl.Decimal(38, 18),
        "quantity": pl.Decimal(38, 18), "buyer": pl.String, "seller": pl.String,
    }
    assert names == list(schema), names
    df = pl.DataFrame(rows, schema=schema, orient="row")
    return trades_fact(df)


def trades_fact(df: pl.DataFrame) -> pl.DataFrame:
    """Adds the time keys (UTC naive timestamp, epoch seconds, day) and the float notional."""
    df = df.with_columns(pl.col("block_time").dt.convert_time_zone("UTC").dt.replace_time_zone(None))
    return df.with_columns(
        ts=pl.col("block_time").dt.epoch("s"),
        day=pl.col("block_time").dt.date(),
        notional=pl.col("price").cast(pl.Float64) * pl.col("quantity").cast(pl.Float64),
    ).select(TRADES.names)


def candles(trades: pl.DataFrame, intervals: dict[str, int] = INTERVALS) -> pl.DataFrame:
    """OHLCV, VWAP and TWAP per window for one market's trades (buckets aligned to the UTC epoch).

    Open/close are the first/last trade by (block, log index); VWAP = sum(price*qty)/sum(qty).
    TWAP integrates the last-traded price over the window: from the window start (at the previous trade's
    price) or, for the market's first window, from its first trade, up to the window end or the market's
    last trade, whichever is earlier. A window whose integration span is zero takes its close.
    """
    if trades.is_empty():
        return pl.DataFrame(schema=CANDLES.polars_schema())
    t = trades.sort("block_number", "log_index").with_columns(pf=pl.col("price").cast(pl.Float64),
                                                              qf=pl.col("quantity").cast(pl.Float64))
    horizon = int(t["ts"].max())  # type: ignore[arg-type]
    t = t.with_columns(prev_price=pl.col("pf").shift(1), next_ts=pl.col("ts").shift(-1).fill_null(horizon))
    out = []
    for name, secs in intervals.items():
        b = t.with_columns(bucket=pl.col("ts") - pl.col("ts") % secs)
        b = b.with_columns(seg_end=pl.min_horizontal("next_ts", pl.col("bucket") + secs, pl.lit(horizon)))
        g = b.group_by("bucket", maintain_order=True).agg(
            open=pl.col("price").first(), high=pl.col("price").max(), low=pl.col("price").min(),
            close=pl.col("price").last(), volume=pl.col("quantity").sum(),
            notional=(pl.col("pf") * pl.col("qf")).sum(), qf=pl.col("qf").sum(), trades=pl.len(),
            closef=pl.col("pf").last(), first_ts=pl.col("ts").first(), carry=pl.col("prev_price").first(),
            area=(pl.col("pf") * (pl.col("seg_end") - pl.col("ts"))).sum(),
        )
        g = g.with_columns(
            start=pl.when(pl.col("carry").is_null()).then(pl.col("first_ts")).otherwise(pl.col("bucket")),
            end=pl.min_horizontal(pl.col("bucket") + secs, pl.lit(horizon)),
            area=pl.col("area") + pl.col("carry").fill_null(0.0) * (pl.col("first_ts") - pl.col("bucket")),
        )
        g = g.with_columns(
            twap=pl.when(pl.col("end") > pl.col("start"))
            .then(pl.col("area") / (pl.col("end") - pl.col("start"))).otherwise(pl.col("closef")),
            vwap=pl.col("notional") / pl.col("qf"),
            grain=pl.lit(name), ts=pl.col("bucket"),
            bucket_start=pl.from_epoch("bucket", time_unit="s").cast(pl.Datetime("us")),
            market_id=pl.lit(int(t["market_id"][0]), dtype=pl.Int32),
        )
        out.append(g.select(CANDLES.names).cast(CANDLES.polars_schema()))  # type: ignore[arg-type]
    return pl.concat(out)


# ------------------------------------------------------------------------------------------- liquidity --
Levels = list[tuple[float, float]]  # (price, quantity) in human units


def liquidity_metrics(bids: Levels, asks: Levels) -> dict[str, float | int | None]:
    """Spread, depth within +/-0.5/1/2% of mid, imbalance within 1%, resting notional per side.

    Depth is base quantity resting at prices within the band; with one side empty there is no mid, so
    spread, depth and imbalance are null while notionals are still reported.
    """
    best_bid = max((p for p, _ in bids), default=None)
    best_ask = min((p for p, _ in asks), default=None)
    row: dict[str, float | int | None] = {
        "best_bid": best_bid, "best_ask": best_ask, "mid": None, "spread": None, "spread_bps": None,
        "bid_notional": sum(p * q for p, q in bids), "ask_notional": sum(p * q for p, q in asks),
        "bid_levels": len(bids), "ask_levels": len(asks), "imbalance_1": None,
    }
    for band, _ in DEPTH_BANDS:
        row[f"bid_depth_{band}"] = row[f"ask_depth_{band}"] = None
    if best_bid is None or best_ask is None:
        return row
    mid = (best_bid + best_ask) / 2
    row.update(mid=mid, spread=best_ask - best_bid, spread_bps=(best_ask - best_bid) / mid * 1e4)
    for band, pct in DEPTH_BANDS:
        row[f"bid_depth_{band}"] = sum(q for p, q in bids if p >= mid * (1 - pct / 100))
        row[f"ask_depth_{band}"] = sum(q for p, q in asks if p <= mid * (1 + pct / 100))
    bd, ad = row["bid_depth_1"], row["ask_depth_1"]
    assert isinstance(bd, float | int) and isinstance(ad, float | int)
    row["imbalance_1"] = (bd - ad) / (bd + ad) if bd + ad else 0.0
    return row


@dataclass(frozen=True)
class Snapshot:
    block_number: int
    block_time: datetime
    bids: Levels
    asks: Levels


def _has_table(conn: Connection, name: str) -> bool:
    return conn.execute(text("SELECT to_regclass(:n) IS NOT NULL"), {"n": name}).scalar_one()


def snapshots_from_depth_table(conn: Connection, market_id: int, decimals: int) -> list[Snapshot]:
    """Rows of `depth_snapshots` (the recovery tier's per-range book state), if that table exists."""
    if not _has_table(conn, "depth_snapshots"):
        return []
    scale = 10**decimals
    out = []
    for r in conn.execute(text("SELECT block_number, block_time, levels FROM depth_snapshots WHERE market_id = :m "
                               "ORDER BY block_number"), {"m": market_id}):
        lv = r.levels if isinstance(r.levels, dict) else json.loads(r.levels)
        out.append(Snapshot(r.block_number, r.block_time,
                            [(int(p) / scale, int(q) / scale) for p, q, *_ in lv.get("bids", [])],
                            [(int(p) / scale, int(q) / scale) for p, q, *_ in lv.get("asks", [])]))
    return out


def snapshots_from_replay(conn: Connection, market_id: int, decimals: int, every_blocks: int) -> Iterator[Snapshot]:
    """Replays the market's stored event stream (storage.events) through the shared book model and samples the
    book at the last event block of every `every_blocks`-block window (and at the final block)."""
    scale = 10**decimals
    times: dict[int, datetime] = dict(conn.execute(
        text("SELECT DISTINCT block_number, block_time FROM order_events WHERE market_id = :m"),
        {"m": market_id}).all())
    mr = MarketReplay()
    cur: int | None = None

    def snap(block: int) -> Snapshot:
        book = mr.book
        return Snapshot(block, times[block],
                        [(lv.price / scale, lv.quantity / scale) for lv in book.levels(BUY, 1 << 30)],
                        [(lv.price / scale, lv.quantity / scale) for lv in book.levels(SELL, 1 << 30)])

    for ev in stored_events(conn, market_ids=[market_id]):
        if cur is not None and ev.block_number != cur:
            mr.end_block(cur)
            if ev.block_number // every_blocks != cur // every_blocks:
                yield snap(cur)
        cur = ev.block_number
        mr.apply(ev)
    if cur is not None:
        mr.end_block(cur)
        yield snap(cur)


def liquidity(market_id: int, snapshots: Iterable[Snapshot], source: str) -> pl.DataFrame:
    rows = []
    for s in snapshots:
        t = s.block_time.astimezone(UTC).replace(tzinfo=None) if s.block_time.tzinfo else s.block_time
        rows.append({"market_id": market_id, "snapshot_time": t, "ts": int(s.block_time.timestamp()),
                     "block_number": s.block_number, "source": source,
                     **liquidity_metrics(s.bids, s.asks)})
    if not rows:
        return pl.DataFrame(schema=LIQUIDITY.polars_schema())
    return pl.DataFrame(rows).select(LIQUIDITY.names).cast(LIQUIDITY.polars_schema())  # type: ignore[arg-type]
