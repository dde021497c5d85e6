"""`make run` (scripts/run.sh + Procfile), what can be checked without running the stack for an hour.

* The live service's Redis keys are scoped to the chain and the deployment: another contract, another chain id or a
  fresh dev chain (same addresses, another start block hash) gives another prefix; the same deployment the same.
* Every Procfile process runs through `run.sh --proc`: its full output lands in <run dir>/logs/<name>.log, the
  terminal gets errors (one line each) and milestones, not the chatter; a process that dies says so with its code.
* Ctrl-C on the terminal of `run.sh --supervise` stops every process (the chain last, after the others), prints no
  traceback and exits 0.
* The dev chain keeps logs, receipts and headers for a window longer than reconciliation re-reads, and no past state
  (bounded memory): the exact window is checked against anvil itself.
"""

from __future__ import annotations

import inspect
import os
import pty
import re
import select
import shlex
import signal
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from orderbook_pipelines.cli.devchain import devchain_up
from orderbook_pipelines.cli.live import deployment_id, redis_prefix
from orderbook_pipelines.config import PROJECT_ROOT, Reconciliation, parse_config
from orderbook_pipelines.devchain.anvil import Anvil
from orderbook_pipelines.devchain.deploy import project_config
from tests.conftest import sample_config

RUN_SH = PROJECT_ROOT / "scripts" / "run.sh"
PROCFILE = PROJECT_ROOT / "Procfile"


# -- Redis prefix ---------------------------------------------------------------------------------------------------
def _config(router: str | None = None, chain_id: int | None = None, extra_market: bool = False) -> Any:
    doc = sample_config()
    if router is not None:
        for s in doc["sources"]:
            if isinstance(s["addresses"], list):
                s["addresses"] = [router]
    if chain_id is not None:
        doc["chain"]["chain_id"] = chain_id
    if extra_market:
        doc["markets"].append({"metric_id": "NICKEL_V1", "source": doc["markets"][-1]["source"],
                               "address": "0x" + "ab" * 20, "decimals": 6})
    return parse_config(doc)


ANCHOR = "0x" + "11" * 32


def test_redis_prefix_is_the_same_for_the_same_deployment_and_differs_for_another() -> None:
    cfg = _config()
    prefix = redis_prefix(cfg, ANCHOR)
    assert re.fullmatch(r"obp:31337:[0-9a-f]{10}:", prefix), prefix
    assert redis_prefix(_config(), ANCHOR) == prefix  # same config, same chain: same keys (restarts, cluster)
    other_contracts = _config(router="0x" + "42" * 20)
    assert redis_prefix(other_contracts, ANCHOR) != prefix
    assert redis_prefix(_config(chain_id=1), ANCHOR) != prefix
    # a fresh dev chain deploys the same addresses; its start block hash differs
    assert redis_prefix(cfg, "0x" + "22" * 32) != prefix
    # adding a market to a running deployment must not move its keys
    assert redis_prefix(_config(extra_market=True), ANCHOR) == prefix
    assert deployment_id(cfg, ANCHOR.upper().replace("0X", "0x")) == deployment_id(cfg, ANCHOR)


# -- Procfile ---------------------------------------------------------------------------------------------------------
def _procfile() -> dict[str, str]:
    return dict(re.findall(r"^([a-z]+):\s*(.+)$", PROCFILE.read_text(), re.M))


def test_every_procfile_process_runs_through_the_wrapper() -> None:
    procs = _procfile()
    assert set(procs) == {"chain", "sim", "dagster", "live"}
    for name, line in procs.items():
        assert line.startswith(f"exec bash scripts/run.sh --proc {name} "), line
        assert " -- " in line
    chain = procs["chain"]
    after = re.search(r"--stop-after (\S+)", chain)
    assert after and set(after.group(1).split(",")) == {"sim", "live", "dagster"}  # the chain stops last
    assert "--dagster-port" in procs["dagster"] and "--log-format json" in procs["dagster"]
    assert "--wait-config" in procs["dagster"] and "--wait-config" in procs["live"]


def _keeper_blocks() -> int:
    default = re.search(r"\$\{OBP_ANVIL_HISTORY-([^}]*)\}", _procfile()["chain"])
    assert default, "the chain's history options are not in ${OBP_ANVIL_HISTORY-...}"
    opts = shlex.split(default.group(1))
    assert "--prune-history" in opts and "--transaction-block-keeper" in opts, opts
    return int(opts[opts.index("--transaction-block-keeper") + 1])


def test_the_log_window_covers_reconciliation_with_a_margin() -> None:
    # the dev chain's range size: `orderbook devchain up` (make run) and project_config's default
    up = inspect.signature(devchain_up).parameters["range_size"].default.default
    range_size = max(up, inspect.signature(project_config).parameters["range_size"].default)
    reread = Reconciliation().lookback_ranges * range_size
    assert _keeper_blocks() >= reread + 1000, (_keeper_blocks(), reread)


# -- the wrapper ------------------------------------------------------------------------------------------------------
CHATTY = textwrap.dedent("""
    import json, sys
    print(json.dumps({"level": "info", "event": "applied migration 0001", "logger": "yoyo"}))
    print(json.dumps({"level": "debug", "event": "tick", "logger": "dagster.daemon"}))
    print(json.dumps({"level": "error", "event": "sensor failed", "logger": "dagster.daemon",
                      "exception": "Traceback (most recent call last):\\n  ...\\nValueError: no node"}))
    print("2026-11-30 08:00:00 +0000 - dagster - DEBUG - ingest - abc - STEP_START - step started")
    print("2026-11-30 08:00:01 +0000 - dagster - ERROR - ingest - abc - STEP_FAILURE - step failed")
    print("some plain chatter")
    print("deployed; config at x.yaml")
    print("Traceback (most recent call last):", file=sys.stderr)
    print('  File "sim.py", line 3, in run', file=sys.stderr)
    print("RuntimeError: nonce too low", file=sys.stderr)
    sys.exit(int(sys.argv[1]))
""")


def _wrapped(tmp_path: Path, code: int) -> subprocess.CompletedProcess[str]:
    script = tmp_path / "chatty.py"
    script.write_text(CHATTY)
    env = {**os.environ, "OBP_RUN_DIR": str(tmp_path / "run"), "OBP_TERMINAL_LEVEL": "error"}
    return subprocess.run(["bash", str(RUN_SH), "--proc", "demo", "--", sys.executable, str(script), str(code)],
                          env=env, capture_output=True, text=True, timeout=60)


def test_the_wrapper_puts_everything_in_the_log_and_only_errors_and_milestones_on_the_terminal(
        tmp_path: Path) -> None:
    r = _wrapped(tmp_path, 0)
    assert r.returncode == 0, r.stdout + r.stderr
    log = (tmp_path / "run" / "logs" / "demo.log").read_text()
    for text in ("applied migration 0001", '"tick"', "STEP_START", "some plain chatter", "nonce too low",
                 'File "sim.py", line 3'):
        assert text in log, text
    out = r.stdout
    assert "sensor failed" in out and "ValueError: no node" in out
    assert "STEP_FAILURE" in out
    assert "deployed; config at x.yaml" in out
    assert "RuntimeError: nonce too low" in out and "Traceback" not in out  # one line per traceback
    for chatter in ("applied migration", "tick", "STEP_START", "plain chatter"):
        assert chatter not in out, chatter
    assert not (tmp_path / "run" / "procs" / "demo.pid").exists()


def test_a_process_that_dies_makes_the_wrapper_exit_with_its_code_and_say_so(tmp_path: Path) -> None:
    r = _wrapped(tmp_path, 3)
    assert r.returncode == 3
    assert "exited with code 3" in r.stdout


# -- Ctrl-C -----------------------------------------------------------------------------------------------------------
FAKE = textwrap.dedent("""
    import signal, sys, time
    name, linger, stamps = sys.argv[1], float(sys.argv[2]), sys.argv[3]
    def stop(*_):
        time.sleep(linger)  # a graceful stop takes a while
        with open(stamps, "a") as f:
            f.write(f"{name} {time.time()}\\n")
        sys.exit(0)
    signal.signal(signal.SIGTERM, stop)
    print(f"{name} up", flush=True)
    while True:
        time.sleep(0.1)
""")


def _read_until(fd: int, done: Callable[[str], bool], timeout: float, buf: bytearray) -> bool:
    """Read the terminal into `buf` until done(text so far), the timeout, or the terminal closes."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        r, _, _ = select.select([fd], [], [], 0.2)
        if r:
            try:
                chunk = os.read(fd, 65536)
            except OSError:
                return False
            if not chunk:
                return False
            buf += chunk
            if done(buf.decode(errors="replace")):
                return True
    return False


def test_ctrl_c_stops_every_process_the_chain_last_without_traceback_and_exits_0(tmp_path: Path) -> None:
    fake, stamps = tmp_path / "fake.py", tmp_path / "stops.txt"
    fake.write_text(FAKE)
    run = f"bash {shlex.quote(str(RUN_SH))} --proc"
    py = shlex.quote(sys.executable)
    procfile = tmp_path / "Procfile"
    procfile.write_text(
        f"chain: exec {run} chain --stop-after dagster,live -- {py} {fake} chain 0 {stamps}\n"
        f"dagster: exec {run} dagster -- {py} {fake} dagster 1.5 {stamps}\n"
        f"live: exec {run} live -- {py} {fake} live 0.5 {stamps}\n")
    env = {**os.environ, "OBP_RUN_DIR": str(tmp_path / "run"), "OBP_TERMINAL_LEVEL": "info"}
    pid, fd = pty.fork()
    if pid == 0:  # the child: `make run`'s supervisor on a terminal
        os.chdir(tmp_path)
        os.execvpe("bash", ["bash", str(RUN_SH), "--supervise", str(procfile)], env)
    out = bytearray()
    try:
        up = _read_until(fd, lambda t: all(f"{n} up" in t for n in ("chain", "dagster", "live")), 60, out)
        assert up, out.decode(errors="replace")
        os.write(fd, b"\x03")  # Ctrl-C, as the terminal sends it: to the foreground process group
        _read_until(fd, lambda t: False, 60, out)  # until the terminal closes
    finally:
        _, status = os.waitpid(pid, 0)
        os.close(fd)
    text = out.decode(errors="replace")
    assert os.waitstatus_to_exitcode(status) == 0, text
    assert "Traceback" not in text, text
    stops = dict(line.split() for line in stamps.read_text().splitlines())
    assert set(stops) == {"chain", "dagster", "live"}, text
    assert float(stops["chain"]) >= max(float(stops["dagster"]), float(stops["live"])), stops
    for name in ("chain", "dagster", "live"):
        assert f"{name} up" in (tmp_path / "run" / "logs" / f"{name}.log").read_text()
    assert not list((tmp_path / "run" / "procs").glob("*.pid"))


# -- the dev chain's retention ----------------------------------------------------------------------------------------
LOG0_CONTRACT = "0x60006000a000"  # init code: LOG0(0, 0), STOP: its creation emits one log


def test_the_dev_chain_keeps_logs_and_headers_for_its_window_and_no_past_state() -> None:
    keep = _keeper_blocks()
    chain = Anvil(extra=["--prune-history", "--transaction-block-keeper", str(keep)])
    try:
        sender = chain.rpc("eth_accounts")[0]
        tx = chain.rpc("eth_sendTransaction", {"from": sender, "data": LOG0_CONTRACT, "gas": hex(100_000)})
        receipt = chain.rpc("eth_getTransactionReceipt", tx)
        b = int(receipt["blockNumber"], 16)
        header = chain.rpc("eth_getBlockByNumber", hex(b), False)

        def logs() -> list[dict]:
            return chain.rpc("eth_getLogs", {"fromBlock": hex(b), "toBlock": hex(b)})

        assert len(logs()) == 1
        chain.mine(10)
        with pytest.raises(RuntimeError, match="BlockOutOfRange"):  # no state of past blocks: eth_call at the head
            chain.rpc("eth_getBalance", sender, hex(b))
        assert int(chain.rpc("eth_getBalance", sender, "latest"), 16) > 0
        head = int(chain.rpc("eth_blockNumber"), 16)
        chain.mine(b + keep - 1 - head)  # block b is now `keep - 1` blocks behind the head: still kept
        assert len(logs()) == 1 and chain.rpc("eth_getTransactionReceipt", tx) is not None
        chain.mine(1)  # `keep` behind: its transactions, receipts and logs are dropped, without an error
        assert logs() == [] and chain.rpc("eth_getTransactionReceipt", tx) is None
        assert chain.rpc("eth_getBlockByNumber", hex(b), False)["hash"] == header["hash"]  # headers stay
    finally:
        chain.stop()


def test_the_wrapper_stops_its_process_on_sigterm_and_exits_0(tmp_path: Path) -> None:
    fake, stamps = tmp_path / "fake.py", tmp_path / "stops.txt"
    fake.write_text(FAKE)
    env = {**os.environ, "OBP_RUN_DIR": str(tmp_path / "run")}
    p = subprocess.Popen(["bash", str(RUN_SH), "--proc", "solo", "--", sys.executable, str(fake), "solo", "0.2",
                          str(stamps)], env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = tmp_path / "run" / "logs" / "solo.log"
    deadline = time.monotonic() + 30
    while not (log.exists() and "solo up" in log.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    p.send_signal(signal.SIGTERM)  # as honcho stops it
    out, _ = p.communicate(timeout=60)
    assert p.returncode == 0, out
    assert stamps.read_text().startswith("solo "), out  # the process itself got the stop and ran its handler
    assert "Traceback" not in out
