"""Canary rollout: a market's status decides whether it is published, and every change is recorded.

A `canary` market is indexed and checked like any other but published only once its checks passed for
`canary_ranges_required` consecutive block ranges (counted since it last became a canary). `paused` is never
published. The rule lives in the SQL view `publishable_markets`, so the API, the live service and operators
all read the same answer.
"""

from __future__ import annotations

import getpass
import os
from dataclasses import dataclass

from sqlalchemy import Connection, text

from orderbook_pipelines.config import ProjectConfig

STATUSES = ("canary", "active", "paused")


class StatusChangeError(ValueError):
    """The requested transition is not allowed (unknown market, unnamed market, or already in that state)."""


@dataclass(frozen=True)
class StatusChange:
    market_id: int
    metric_id: str
    from_status: str
    to_status: str


def operator() -> str:
    """Who is making a change: OBP_OPERATOR if set, else the OS user."""
    try:
        return os.environ.get("OBP_OPERATOR") or getpass.getuser()
    except (KeyError, OSError):
        return "unknown"


def sync_policy(conn: Connection, config: ProjectConfig) -> None:
    """Copy the configured threshold into the database, where the view applies it."""
    conn.execute(
        text("""INSERT INTO canary_policy (singleton, ranges_required) VALUES (true, :n)
                ON CONFLICT (singleton) DO UPDATE SET ranges_required = EXCLUDED.ranges_required, updated_at = now()
                WHERE canary_policy.ranges_required <> EXCLUDED.ranges_required"""),
        {"n": config.canary_ranges_required},
    )


def publishable_market_ids(conn: Connection) -> set[int]:
    """Active markets plus canaries that qualified; never paused or unregistered ones."""
    return {r[0] for r in conn.execute(text("SELECT market_id FROM publishable_markets"))}


def set_status(conn: Connection, chain_id: int, metric_id: str, to_status: str, reason: str | None,
               changed_by: str | None = None, allowed_from: tuple[str, ...] = STATUSES) -> StatusChange:
    """Change one market's status and record who/when/from/to/why, in the caller's transaction."""
    if to_status not in STATUSES:
        raise StatusChangeError(f"unknown status {to_status!r}; allowed: {list(STATUSES)}")
    row = conn.execute(
        text("SELECT market_id, status FROM markets WHERE chain_id = :c AND metric_id = :m FOR UPDATE"),
        {"c": chain_id, "m": metric_id},
    ).first()
    if row is None:
        raise StatusChangeError(f"no market {metric_id} on chain {chain_id} (see `orderbook markets list`)")
    if row.status == to_status:
        raise StatusChangeError(f"market {metric_id} is already {to_status}")
    if row.status not in allowed_from:
        raise StatusChangeError(f"market {metric_id} is {row.status}; this command applies to {list(allowed_from)}")
    conn.execute(text("UPDATE markets SET status = :s, updated_at = now() WHERE market_id = :id"),
                 {"s": to_status, "id": row.market_id})
    conn.execute(
        text("""INSERT INTO market_status_history (market_id, from_status, to_status, reason, changed_by)
                VALUES (:id, :f, :t, :r, :by)"""),
        {"id": row.market_id, "f": row.status, "t": to_status, "r": reason, "by": changed_by or operator()},
    )
    return StatusChange(row.market_id, metric_id, row.status, to_status)


def status_before_pause(conn: Connection, market_id: int) -> str:
    """The status a paused market had before its latest pause (resume restores it); canary if unknown."""
    prev = conn.execute(
        text("""SELECT from_status FROM market_status_history WHERE market_id = :id AND to_status = 'paused'
                ORDER BY changed_at DESC, id DESC LIMIT 1"""),
        {"id": market_id},
    ).scalar()
    return prev if prev in ("canary", "active") else "canary"


def record_checks(conn: Connection, rows: list[dict]) -> int:
    """Upsert per-market check outcomes (keys: market_id, chain_id, range_start, range_end, block_number,
    check_name, passed, details (JSON text), run_id)."""
    if not rows:
        return 0
    conn.execute(
        text("""INSERT INTO market_checks (market_id, chain_id, range_start, range_end, block_number, check_name,
                                           passed, details, run_id)
                VALUES (:market_id, :chain_id, :range_start, :range_end, :block_number, :check_name, :passed,
                        CAST(:details AS jsonb), :run_id)
                ON CONFLICT (market_id, range_start, check_name) DO UPDATE SET
                    range_end = EXCLUDED.range_end, block_number = EXCLUDED.block_number, passed = EXCLUDED.passed,
                    details = EXCLUDED.details, run_id = EXCLUDED.run_id, checked_at = now()"""),
        rows,
    )
    return len(rows)


def canary_progress(conn: Connection, chain_id: int) -> list[dict]:
    """Each canary market with its consecutive passed ranges and the threshold, for operators."""
    return [dict(r._mapping) for r in conn.execute(
        text("""SELECT m.metric_id, p.consecutive_passed, p.ranges_required,
                       p.consecutive_passed >= p.ranges_required AS publishable
                FROM canary_progress p JOIN markets m USING (market_id) WHERE m.chain_id = :c
                ORDER BY m.metric_id"""),
        {"c": chain_id},
    )]
