"""Backfill worker processes (`orderbook ingest --workers N`): forked where that is safe, so they do not import
everything again, and never on the parent's database connections."""

from __future__ import annotations

import subprocess
import sys
import textwrap

from orderbook_pipelines.config import PROJECT_ROOT


def _run(code: str, *args: str) -> str:
    """In a fresh interpreter: a pytest worker runs threads of its own, and forking it is what the rule forbids."""
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *args], cwd=PROJECT_ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def test_workers_are_forked_only_while_the_parent_has_one_thread() -> None:
    out = _run("""
        import threading
        from orderbook_pipelines.ingestion.backfill import _start_method
        alone = _start_method()
        stop = threading.Event()
        t = threading.Thread(target=stop.wait)
        t.start()
        busy = _start_method()
        stop.set(); t.join()
        print(alone, busy, _start_method())
    """)
    assert out.split() == ["fork", "spawn", "fork"]


def test_a_forked_child_opens_its_own_session_and_leaves_the_parents_alone(database: str) -> None:
    """The parent pooled a connection before forking. The child must get a session of its own (the same socket in
    two processes interleaves protocol messages), and its exit must not end the parent's session: afterwards the
    parent checks out the same backend again (pool_pre_ping would silently replace a dead one, so the pid says)."""
    out = _run("""
        import os, sys
        from orderbook_pipelines.storage.db import engine_for
        url = sys.argv[1]
        ask = "SELECT pg_backend_pid()"
        with engine_for(url).connect() as c:
            parent = c.exec_driver_sql(ask).scalar()
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                with engine_for(url).connect() as c:
                    os.write(w, str(c.exec_driver_sql(ask).scalar()).encode())
                code = 0
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        os.close(w)
        child = int(os.read(r, 64) or -1)
        with engine_for(url).connect() as c:
            after = c.exec_driver_sql(ask).scalar()
        print(parent, child, after, os.waitstatus_to_exitcode(status))
    """, database)
    parent, child, after, exit_code = (int(x) for x in out.split())
    assert exit_code == 0
    assert child not in (parent, -1), "the child used the parent's pooled connection"
    assert after == parent, "the parent's session did not survive the child"
