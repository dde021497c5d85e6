"""Many block ranges at once, outside Dagster: this process and N - 1 worker processes, each running the assets'
own path.

Ingestion is CPU-bound Python (JSON, ABI decoding) while the node and Postgres work in other processes, so a
second worker process overlaps one range's decoding with another's COPY and projections; threads would share
one GIL. Ranges are independent (the writes converge in any order, projections serialize on their advisory
lock), which is also how a Dagster backfill with `max_concurrent_runs` > 1 runs them.
"""

from __future__ import annotations

import gc
import logging
import multiprocessing as mp
import multiprocessing.connection as mp_connection
import os
import signal
import sys
import threading
import time
from collections import deque
from collections.abc import Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from dataclasses import dataclass

from sqlalchemy import Engine

from orderbook_pipelines import obs
from orderbook_pipelines.chain.rpc import ChainClient
from orderbook_pipelines.config import ProjectConfig
from orderbook_pipelines.ingestion.ingest import RangeReport, ingest_range
from orderbook_pipelines.ingestion.ranges import RangeNotFinal
from orderbook_pipelines.storage.db import engine_for


@dataclass(frozen=True)
class RangeOutcome:
    start: int
    end: int
    report: RangeReport | None  # None when the range was not final yet


_worker: tuple[ProjectConfig, ChainClient, Engine] | None = None


def _init(config: ProjectConfig, database_url: str, log: bool = False) -> None:
    """`log`: the parent logs (a command), so a worker writes the same JSON lines (range summaries)."""
    global _worker
    parent = mp.parent_process()
    if parent is not None:  # a pool worker: Ctrl-C is the parent's to handle (it cancels the pool)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        if log:
            obs.bootstrap()
        # Everything this worker runs is loaded by now (inherited from the forked parent, or imported to unpickle
        # `_init` when spawned): frozen, so no full collection re-scans it, neither during its ranges nor at its
        # exit, which the parent's pool shutdown waits for (cli/ingest.py).
        gc.freeze()
        threading.Thread(target=_die_with_parent, args=(parent.sentinel,), daemon=True).start()
    _worker = (config, ChainClient.from_config(config.chain), engine_for(database_url))


def _die_with_parent(sentinel: int) -> None:
    """A parent killed outright (SIGKILL, the OOM killer) cannot cancel the pool: without this its workers live on
    as orphans holding database sessions. The worker dies too; its in-flight range commits nothing."""
    mp_connection.wait([sentinel])
    os.kill(os.getpid(), signal.SIGKILL)


def _run(bounds: tuple[int, int], run_id: str | None = None, upto: int | None = None) -> RangeOutcome:
    assert _worker is not None, "worker not initialised"
    config, client, engine = _worker
    start, end = bounds
    try:
        report = ingest_range(config, client, engine, start, end, run_id=run_id, upto=upto)
    except RangeNotFinal:
        return RangeOutcome(start, end, None)
    return RangeOutcome(start, end, report)


def run_ranges(config: ProjectConfig, database_url: str, ranges: list[tuple[int, int]], workers: int = 1,
               run_id: str | None = None, upto: int | None = None) -> Iterator[RangeOutcome]:
    """Ingest `ranges` (each with its projections; nothing beyond block `upto`), yielding outcomes in range
    order; the first error stops the run.

    With `workers` == 1 everything runs in this process (no pickling, same stack traces as Dagster's). With N > 1,
    this process is one of the N: it starts on the first range at once while N - 1 workers take the next ones,
    so a second worker never delays the first range.
    """
    _init(config, database_url)
    if workers <= 1:
        for r in ranges:
            yield _run(r, run_id, upto)
        return
    ctx = mp.get_context(_start_method())
    log = bool(logging.getLogger().handlers)
    pending = deque(enumerate(ranges))
    done: dict[int, RangeOutcome] = {}
    running: dict[Future[RangeOutcome], int] = {}
    ready = 0  # the next range to yield

    def hand_out() -> None:  # one range queued behind each busy worker, so none waits for this process
        while pending and len(running) < 2 * (workers - 1):
            i, r = pending.popleft()
            running[pool.submit(_run, r, run_id, upto)] = i

    with ProcessPoolExecutor(workers - 1, mp_context=ctx, initializer=_init,
                             initargs=(config, database_url, log)) as pool:
        try:
            while pending or running:
                if pending:
                    i, r = pending.popleft()
                    hand_out()
                    done[i] = _run(r, run_id, upto)  # this process's own share
                else:
                    wait(running, return_when=FIRST_COMPLETED)
                for f in [f for f in running if f.done()]:
                    done[running.pop(f)] = f.result()
                hand_out()
                while ready in done:
                    yield done.pop(ready)
                    ready += 1
        except KeyboardInterrupt:
            # Stop now: in-flight ranges die with their workers and commit nothing (one transaction each).
            _stop_workers(pool)  # first: shutdown() forgets the processes
            # Joined here, with its workers dead: left to the interpreter's exit, the pool's manager thread closes
            # its wakeup pipe while concurrent.futures' exit hook writes to it (Python 3.11: "handle is closed"
            # at exit, or a hang on a full pipe).
            pool.shutdown(wait=True, cancel_futures=True)
            raise
        finally:
            for f in running:
                f.cancel()


def _start_method() -> str:
    """`fork` where it is safe, else `spawn`.

    A spawned worker is a new interpreter that imports everything again: 0.8 s of CPU here, taken from the range
    this process is ingesting on the same cores. A forked one shares the imports already loaded. Forking is safe
    while this is the only thread (Python forks all of the pool's workers at its first submit, before the pool's
    own thread starts) and on Linux (macOS frameworks do not survive a fork). Connections do not leak across:
    nothing here has connected yet, and a forked child starts with no engines (storage/db.py) and its own node
    client (`_init`)."""
    return "fork" if sys.platform == "linux" and threading.active_count() == 1 else "spawn"


def _stop_workers(pool: ProcessPoolExecutor, grace_s: float = 5.0) -> None:
    """SIGTERM every worker, then SIGKILL whatever is still alive after `grace_s`: the pool's own shutdown (and the
    interpreter's exit) joins its workers, and one blocked on a silent node would hold Ctrl-C for its RPC timeout.
    A worker still alive also holds the terminal's pipes open after this process is gone."""
    procs = list((getattr(pool, "_processes", None) or {}).values())
    for proc in procs:
        proc.terminate()
    deadline = time.monotonic() + grace_s
    for proc in procs:
        proc.join(max(0.0, deadline - time.monotonic()))
        if proc.is_alive():
            proc.kill()
            proc.join(1.0)
