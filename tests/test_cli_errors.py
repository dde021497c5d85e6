"""How `orderbook` commands end when the node cannot be used or the operator presses Ctrl-C: one red line that
says why (the node's URL, what was tried), a distinct exit code, progress lines while retrying, no traceback.

Real processes against real loopback sockets: a closed port, and a listener that accepts and never answers.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from orderbook_pipelines.cli.common import INTERRUPTED, NODE_UNAVAILABLE
from tests.conftest import ORDERBOOK, sample_config

INGEST = [ORDERBOOK, "ingest", "--from", "0", "--to", "10"]


def _closed_port() -> int:
    """A loopback port nothing listens on (bound once, never listened, released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def silent_server() -> Iterator[socket.socket]:
    """Accepts connections (the kernel completes them without accept()) and never answers."""
    with socket.create_server(("127.0.0.1", 0), backlog=32) as srv:
        yield srv


def _env(tmp_path: Path, database: str, rpc_url: str, **chain: float) -> dict[str, str]:
    raw = sample_config()
    raw["chain"] |= {"rpc_url": rpc_url, **chain}
    path = tmp_path / "node.yaml"
    path.write_text(yaml.safe_dump(raw))
    env = {**os.environ, "OBP_CONFIG": str(path), "DATABASE_URL": database, "OBP_LOG_LEVEL": "INFO"}
    env.pop("OBP_RPC_URL", None)
    return env


def _run(env: dict[str, str], cmd: list[str] = INGEST) -> tuple[subprocess.CompletedProcess[str], float]:
    t0 = time.monotonic()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=60)  # "does not hang"
    seconds = time.monotonic() - t0
    print(f"{env['OBP_CONFIG']}: exit {proc.returncode} after {seconds:.1f}s\n{proc.stderr}")
    return proc, seconds


def test_ingest_against_a_closed_port_fails_in_one_line_naming_the_node(tmp_path: Path, database: str) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    proc, _ = _run(_env(tmp_path, database, url))  # the defaults `make run` uses
    lines = proc.stderr.splitlines()
    assert proc.returncode == NODE_UNAVAILABLE, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith(f"node {url}: eth_blockNumber failed after ")
    assert lines[-1].endswith(": connection refused")
    retries = [line for line in lines if "attempt" in line and "retrying in" in line]
    assert retries and f"at {url}: attempt 1 of 6 failed (connection refused)" in retries[0]
    assert len(lines) <= len(retries) + 2  # the progress lines, the range's error log line, the verdict


def test_ingest_against_a_silent_node_gives_up_with_the_url(tmp_path: Path, database: str,
                                                            silent_server: socket.socket) -> None:
    url = f"http://127.0.0.1:{silent_server.getsockname()[1]}"
    proc, _ = _run(_env(tmp_path, database, url, rpc_timeout_s=1.5, rpc_deadline_s=3.0))
    lines = proc.stderr.splitlines()
    assert proc.returncode == NODE_UNAVAILABLE, proc.stderr
    assert "Traceback" not in proc.stderr
    assert f"at {url}: attempt 1 of 6 failed (no answer within 1.5s); retrying in" in proc.stderr
    assert lines[-1].startswith(f"node {url}: eth_blockNumber failed after 2 attempts in ")
    assert lines[-1].endswith(": no answer within 1.5s")
    assert len(lines) <= 4


def test_the_node_credentials_never_reach_the_terminal(tmp_path: Path, database: str) -> None:
    url = f"http://indexer:hunter2pass@127.0.0.1:{_closed_port()}/v3/0123456789abcdef0123"
    proc, _ = _run(_env(tmp_path, database, url, rpc_retries=0))
    assert proc.returncode == NODE_UNAVAILABLE, proc.stderr
    assert "hunter2pass" not in proc.stderr and "0123456789abcdef0123" not in proc.stderr
    assert proc.stderr.splitlines()[-1].startswith("node http://indexer:***@127.0.0.1:")


def test_every_command_that_uses_the_node_ends_the_same_way(tmp_path: Path, database: str) -> None:
    url = f"http://127.0.0.1:{_closed_port()}"
    proc, _ = _run(_env(tmp_path, database, url, rpc_retries=0), [ORDERBOOK, "reconcile", "--from", "0", "--to", "10"])
    assert proc.returncode == NODE_UNAVAILABLE, proc.stderr  # not reconcile's 1 ("ranges differ")
    [line] = proc.stderr.splitlines()
    assert line.startswith(f"node {url}: eth_blockNumber failed after 1 attempt in ")
    assert line.endswith("s: connection refused")


@pytest.mark.parametrize("workers", ["1", "2"])
def test_ctrl_c_while_blocked_on_a_silent_node_exits_130_in_one_line(tmp_path: Path, database: str,
                                                                    silent_server: socket.socket,
                                                                    workers: str) -> None:
    """With worker processes, the parent stops them (their open range commits nothing) instead of waiting."""
    url = f"http://127.0.0.1:{silent_server.getsockname()[1]}"
    proc = subprocess.Popen([*INGEST, "--workers", workers],
                            env=_env(tmp_path, database, url, rpc_timeout_s=60, rpc_deadline_s=60),
                            # as from a terminal: a test run started in the background inherits SIGINT ignored
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        silent_server.settimeout(60)
        conn, _ = silent_server.accept()  # the command has sent its first request and waits for the answer
        with conn:
            proc.send_signal(signal.SIGINT)
            out, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == INTERRUPTED, err
    assert err.splitlines() == ["orderbook ingest: interrupted"]
    assert out == ""


@pytest.mark.parametrize("command", ["deploy", "up"])
def test_devchain_against_a_closed_port_gives_up_within_its_wait_naming_the_node(tmp_path: Path,
                                                                                 command: str) -> None:
    """`make run` passes a long wait (its chain starts alongside); typed by hand, a wrong URL is known in seconds."""
    url = f"http://127.0.0.1:{_closed_port()}"
    env = {**os.environ}
    env.pop("OBP_CONFIG", None)
    proc, seconds = _run({**env, "OBP_CONFIG": ""},
                         [ORDERBOOK, "devchain", command, "--rpc-url", url, "--wait", "4",
                          "--config-out", str(tmp_path / "dev.yaml")])
    lines = proc.stderr.splitlines()
    assert proc.returncode == NODE_UNAVAILABLE, proc.stderr
    assert "Traceback" not in proc.stderr
    assert lines[-1].startswith(f"orderbook devchain: no chain answered at {url} within 4 s")
    assert lines[-1].endswith("last error: ConnectionError (connection refused)")
    assert any(line.startswith(f"waiting for a chain at {url} (") for line in lines[:-1])  # progress while waiting
    assert seconds < 45  # the wait plus the interpreter's start on a loaded machine; the old fixed wait was 60 s
    assert not (tmp_path / "dev.yaml").exists()
