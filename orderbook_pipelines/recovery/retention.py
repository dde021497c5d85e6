"""Snapshot retention: the newest `keep_last` snapshots of a market and, older, the last of each UTC day."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from sqlalchemy import Engine, text


@dataclass(frozen=True)
class RetentionPolicy:
    """Keep the newest `keep_last` snapshots of a market, and of the older ones the last of each UTC day."""

    keep_last: int = 24
    keep_daily: bool = True



def expired(snapshots: list[tuple[int, datetime]], policy: RetentionPolicy) -> list[int]:
    """Blocks (of one market) the policy drops: all but the newest `keep_last` and, if `keep_daily`, the newest
    snapshot of each UTC day among the older ones."""
    ordered = sorted(snapshots, key=lambda s: s[0], reverse=True)
    # a day already represented by a recent snapshot needs no other
    days = {when.astimezone(UTC).date() for _b, when in ordered[: policy.keep_last]}
    out = []
    for block, when in ordered[policy.keep_last:]:
        day = when.astimezone(UTC).date()
        if policy.keep_daily and day not in days:
            days.add(day)
            continue
        out.append(block)
    return sorted(out)


def apply_retention(engine: Engine, root: Path, policy: RetentionPolicy,
                    market_ids: list[int] | None = None) -> int:
    """Delete expired snapshots (rows, their orders, their objects); returns how many were deleted."""
    with engine.begin() as conn:
        rows = conn.execute(
            text("SELECT market_id, block_number, block_time, parquet_key FROM depth_snapshots "
                 "WHERE CAST(:ids AS integer[]) IS NULL OR market_id = ANY(CAST(:ids AS integer[]))"),
            {"ids": market_ids},
        ).all()
        per: dict[int, list[tuple[int, datetime]]] = defaultdict(list)
        keys = {}
        for r in rows:
            per[r.market_id].append((r.block_number, r.block_time))
            keys[(r.market_id, r.block_number)] = r.parquet_key
        doomed = [(m, b) for m, lst in per.items() for b in expired(lst, policy)]
        for m, b in doomed:
            conn.execute(text("DELETE FROM depth_snapshots WHERE market_id = :m AND block_number = :b"),
                         {"m": m, "b": b})
    for m, b in doomed:  # after the commit: a missing object is harmless, a dangling row would not be
        if keys[(m, b)]:
            (root / keys[(m, b)]).unlink(missing_ok=True)
    return len(doomed)
