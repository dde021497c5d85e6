"""Crash and resume: `orderbook ingest` SIGKILLed at each crash point of a range leaves Postgres self-consistent
(a checkpoint means the range is complete in every table, and nothing of an uncommitted range is visible), and
resuming from the frontier, as an operator would, ends exactly where an uninterrupted run ends.

The regression: a kill after a range's events committed but before its projections ran left a checkpoint that
claimed the range; resuming from the frontier skipped it, and orders and trades stayed short for good.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass

import pytest
from sqlalchemy import text

from orderbook_pipelines.chain.rpc import ChainClient
from orderbook_pipelines.config import PROJECT_ROOT
from orderbook_pipelines.ingestion.backfill import run_ranges
from orderbook_pipelines.ingestion.ranges import ranges_up_to
from orderbook_pipelines.ingestion.reader import EventReader
from orderbook_pipelines.storage.checkpoints import all_ranges, frontier
from orderbook_pipelines.storage.db import drop_database, engine_for
from tests.conftest import DevChain, cli_argv, new_database

Dump = dict[str, list[tuple]]

# What ingestion writes, without the columns that record when or by which run a row was written.
TABLES = {
    "markets": "SELECT market_id, chain_id, metric_id, metric_hash, address, source, decimals, status, "
               "discovered_block FROM markets ORDER BY 1",
    "blocks": "SELECT chain_id, number, hash, parent_hash, block_time FROM blocks ORDER BY 1, 2",
    "order_events": "SELECT chain_id, block_number, block_hash, block_time, tx_hash, tx_index, log_index, contract, "
                    "market_id, source, event_name, kind, order_id, trader, counterparty, side, order_type, price, "
                    "quantity, buy_order_id, sell_order_id, buyer, seller, args::text FROM order_events "
                    "ORDER BY 1, 2, 7",
    "rejected_logs": "SELECT chain_id, block_number, log_index, block_hash, tx_hash, address, topics, data, reason "
                     "FROM rejected_logs ORDER BY 1, 2, 3",
    "orders": "SELECT * FROM orders ORDER BY market_id, chain_id, contract, order_id",
    "trades": "SELECT * FROM trades ORDER BY market_id, chain_id, block_number, log_index",
    "positions": "SELECT market_id, trader, net_quantity, bought, sold, buy_notional, sell_notional, trade_count, "
                 "last_block FROM positions ORDER BY 1, 2",
    "ingestion_checkpoints": "SELECT chain_id, range_start, range_end, processed_to, last_hash, events, rejected "
                             "FROM ingestion_checkpoints ORDER BY 1, 2",
}
APP = "obp-crash-resume"  # application_name of the CLI's connections: we wait for a killed run's backends to end


@dataclass(frozen=True)
class Reference:
    """One uninterrupted `ingest --from start --to end`, and what it had stored after each of its ranges."""

    start: int
    end: int
    ranges: list[tuple[int, int]]
    final: Dump
    after: dict[int, Dump]  # k -> the clean state once the first k ranges committed (k >= 1)


def _dump(db: str) -> Dump:
    with engine_for(db).connect() as conn:
        return {name: [tuple(r) for r in conn.execute(text(sql))] for name, sql in TABLES.items()}


def _ingest_in_process(chain: DevChain, db: str, ranges: list[tuple[int, int]], upto: int) -> Iterator[None]:
    """The CLI's path (run_ranges, one worker), yielding after each range has committed."""
    with engine_for(db).begin() as conn:
        EventReader.load(conn, chain.config)  # the registry sync every run does first, even with no range
    for out in run_ranges(chain.config, db, ranges, 1, upto=upto):
        assert out.report is not None and out.report.complete, f"range {out.start}-{out.end} is not final"
        yield


def _final_ranges(chain: DevChain) -> list[tuple[int, int]]:
    c = chain.config.chain
    safe = ChainClient.from_config(c).safe_head(c.finality, c.confirmations)
    return [r for r in ranges_up_to(c.start_block, c.range_size, safe) if r[1] <= safe]


@pytest.fixture(scope="module")
def clean(simulated_chain: DevChain) -> Iterator[Reference]:
    ranges = _final_ranges(simulated_chain)
    assert len(ranges) >= 4, f"the simulated chain should span several block ranges, not {ranges}"
    start, end = ranges[0][0], ranges[-1][1]
    db = new_database()
    try:
        after: dict[int, Dump] = {}
        for k, _ in enumerate(_ingest_in_process(simulated_chain, db, ranges, end), start=1):
            after[k] = _dump(db)
        final = after[len(ranges)]
        assert len(final["order_events"]) > 10000 and len(final["orders"]) > 3000 and final["trades"]
        middle = ranges[len(ranges) // 2]
        assert any(middle[0] <= r[1] <= middle[1] for r in final["order_events"]), "the middle range has no events"
        yield Reference(start, end, ranges, final, after)
    finally:
        drop_database(db)


def _ingest(chain: DevChain, db: str, start: int, end: int, workers: int = 1,
            crash_at: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k != "OBP_CRASH_AT"}
    env.update(DATABASE_URL=db, OBP_CONFIG=str(chain.config_path), PGAPPNAME=APP)
    if crash_at is not None:
        env["OBP_CRASH_AT"] = crash_at
    args = ["ingest", "--from", str(start), "--to", str(end), "--workers", str(workers)]
    proc = subprocess.run(cli_argv(*args), env=env, cwd=PROJECT_ROOT, capture_output=True, text=True, timeout=600)
    _wait_backends_gone(db)
    return proc


def _wait_backends_gone(db: str) -> None:
    """A killed client's backend rolls back and ends once it notices the closed socket: wait for that, so the
    state we read is what Postgres kept, not a transaction about to be aborted."""
    deadline = time.monotonic() + 60
    with engine_for(db).connect() as conn:
        while conn.execute(text("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                                "AND application_name = :a"), {"a": APP}).scalar():
            conn.rollback()
            assert time.monotonic() < deadline, "the ingest run's database sessions did not end"
            time.sleep(0.05)


def _frontier(chain: DevChain, db: str) -> int | None:
    with engine_for(db).connect() as conn:
        return frontier(conn, chain.config.chain.chain_id, chain.config.chain.start_block)


def _checkpointed(db: str) -> list[tuple[int, int, int]]:
    with engine_for(db).connect() as conn:
        return [(c.range_start, c.range_end, c.processed_to) for c in all_ranges(conn)]


def _assert_same(got: Dump, want: Dump, what: str) -> None:
    for name, rows in want.items():
        if got[name] == rows:
            continue
        have, need = Counter(map(repr, got[name])), Counter(map(repr, rows))
        missing, extra = need - have, have - need
        pytest.fail(f"{what}: {name} differs ({missing.total()} rows missing, {extra.total()} extra"
                    f"{', same rows in another order' if not missing and not extra else ''}); "
                    f"first missing: {min(missing, default=None)}; first extra: {min(extra, default=None)}")


def _reference_holding(chain: DevChain, clean: Reference, done: list[tuple[int, int]]) -> Dump:
    """The clean state of a database holding exactly the ranges `done`: a prefix was recorded by the clean run;
    any other set (parallel workers commit out of order) is ingested into a fresh database, which is the same
    thing because the projections converge whatever order ranges arrive in."""
    k = len(done)
    if k and done == clean.ranges[:k]:
        return clean.after[k]
    db = new_database()
    try:
        for _ in _ingest_in_process(chain, db, done, clean.end):
            pass
        return _dump(db)
    finally:
        drop_database(db)


def _assert_consistent(chain: DevChain, clean: Reference, db: str) -> list[tuple[int, int]]:
    """What a crashed run left: every checkpointed range complete in every table, nothing of the others.
    Returns the checkpointed ranges."""
    stored = _checkpointed(db)
    for rs, re_, processed in stored:
        assert (rs, re_) in clean.ranges and processed == re_, f"checkpoint {rs}-{re_} (to {processed}): not whole"
    done = [(rs, re_) for rs, re_, _ in stored]
    got = _dump(db)
    for rs, re_ in clean.ranges:
        if (rs, re_) in done:
            continue
        for table, col in (("order_events", 1), ("trades", 2)):
            visible = [r for r in got[table] if rs <= r[col] <= re_]
            assert not visible, f"{len(visible)} {table} rows of uncommitted range {rs}-{re_} are visible"
    _assert_same(got, _reference_holding(chain, clean, done), f"after the crash, holding ranges {done}")
    return done


def _resume(chain: DevChain, clean: Reference, db: str) -> None:
    """What an operator does: read the frontier, ingest from the block after it to the end, compare."""
    f = _frontier(chain, db)
    proc = _ingest(chain, db, clean.start if f is None else f + 1, clean.end)
    assert proc.returncode == 0, proc.stderr
    assert _frontier(chain, db) == clean.end
    _assert_same(_dump(db), clean.final, "after resuming from the frontier")


_REACH_FIVE_TIMES = ("from orderbook_pipelines import faults\n"
                     "for i in range(1, 6):\n"
                     "    faults.crash_point('here')\n"
                     "    print(i, flush=True)\n")


@pytest.mark.parametrize(("spec", "printed", "returncode"), [
    (None, "1 2 3 4 5", 0),
    ("here", "", -9),  # a plain name: the first time
    ("here@3", "1 2", -9),  # the third time, not before
    ("here@6", "1 2 3 4 5", 0),  # never reached that often
    ("elsewhere@1", "1 2 3 4 5", 0),  # another point
])
def test_crash_point_kills_at_the_named_occurrence(spec: str | None, printed: str, returncode: int) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OBP_CRASH_AT"} | ({"OBP_CRASH_AT": spec} if spec else {})
    proc = subprocess.run([sys.executable, "-c", _REACH_FIVE_TIMES], env=env, cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert (proc.stdout.split(), proc.returncode) == (printed.split(), returncode), proc.stderr


@pytest.mark.parametrize("spec", ["here@", "here@0", "here@x", "here@-1"])
def test_a_malformed_occurrence_fails_loudly_instead_of_never_crashing(spec: str) -> None:
    env = {**os.environ, "OBP_CRASH_AT": spec}
    proc = subprocess.run([sys.executable, "-c", _REACH_FIVE_TIMES], env=env, cwd=PROJECT_ROOT, capture_output=True,
                          text=True, timeout=60)
    assert proc.returncode == 1 and proc.stdout == "" and "OBP_CRASH_AT" in proc.stderr, proc.stderr


CASES = {  # crash point, workers
    "fetched": ("fetched", 1),
    "events_written": ("events_written", 1),
    "projected": ("projected", 1),
    "committed": ("committed", 1),
    "projected-2-workers": ("projected", 2),
}


@pytest.mark.parametrize("case", list(CASES))
def test_sigkill_at_a_crash_point_then_resume_from_the_frontier_matches_a_clean_run(
        simulated_chain: DevChain, clean: Reference, case: str) -> None:
    point, workers = CASES[case]
    middle = len(clean.ranges) // 2  # 0-based index of the range the single-process run dies in
    # one process reaches each point once per range, in range order; with 2 workers one of them reaches it a
    # second time whatever the order (there are more than 2 ranges), so one of them always dies mid-run
    nth = middle + 1 if workers == 1 else 2
    db = new_database()
    try:
        crashed = _ingest(simulated_chain, db, clean.start, clean.end, workers, crash_at=f"{point}@{nth}")
        if workers == 1:
            assert crashed.returncode == -9, f"expected a SIGKILL at {point}@{nth}: {crashed.stderr}"
        else:  # the parent ingests too: it was killed (-9), or it survived a killed worker and must not succeed
            assert crashed.returncode == -9 or crashed.returncode > 0, \
                f"a run one of whose processes was killed exited {crashed.returncode}"

        done = _assert_consistent(simulated_chain, clean, db)
        f = _frontier(simulated_chain, db)
        if workers == 1:
            committed = middle + 1 if point == "committed" else middle
            assert done == clean.ranges[:committed]
            assert f == clean.ranges[committed - 1][1]
        else:
            assert len(done) < len(clean.ranges) and (f is None or f < clean.end)

        _resume(simulated_chain, clean, db)
    finally:
        drop_database(db)


def test_to_is_an_upper_bound_then_the_rest_resumes_to_a_clean_run(simulated_chain: DevChain,
                                                                   clean: Reference) -> None:
    rs, re_ = clean.ranges[len(clean.ranges) // 2]
    events = clean.final["order_events"]
    to = next(b for b in range(rs + 1, re_) if any(rs <= r[1] <= b for r in events)
              and any(b < r[1] <= re_ for r in events))  # events on both sides of the bound
    db = new_database()
    try:
        proc = _ingest(simulated_chain, db, clean.start, to)
        assert proc.returncode == 0, proc.stderr
        got = _dump(db)
        assert max(r[1] for r in got["order_events"]) <= to
        assert max(r[1] for r in got["blocks"]) <= to
        assert max(r[2] for r in got["trades"]) <= to
        assert max(r[15] for r in got["orders"]) <= to  # updated_block
        assert max(r[8] for r in got["positions"]) <= to  # last_block
        assert got["ingestion_checkpoints"][-1][:4] == (simulated_chain.config.chain.chain_id, rs, re_, to)
        assert all(r[1] <= rs for r in got["ingestion_checkpoints"])
        assert _frontier(simulated_chain, db) == to
        for table, col in (("order_events", 1), ("trades", 2)):  # everything up to the bound is there
            assert got[table] == [r for r in clean.final[table] if r[col] <= to], table

        _resume(simulated_chain, clean, db)
    finally:
        drop_database(db)
