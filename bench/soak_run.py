"""Soak of `make run`: the whole local stack for N minutes, one sample per minute, then a stop with SIGINT.

Starts `make run` on other ports (so it never collides with a stack on the default ones; it resets the dev
databases `orderbook` and `orderbook_dagster`, as every `make run` does), or attaches to one already running
(`--attach`, same ports). Every minute one JSON line:

* Dagster runs by state (the `runs` table of the Dagster storage database): queued, in progress, succeeded, failed,
  canceled;
* chain head (JSON-RPC) against the ingested frontier (`ingestion_checkpoints`, storage/checkpoints.py frontier());
* the live service's /health: status, book lag and ingestion lag in blocks;
* resident memory (VmRSS from /proc) of anvil, of the dagster processes (dagster dev and everything under it: webserver,
  daemon, code servers, run workers), of the live service and of the simulator; found through /proc/*/cmdline;
* the lines `make run` printed to the terminal during that minute (a quiet terminal prints few).

At the end (not with --attach): SIGINT to `make run`, as Ctrl-C would, and what the stop did: seconds to exit, its
exit code, tracebacks on the terminal, Dagster runs that failed during the stop. Then the figures: start, end and
maximum of each series, and anvil's RSS slope over the second half of the run (MiB per minute: flat is ~0).

    .venv/bin/python -m bench.soak_run --minutes 60 [--ports 18545,13000,18080] [--attach]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import Report, log
from orderbook_pipelines.config import PROJECT_ROOT
from orderbook_pipelines.devchain.procs import rss_mib

IN_PROGRESS = ("STARTING", "STARTED", "CANCELING")
QUEUED = ("QUEUED", "NOT_STARTED")


# -- processes ----------------------------------------------------------------------------------------------------
def _procs() -> dict[int, tuple[int, list[str]]]:
    """pid -> (parent pid, argv) of every process we may read."""
    out: dict[int, tuple[int, list[str]]] = {}
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            argv = Path(f"/proc/{d}/cmdline").read_bytes().split(b"\0")
            stat = Path(f"/proc/{d}/stat").read_text()
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        out[int(d)] = (ppid, [a.decode(errors="replace") for a in argv if a])
    return out


def _tree(root: int, procs: dict[int, tuple[int, list[str]]]) -> list[int]:
    kids: dict[int, list[int]] = {}
    for pid, (ppid, _) in procs.items():
        kids.setdefault(ppid, []).append(pid)
    out, todo = [], [root]
    while todo:
        p = todo.pop()
        out.append(p)
        todo += kids.get(p, [])
    return out


def _has(argv: list[str], *words: str) -> bool:
    joined = " ".join(argv)
    return all(w in joined for w in words)


def _wrappers(run_dir: Path) -> set[int]:
    """The pids of the `scripts/run.sh --proc` wrappers (their pid files): each names its command, is not it."""
    out = set()
    for f in (run_dir / "procs").glob("*.pid"):
        try:
            out.add(int(f.read_text()))
        except (OSError, ValueError):
            continue
    return out


def stack_processes(anvil_port: int, dagster_port: int, live_port: int) -> dict[str, list[int]]:
    """The pids of each part of the stack on these ports (a part may be several processes)."""
    procs = _procs()
    wrappers = _wrappers(PROJECT_ROOT / ".run")
    found: dict[str, set[int]] = {"anvil": set(), "dagster": set(), "live": set(), "sim": set()}
    for pid, (_, argv) in procs.items():
        if not argv or pid in wrappers:
            continue
        if argv[0].endswith("anvil") and _has(argv, f"--port {anvil_port}"):
            found["anvil"].add(pid)
        elif _has(argv, "dagster dev", f"-p {dagster_port}"):
            found["dagster"].update(_tree(pid, procs))
        elif _has(argv, "live serve", f"--port {live_port}"):
            found["live"].update(_tree(pid, procs))
        elif _has(argv, "devchain up", f":{anvil_port}"):
            found["sim"].update(_tree(pid, procs))
    return {part: sorted(pids) for part, pids in found.items()}


# -- probes -------------------------------------------------------------------------------------------------------
def http_json(url: str, body: Any = None, timeout: float = 5.0) -> Any:
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def chain_head(anvil_port: int) -> int | None:
    try:
        r = http_json(f"http://127.0.0.1:{anvil_port}", {"jsonrpc": "2.0", "id": 1, "method": "eth_blockNumber",
                                                         "params": []})
        return int(r["result"], 16)
    except Exception:
        return None


def live_health(live_port: int) -> dict[str, Any]:
    try:
        h = http_json(f"http://127.0.0.1:{live_port}/health", timeout=5)
    except Exception as exc:
        return {"status": f"unreachable: {type(exc).__name__}"}
    return {k: h.get(k) for k in ("status", "lag_blocks", "ingestion_lag_blocks", "applied_block")}


def dagster_runs(dagster_db_url: str) -> dict[str, int] | None:
    import psycopg

    try:
        with psycopg.connect(dagster_db_url, connect_timeout=5) as conn:
            rows: dict[str, int] = dict(conn.execute("SELECT status, count(*) FROM runs GROUP BY status").fetchall())
    except Exception:
        return None
    return {"queued": sum(rows.get(s, 0) for s in QUEUED),
            "in_progress": sum(rows.get(s, 0) for s in IN_PROGRESS),
            "succeeded": rows.get("SUCCESS", 0), "failed": rows.get("FAILURE", 0),
            "canceled": rows.get("CANCELED", 0)}


def dagster_health(dagster_db_url: str) -> dict[str, int] | None:
    """Asset checks that stay planned (a run that never reports them), and how often a block range was materialized.

    A check "in progress" in the UI is a PLANNED execution; one older than 5 minutes is stuck. A range is meant to be
    materialized once: `most_materializations_per_range` is the largest count of one partition of `order_events`.
    """
    import psycopg

    try:
        with psycopg.connect(dagster_db_url, connect_timeout=5) as conn:
            stuck = conn.execute(
                "SELECT count(*) FROM asset_check_executions WHERE execution_status = 'PLANNED'"
                " AND create_timestamp < now() AT TIME ZONE 'UTC' - interval '5 minutes'").fetchone()
            most = conn.execute(
                "SELECT coalesce(max(n), 0), count(*) FROM (SELECT partition, count(*) AS n FROM event_logs"
                " WHERE dagster_event_type = 'ASSET_MATERIALIZATION' AND asset_key LIKE '%order_events%'"
                " GROUP BY partition) p").fetchone()
    except Exception:
        return None
    return {"checks_stuck_planned": int(stuck[0]) if stuck else 0,
            "most_materializations_per_range": int(most[0]) if most else 0,
            "ranges_materialized": int(most[1]) if most else 0}


def depth_snapshots(database_url: str) -> int | None:
    from orderbook_pipelines.storage.db import engine_for

    try:
        engine = engine_for(database_url)
        try:
            with engine.connect() as conn:
                return int(conn.exec_driver_sql("SELECT count(*) FROM depth_snapshots").scalar_one())
        finally:
            engine.dispose()
    except Exception:
        return None


def frontier(database_url: str, config_path: Path) -> int | None:
    from orderbook_pipelines.config import load_config
    from orderbook_pipelines.storage import checkpoints
    from orderbook_pipelines.storage.db import engine_for

    try:
        cfg = load_config(config_path)
        engine = engine_for(database_url)
        try:
            with engine.connect() as conn:
                return checkpoints.frontier(conn, cfg.chain.chain_id, cfg.chain.start_block)
        finally:
            engine.dispose()
    except Exception:
        return None


# -- the terminal of `make run` -----------------------------------------------------------------------------------
@dataclass
class Terminal:
    """What `make run` prints, kept in a file, with a line count per minute."""

    path: Path
    lines: int = 0
    tracebacks: int = 0
    text: list[str] = field(default_factory=list)

    def pump(self, stream: Any) -> None:
        with open(self.path, "w") as f:
            for line in stream:
                f.write(line)
                f.flush()
                self.lines += 1
                self.text.append(line)
                if "Traceback (most recent call last)" in line:
                    self.tracebacks += 1


def slope_per_min(points: list[tuple[float, float]]) -> float:
    """Least-squares slope of (minute, value)."""
    if len(points) < 2:
        return float("nan")
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    den = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True)) / den if den else float("nan")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--ports", default="18545,13000,18080", help="anvil,dagster,live ports")
    ap.add_argument("--attach", action="store_true", help="measure a `make run` already running on these ports")
    ap.add_argument("--interval", type=float, default=60.0, help="seconds between samples")
    args = ap.parse_args()
    anvil_port, dagster_port, live_port = (int(p) for p in args.ports.split(","))

    from sqlalchemy.engine import make_url

    database_url = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/orderbook")
    if make_url(database_url).database in (None, "", "postgres"):
        database_url = make_url(database_url).set(database="orderbook").render_as_string(hide_password=False)
    dagster_db = make_url(database_url).set(drivername="postgresql",
                                            database=os.environ.get("OBP_DAGSTER_DB", "orderbook_dagster"))
    dagster_db_url = dagster_db.render_as_string(hide_password=False)
    config_path = Path(os.environ.get("OBP_CONFIG") or PROJECT_ROOT / ".run" / "devchain.yaml")
    out_dir = PROJECT_ROOT / ".run" / "soak"
    out_dir.mkdir(parents=True, exist_ok=True)

    term = Terminal(out_dir / "make_run_terminal.txt")
    make: subprocess.Popen[str] | None = None
    if not args.attach:
        env = {**os.environ, "OBP_ANVIL_PORT": str(anvil_port), "DAGSTER_PORT": str(dagster_port),
               "OBP_LIVE_PORT": str(live_port)}
        env.pop("OBP_CONFIG", None)
        log(f"make run on ports {args.ports} (terminal in {term.path.relative_to(PROJECT_ROOT)}) ...")
        make = subprocess.Popen(["make", "run"], cwd=PROJECT_ROOT, env=env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                start_new_session=True,
                                # as from a terminal: started in the background, SIGINT is inherited ignored, and a
                                # shell cannot trap a signal ignored on entry (the stop below would not reach it)
                                preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        threading.Thread(target=term.pump, args=(make.stdout,), daemon=True).start()
        deadline = time.monotonic() + 600
        while chain_head(anvil_port) is None or not config_path.exists():
            if make.poll() is not None:
                raise SystemExit(f"make run exited {make.returncode}:\n{''.join(term.text[-40:])}")
            if time.monotonic() > deadline:
                raise SystemExit("make run: no chain and no config after 10 minutes")
            time.sleep(2)
    elif chain_head(anvil_port) is None:
        raise SystemExit(f"--attach: no chain answers on 127.0.0.1:{anvil_port}")

    rep = Report("soak_run")
    samples: list[dict[str, Any]] = []
    t0 = time.monotonic()
    n = max(1, round(args.minutes * 60 / args.interval))
    lines_before = term.lines
    for i in range(1, n + 1):
        time.sleep(max(0.0, t0 + i * args.interval - time.monotonic()))
        if make is not None and make.poll() is not None:
            log(f"make run exited {make.returncode} during the soak")
            break
        pids = stack_processes(anvil_port, dagster_port, live_port)
        head = chain_head(anvil_port)
        front = frontier(database_url, config_path)
        s = {
            "bench": "soak_run", "name": "sample", "minute": round(i * args.interval / 60, 2),
            "head": head, "frontier": front,
            "chain_lag_blocks": head - front if head is not None and front is not None else None,
            "live": live_health(live_port), "runs": dagster_runs(dagster_db_url),
            "dagster": dagster_health(dagster_db_url), "depth_snapshots": depth_snapshots(database_url),
            "rss_mib": {part: round(sum(rss_mib(p) or 0.0 for p in ps), 1) for part, ps in pids.items()},
            "processes": {part: len(ps) for part, ps in pids.items()},
            "terminal_lines": term.lines - lines_before,
        }
        lines_before = term.lines
        samples.append(s)
        print(json.dumps(s), flush=True)

    stop: dict[str, Any] = {}
    if make is not None:
        failed_before = (dagster_runs(dagster_db_url) or {}).get("failed")
        lines_before_stop = len(term.text)
        # On a terminal, Ctrl-C reaches only the foreground job that run.sh started (honcho), never make; here,
        # without a terminal, run.sh passes a SIGINT on to honcho: signal run.sh alone, so make sees its exit code.
        run_sh = [pid for pid, (ppid, argv) in _procs().items() if ppid == make.pid and _has(argv, "scripts/run.sh")]
        log(f"SIGINT to {'scripts/run.sh' if run_sh else 'make run'} (what Ctrl-C does) ...")
        t_stop = time.monotonic()
        if run_sh:
            os.kill(run_sh[0], signal.SIGINT)
        else:
            os.killpg(make.pid, signal.SIGINT)
        try:
            rc = make.wait(timeout=600)
        except subprocess.TimeoutExpired:
            os.killpg(make.pid, signal.SIGKILL)
            rc = make.wait()
        stop = {"seconds": time.monotonic() - t_stop, "exit_code": rc,
                "tracebacks": sum("Traceback" in ln for ln in term.text[lines_before_stop:]),
                "failed_runs_added": ((dagster_runs(dagster_db_url) or {}).get("failed", 0) - (failed_before or 0)),
                "last_lines": [ln.rstrip() for ln in term.text[-6:]]}
        print(json.dumps({"bench": "soak_run", "name": "stop", **stop}), flush=True)

    if not samples:
        raise SystemExit("no sample taken")
    minutes = samples[-1]["minute"]
    params = {"minutes": minutes, "ports": args.ports, "cores": os.cpu_count()}
    for part in ("anvil", "dagster", "live", "sim"):
        xs = [s["rss_mib"].get(part, 0.0) for s in samples]
        rep.figure(f"{part}_rss_start", xs[0], "MiB", **params)
        rep.figure(f"{part}_rss_end", xs[-1], "MiB", **params)
        rep.figure(f"{part}_rss_max", max(xs), "MiB", **params)
    half = [(s["minute"], s["rss_mib"].get("anvil", 0.0)) for s in samples[len(samples) // 2:]]
    rep.figure("anvil_rss_slope_second_half", slope_per_min(half), "MiB/min", **params)
    lags = [s["chain_lag_blocks"] for s in samples if s["chain_lag_blocks"] is not None]
    if lags:
        rep.figure("chain_lag_median", statistics.median(lags), "blocks", **params)
        rep.figure("chain_lag_max", max(lags), "blocks", **params)
    live_lags = [s["live"].get("lag_blocks") for s in samples if isinstance(s["live"].get("lag_blocks"), int)]
    if live_lags:
        rep.figure("live_lag_max", max(live_lags), "blocks", **params)
    runs = [s["runs"] for s in samples if s["runs"]]
    if runs:
        rep.figure("dagster_runs_succeeded", runs[-1]["succeeded"], "runs", **params)
        rep.figure("dagster_runs_failed", runs[-1]["failed"], "runs", **params)
        rep.figure("dagster_runs_queued_max", max(r["queued"] for r in runs), "runs", **params)
        rep.figure("dagster_runs_in_progress_max", max(r["in_progress"] for r in runs), "runs", **params)
    health = [s["dagster"] for s in samples if s["dagster"]]
    if health:
        rep.figure("checks_stuck_planned_max", max(h["checks_stuck_planned"] for h in health), "checks", **params)
        rep.figure("most_materializations_per_range", health[-1]["most_materializations_per_range"], "runs",
                   **params)
        rep.figure("ranges_materialized", health[-1]["ranges_materialized"], "ranges", **params)
    snaps = [s["depth_snapshots"] for s in samples if s["depth_snapshots"] is not None]
    if snaps:
        rep.figure("depth_snapshots_end", snaps[-1], "rows", **params)
    per_min = [s["terminal_lines"] / (args.interval / 60) for s in samples[1:]] or [0]
    rep.figure("terminal_lines_per_min_median", statistics.median(per_min), "lines/min", **params)
    if stop:
        rep.figure("stop_seconds", stop["seconds"], "s", **params)
        rep.figure("stop_exit_code", stop["exit_code"], "code", **params)
        rep.figure("stop_tracebacks_on_terminal", stop["tracebacks"], "lines", **params)
        rep.figure("stop_failed_runs_added", stop["failed_runs_added"], "runs", **params)
    rep.table(f"make run soak, {minutes:g} min (ports {args.ports})")
    print("  minute   head   lag  live-lag  runs q/run/ok/fail/cxl  RSS MiB anvil/dagster/live/sim  terminal lines"
          "  snapshots")
    for s in samples:
        r, rs = s["runs"] or {}, s["rss_mib"]
        lag = "-" if s["chain_lag_blocks"] is None else s["chain_lag_blocks"]
        live_lag = "-" if s["live"].get("lag_blocks") is None else s["live"]["lag_blocks"]
        runs_txt = "/".join(str(r.get(k, "-")) for k in ("queued", "in_progress", "succeeded", "failed", "canceled"))
        rss_txt = "/".join(f"{rs.get(k, 0):.0f}" for k in ("anvil", "dagster", "live", "sim"))
        print(f"  {s['minute']:>6g} {s['head'] or 0:>6} {lag:>5} {live_lag:>9}  {runs_txt:<22} {rss_txt:<31}"
              f" {s['terminal_lines']:>6}  {s['depth_snapshots']}", flush=True)
    if re.search(r"Error \d+", "".join(term.text[-5:])):
        log("make reported an error at the end: see " + str(term.path))
    sys.stdout.flush()


if __name__ == "__main__":
    main()
