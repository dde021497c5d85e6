"""Market registry in Postgres: configured markets are upserted, unknown metric hashes are discovered.

A gen-1 event names its market only by keccak(metricId); a hash we do not know yet becomes an `unregistered`
market row instead of a lost event, and `orderbook markets register` names it later with no code change.
"""

from __future__ import annotations

from sqlalchemy import Connection, text

from orderbook_pipelines.chain.normalize import MarketRegistry
from orderbook_pipelines.config import Market, ProjectConfig


def sync_configured_markets(conn: Connection, config: ProjectConfig) -> int:
    """Upsert the markets named in configuration; returns how many rows changed.

    One read of the registry and only the writes that differ, so thousands of configured markets cost
    milliseconds per run; an advisory lock serializes concurrent runs (two ranges starting at once).
    """
    if not config.markets:
        return 0
    cid = config.chain.chain_id
    conn.execute(text("SELECT pg_advisory_xact_lock(727002)"))
    rows = conn.execute(text("SELECT market_id, metric_id, metric_hash, address, source, decimals, status "
                             "FROM markets WHERE chain_id = :c"), {"c": cid}).all()
    by_hash = {r.metric_hash: r for r in rows if r.metric_hash}
    by_addr = {r.address: r for r in rows if r.address}
    inserts, updates = [], []
    for m in config.markets:
        address = m.address.lower() if m.address else None
        row = by_hash.get(m.metric_hash) or (by_addr.get(address) if address else None)
        params = {"c": cid, "id": m.metric_id, "h": m.metric_hash, "a": address, "s": m.source, "d": m.decimals,
                  "st": m.status}
        if row is None:
            inserts.append(params)
        elif (row.metric_id, row.address, row.source, row.decimals) != (m.metric_id, address or row.address,
                                                                         m.source, m.decimals) \
                or row.status == "unregistered":
            updates.append({**params, "mid": row.market_id})
    if inserts:
        conn.execute(text("""INSERT INTO markets (chain_id, metric_id, metric_hash, address, source, decimals, status)
                             VALUES (:c, :id, :h, :a, :s, :d, :st)"""), inserts)
    if updates:
        conn.execute(_UPDATE_MARKET, updates)
    return len(inserts) + len(updates)


_UPDATE_MARKET = text("""
    UPDATE markets SET metric_id = :id, metric_hash = :h, address = COALESCE(:a, address), source = :s,
           decimals = :d, status = CASE WHEN status = 'unregistered' THEN :st ELSE status END, updated_at = now()
    WHERE market_id = :mid""")


def upsert_market(conn: Connection, chain_id: int, m: Market) -> int:
    """One market (the `markets register` command): adopts a discovered row with the same hash or address."""
    address = m.address.lower() if m.address else None
    row = conn.execute(
        text("""
            SELECT market_id FROM markets
            WHERE chain_id = :c AND (metric_hash = :h OR (CAST(:a AS text) IS NOT NULL AND address = :a))
            ORDER BY market_id LIMIT 1
        """),
        {"c": chain_id, "h": m.metric_hash, "a": address},
    ).first()
    params = {"c": chain_id, "id": m.metric_id, "h": m.metric_hash, "a": address, "s": m.source,
              "d": m.decimals, "st": m.status}
    if row is None:
        conn.execute(
            text("""INSERT INTO markets (chain_id, metric_id, metric_hash, address, source, decimals, status)
                    VALUES (:c, :id, :h, :a, :s, :d, :st)"""),
            params,
        )
        return 1
    return conn.execute(_UPDATE_MARKET, {**params, "mid": row.market_id}).rowcount


def discover_metric_hashes(conn: Connection, chain_id: int, hashes: set[str], source: str,
                           block: int | None) -> int:
    """Register unknown metric hashes as `unregistered` markets; returns how many were new."""
    if not hashes:
        return 0
    res = conn.execute(
        text("""INSERT INTO markets (chain_id, metric_hash, source, status, discovered_block)
                SELECT :c, h, :s, 'unregistered', :b FROM unnest(CAST(:hs AS text[])) AS h
                ON CONFLICT (chain_id, metric_hash) DO NOTHING"""),
        {"c": chain_id, "hs": sorted(hashes), "s": source, "b": block},
    )
    return res.rowcount


def load_registry(conn: Connection, chain_id: int) -> MarketRegistry:
    rows = conn.execute(
        text("SELECT market_id, address, metric_hash FROM markets WHERE chain_id = :c"), {"c": chain_id}
    ).all()
    return MarketRegistry(
        by_address={r.address: r.market_id for r in rows if r.address},
        by_metric_hash={r.metric_hash: r.market_id for r in rows if r.metric_hash},
    )


def market_addresses(conn: Connection, chain_id: int) -> dict[str, str]:
    """Contract address -> source name, for every registered market that has an address."""
    rows = conn.execute(
        text("SELECT address, source FROM markets WHERE chain_id = :c AND address IS NOT NULL"), {"c": chain_id}
    ).all()
    return {r.address: r.source for r in rows}


# A market's public name: its metric id, else (while unregistered) its metric hash or contract address, else its id.
# Names key replay hashes, snapshots, channels and Dagster partitions, so they never depend on identity values.
MARKET_NAME_SQL = "COALESCE(m.metric_id, m.metric_hash, m.address, m.market_id::text)"


def market_names(conn: Connection, chain_id: int | None = None, market_ids: list[int] | None = None) -> dict[int, str]:
    """market_id -> public name (MARKET_NAME_SQL), for one chain (or all) and some markets (or all)."""
    rows = conn.execute(
        text(f"SELECT market_id, {MARKET_NAME_SQL} AS name FROM markets m "
             "WHERE (CAST(:c AS bigint) IS NULL OR chain_id = :c) "
             "AND (CAST(:ids AS integer[]) IS NULL OR market_id = ANY(CAST(:ids AS integer[]))) ORDER BY market_id"),
        {"c": chain_id, "ids": market_ids},
    )
    return {int(r.market_id): str(r.name) for r in rows}


def resolve_market(conn: Connection, market: str) -> tuple[int, str]:
    """A market given as id or metric id/hash/address -> (market_id, stable name)."""
    row = conn.execute(
        text(f"SELECT market_id, {MARKET_NAME_SQL} AS name FROM markets m "
             "WHERE m.market_id::text = :m OR m.metric_id = :m OR m.metric_hash = lower(:m) OR m.address = lower(:m) "
             "ORDER BY COALESCE(m.metric_id = :m, false) DESC, market_id LIMIT 1"),  # a name beats an id
        {"m": market},
    ).first()
    if row is None:
        raise LookupError(f"no market {market!r} (see `orderbook markets list`)")
    return int(row.market_id), str(row.name)


def market_statuses(conn: Connection, chain_id: int) -> dict[int, str]:
    rows = conn.execute(text("SELECT market_id, status FROM markets WHERE chain_id = :c"), {"c": chain_id}).all()
    return {r.market_id: r.status for r in rows}
