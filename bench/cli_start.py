"""CLI start-up: wall time of whole `orderbook` processes, from exec to exit (what an operator waits for).

Measured: `orderbook --help` and `orderbook ingest --help` (the latter also runs the app callback: secret files,
JSON logs). Baselines (same run): `python -c pass` (interpreter start, the floor) and
`python -c "import orderbook_pipelines.definitions"` (what importing the Dagster layer costs: what every command
paid while the CLI imported its dependencies at start). One untimed warm-up each (page cache, bytecode), then
`--runs` rounds, the commands interleaved so that load on the machine falls on all of them alike.

    .venv/bin/python -m bench.cli_start [--runs 10]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

from bench.common import Report, log
from orderbook_pipelines.config import PROJECT_ROOT

PYTHON = sys.executable
ORDERBOOK = str(Path(sys.executable).parent / "orderbook")
COMMANDS: dict[str, list[str]] = {
    "python_pass": [PYTHON, "-c", "pass"],
    "python_import_definitions": [PYTHON, "-c", "import orderbook_pipelines.definitions"],
    "orderbook_help": [ORDERBOOK, "--help"],
    "orderbook_ingest_help": [ORDERBOOK, "ingest", "--help"],
}


def run_once(argv: list[str]) -> float:
    """Seconds from spawn to exit; a failing command stops the bench (a fast failure is no start-up figure)."""
    t0 = time.perf_counter()
    proc = subprocess.run(argv, cwd=PROJECT_ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    seconds = time.perf_counter() - t0
    if proc.returncode != 0:
        raise SystemExit(f"{' '.join(argv)} exited {proc.returncode}: {proc.stderr[-2000:]}")
    return seconds


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs", type=int, default=10, help="timed runs per command")
    args = ap.parse_args()
    rep = Report("cli_start")
    for argv in COMMANDS.values():
        run_once(argv)
    samples: dict[str, list[float]] = {name: [] for name in COMMANDS}
    load = os.getloadavg()[0]
    log(f"{args.runs} rounds of {len(COMMANDS)} commands (load average {load:.2f}, {os.cpu_count()} cores) ...")
    for _ in range(args.runs):
        for name, argv in COMMANDS.items():
            samples[name].append(run_once(argv))
    params = {"runs": args.runs, "cores": os.cpu_count(), "load_avg_1m": round(load, 2)}
    medians = {}
    for name, xs in samples.items():
        rep.figure(f"{name}_min", min(xs), "s", **params)
        target = {"target_s": 1.0} if name == "orderbook_help" else {}
        medians[name] = rep.figure(f"{name}_median", statistics.median(xs), "s", **params, **target)
        rep.figure(f"{name}_max", max(xs), "s", **params)
    rep.figure("orderbook_help_median_over_import_definitions",
               medians["orderbook_help"] / medians["python_import_definitions"], "x")
    rep.figure("orderbook_help_median_minus_interpreter", medians["orderbook_help"] - medians["python_pass"], "s")
    rep.table("CLI start-up (whole processes, wall time)")


if __name__ == "__main__":
    main()
