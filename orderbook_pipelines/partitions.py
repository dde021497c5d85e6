"""Dagster partitions: block ranges for ingestion and snapshots, markets for analytics.

Block-range keys are ingestion.ranges.range_key (zero-padded, so the UI sorts them in chain order). One
partition holds every market of its range: markets x ranges would explode Dagster's partition count.
"""

from __future__ import annotations

import dagster as dg

BLOCK_RANGES = "block_ranges"
MARKETS = "markets"

block_ranges = dg.DynamicPartitionsDefinition(name=BLOCK_RANGES)

# Analytics partitions, one per market, keyed by the market's public name (the metric id), added by
# sensors/analytics.py as markets are registered. Numeric keys left by older instances (internal market ids)
# still resolve to their market: see docs/analytics.md.
markets = dg.DynamicPartitionsDefinition(name=MARKETS)
