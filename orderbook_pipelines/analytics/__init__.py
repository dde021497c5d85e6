"""Analytics tier: facts and aggregates per market in DuckDB (embedded default) or ClickHouse.

Postgres stays the truth; everything here is derived, rebuilt per market partition, and safe to drop.
"""
