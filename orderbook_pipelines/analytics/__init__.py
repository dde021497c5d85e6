"""Analytics tier: facts and aggregates per market in DuckDB (embedded default) or ClickHouse.

Postgres stays the truth; everything here is derived, loaded incrementally per market partition
(incremental.py; a full rebuild on request), and safe to drop.
"""
