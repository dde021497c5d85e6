#!/usr/bin/env bash
# `make run`: the whole local stack in one terminal, via honcho and the Procfile:
#   chain   - anvil devchain on 127.0.0.1:$OBP_ANVIL_PORT (default 8545), 1 s blocks, bounded memory (see Procfile)
#   sim     - `orderbook devchain up`: deploys the reference contracts, writes $OBP_CONFIG,
#             then runs the seeded order-flow simulator
#   dagster - `dagster dev` (UI + daemon) on 127.0.0.1:$DAGSTER_PORT (default 3000), once $OBP_CONFIG exists
#   live    - live depth service (WebSocket + REST) on 127.0.0.1:$OBP_LIVE_PORT (default 8080)
# Postgres comes from scripts/ensure_postgres.sh (DATABASE_URL, 127.0.0.1:5432 or a project-local
# cluster), Redis from scripts/ensure_redis.sh. Ctrl-C stops everything, including a project-local
# Postgres/Redis that this script started, and `make run` then exits 0.
#
# The terminal stays quiet: this banner, one line per process start, the processes' errors, a few milestones and a
# status line every $OBP_RUN_STATUS_S seconds (default 300; 0: none). Every line of every process goes to
# .run/logs/<process>.log (the previous run's logs move to .run/logs/previous/). OBP_TERMINAL_LEVEL=warning|info|all
# shows more of them on the terminal too.
#
# Other knobs: OBP_ANVIL_HISTORY= (empty: the dev chain keeps its full history; see the Procfile),
# OBP_RUN_STOP_TIMEOUT_S (120: how long one process may take to stop before it is killed), OBP_RUN_KILL_WAIT_S (180:
# honcho's own last resort). docs/runbooks/local-stack.md explains what is kept, printed and stopped, and why.
#
# Internal modes (used by the Procfile and the tests, not by people):
#   run.sh --proc NAME [options] -- COMMAND...   run one Procfile process: log routing and a graceful stop
#   run.sh --supervise PROCFILE                  honcho on PROCFILE; Ctrl-C (or SIGINT/SIGTERM) stops it, exit 0
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

PY="$ROOT/.venv/bin/python"
[[ -x "$PY" ]] || PY="$(command -v python3)"

log() { printf '[run] %s\n' "$*" >&2; }
die() { printf '[run] ERROR: %s\n' "$*" >&2; exit 1; }

# ====================================================================================== one Procfile process ====
# The wrapper honcho starts for every Procfile line. Honcho stops processes with SIGTERM to their process group and
# SIGKILLs what is left KILL_WAIT seconds later; a process here runs in its own session instead, so the wrapper alone
# receives that SIGTERM and stops its process its own way:
#   --stop-after a,b     first wait until the wrappers of processes a and b have exited (the chain stops last, so that
#                        nothing in flight fails on a vanished node)
#   --dagster-port P     `dagster dev`: cancel the runs still queued or in flight through its GraphQL API on port P
#                        (they end CANCELED, never FAILURE), then SIGINT dagster dev alone, which shuts its webserver,
#                        daemon and code servers down; whatever is left in its process group afterwards is stopped
#   otherwise            SIGTERM to the process group
# and exits 0 once the process is gone. A process that exits by itself makes the wrapper exit with its code (honcho
# then stops the others) after printing its last log lines.
#   --wait-config PATH   first `orderbook wait-config PATH` (the deployment's config, written by the sim process)
#   --status             every $OBP_RUN_STATUS_S seconds one status line: chain head, the process's RSS, the live
#                        service's lags, Dagster's runs
proc_py() {
    cat <<'PY'
import argparse, collections, json, os, re, signal, subprocess, sys, threading, time, urllib.request
from pathlib import Path

ap = argparse.ArgumentParser(prog="run.sh --proc")
ap.add_argument("name")
ap.add_argument("--wait-config")
ap.add_argument("--stop-after", default="")
ap.add_argument("--dagster-port", type=int)
ap.add_argument("--status", action="store_true")
ap.add_argument("--stop-timeout", type=float, default=float(os.environ.get("OBP_RUN_STOP_TIMEOUT_S", "120")))
argv = sys.argv[1:]
if "--" not in argv or argv.index("--") == len(argv) - 1:
    ap.error("usage: run.sh --proc NAME [options] -- COMMAND...")
a = ap.parse_args(argv[:argv.index("--")])
cmd = argv[argv.index("--") + 1:]

run_dir = Path(os.environ.get("OBP_RUN_DIR") or Path.cwd() / ".run")
logs, procs = run_dir / "logs", run_dir / "procs"
logs.mkdir(parents=True, exist_ok=True)
procs.mkdir(parents=True, exist_ok=True)
log_path = logs / f"{a.name}.log"
try:
    shown_log = log_path.relative_to(Path.cwd())
except ValueError:
    shown_log = log_path
logf = open(log_path, "a", buffering=1, encoding="utf-8", errors="replace")
pidfile = procs / f"{a.name}.pid"
pidfile.write_text(str(os.getpid()))

LEVELS = {"all": 0, "debug": 10, "info": 20, "warn": 30, "warning": 30, "error": 40, "exception": 40,
          "critical": 50, "fatal": 50}
threshold = LEVELS.get(os.environ.get("OBP_TERMINAL_LEVEL", "error").lower(), 40)
status_s = float(os.environ.get("OBP_RUN_STATUS_S", "300"))
ANSI = re.compile(r"\x1b\[[0-9;]*m")
DAGSTER_TEXT = re.compile(r" - (DEBUG|INFO|WARNING|ERROR|CRITICAL) - ")
PLAIN_ERROR = re.compile(r"(?i)\b(error|exception|fatal|panic|panicked|critical)\b")
MILESTONES = re.compile(r"^deployed|Serving dagster-webserver on|Uvicorn running on|Redis keys and channels under|"
                        r"first correct book")
CANCEL_NOISE = re.compile(r" - (STEP_FAILURE|RUN_CANCELED) - ")  # a run's steps fail as it is canceled by a stop
STATUS = re.compile(r"^sim: ")  # the simulator's counters: shown once per status period

lock = threading.RLock()  # RLock: the SIGTERM handler logs from the main thread, maybe inside a write


def say(msg):
    """A line for the terminal (honcho prefixes it with the time and the process name)."""
    with lock:
        print(msg[:600], flush=True)


def to_log(line):
    with lock:
        logf.write(line + "\n")


def note(msg):
    """A line of the wrapper itself: in the log and on the terminal."""
    to_log(f"[run.sh --proc {a.name}] {msg}")
    say(msg)


last_status = 0.0
tb = None  # the lines of a Python traceback being read
dagster_record = False  # the last record was Dagster's console format (its continuation lines follow)
recent = collections.deque(maxlen=8)


def end_traceback(last=""):
    global tb
    frames = [t for t in tb if t.startswith("File ")]
    where = f" at {frames[-1]}" if frames else ""
    say(f"ERROR (traceback): {last or (tb[-1] if tb else '')}{where}; full text in {shown_log}")
    tb = None


def route(line):
    """Every line into the log; errors, milestones and, once per status period, the sim's counters on the terminal."""
    global last_status, tb, dagster_record
    to_log(line)
    if threshold == 0:
        say(line)
        return
    s = ANSI.sub("", line).strip()
    if tb is not None:
        if not s or line[:1] in (" ", "\t") or s.startswith(("Traceback", "During handling", "The above exception")):
            if s:
                tb.append(s)
            return
        end_traceback(s)
        return
    if not s:
        return
    recent.append(s)
    if s.startswith("Traceback (most recent call last)"):
        tb = [s]
        return
    if s.startswith("{"):
        try:
            d = json.loads(s)
        except ValueError:
            d = None
        if isinstance(d, dict):
            dagster_record = False
            lvl = str(d.get("level") or d.get("levelname") or d.get("severity") or "info").lower()
            msg = str(d.get("event") or d.get("msg") or d.get("message") or "")
            n = LEVELS.get(lvl, 20)
            if n >= threshold:
                exc = str(d.get("exception") or d.get("exc_info") or "").strip().splitlines()
                who = d.get("logger") or d.get("name") or ""
                say(f"{lvl.upper()}: {who + ': ' if who else ''}{msg}{' | ' + exc[-1] if exc else ''}"
                    + (f" ({shown_log})" if n >= 40 else ""))
            elif MILESTONES.search(msg):
                say(msg)
            return
    m = DAGSTER_TEXT.search(s)
    if m:
        dagster_record = True
        if LEVELS[m.group(1).lower()] >= threshold and not (stopping.is_set() and CANCEL_NOISE.search(s)):
            say(s)
        return
    if dagster_record and not MILESTONES.search(s):  # the rest of a multi-line Dagster record: in the log only
        return
    if MILESTONES.search(s):
        say(s)
    elif STATUS.search(s):
        now = time.monotonic()
        if status_s > 0 and (last_status == 0.0 or now - last_status >= status_s):
            last_status = now
            say(s)
    elif threshold <= 20 or PLAIN_ERROR.search(s):
        say(s)


def http_json(url, body=None, timeout=5.0):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data, {"content-type": "application/json"})
    with urllib.request.urlopen(req, timeout=timeout) as r:
        return json.load(r)


def graphql(query, variables=None):
    port = a.dagster_port or os.environ.get("DAGSTER_PORT", "3000")
    d = http_json(f"http://127.0.0.1:{port}/graphql", {"query": query, "variables": variables or {}})
    if d.get("errors"):
        raise RuntimeError(d["errors"][0].get("message"))
    return d["data"]


Q_IN_FLIGHT = ("query { runsOrError(filter: {statuses: [QUEUED, NOT_STARTED, STARTING, STARTED, CANCELING]}) "
               "{ __typename ... on Runs { results { runId status } } } }")
M_TERMINATE = ("mutation($ids: [String!]!) { terminateRuns(runIds: $ids, terminatePolicy: SAFE_TERMINATE) "
               "{ __typename } }")


Q_INSTIGATORS = ("query { workspaceOrError { ... on Workspace { locationEntries { locationOrLoadError { "
                 "... on RepositoryLocation { repositories { sensors { id name sensorState { status } } "
                 "schedules { id name scheduleState { status } } } } } } } } }")
M_STOP_SENSOR = "mutation($id: String) { stopSensor(id: $id) { __typename } }"
M_STOP_SCHEDULE = "mutation($id: String) { stopRunningSchedule(id: $id) { __typename } }"


def stop_instigators():
    """Stop the running sensors and schedules first, so that nothing launches a run while we cancel (the state is
    in this session's Dagster database, which the next `make run` creates afresh)."""
    stopped = []
    repos = [r for e in graphql(Q_INSTIGATORS)["workspaceOrError"].get("locationEntries", [])
             for r in (e.get("locationOrLoadError") or {}).get("repositories", [])]
    for r in repos:
        for s in r.get("sensors", []):
            if (s.get("sensorState") or {}).get("status") == "RUNNING":
                graphql(M_STOP_SENSOR, {"id": s["id"]})
                stopped.append(s["name"])
        for s in r.get("schedules", []):
            if (s.get("scheduleState") or {}).get("status") == "RUNNING":
                graphql(M_STOP_SCHEDULE, {"id": s["id"]})
                stopped.append(s["name"])
    to_log(f"[run.sh --proc {a.name}] stopped sensors and schedules: {stopped}")


def cancel_dagster_runs(deadline):
    """Stop the sensors and schedules, then cancel every queued or running run (SAFE_TERMINATE: the run worker
    stops and the run ends CANCELED) until none is left in flight."""
    asked, runs, quiet = set(), [], 0
    try:
        stop_instigators()
    except Exception as exc:  # the webserver is not up (yet, or any more): nothing to stop or cancel through it
        to_log(f"[run.sh --proc {a.name}] no Dagster API to stop sensors through: {exc}")
    while time.monotonic() < deadline:
        try:
            runs = graphql(Q_IN_FLIGHT)["runsOrError"].get("results") or []
        except Exception as exc:
            to_log(f"[run.sh --proc {a.name}] no Dagster API to cancel runs through: {exc}")
            return len(asked)
        quiet = 0 if runs else quiet + 1
        if quiet >= 2:  # nothing in flight twice in a row: a sensor tick that was running has ended too
            return len(asked)
        todo = [r["runId"] for r in runs if r["status"] != "CANCELING" and r["runId"] not in asked]
        if todo:
            to_log(f"[run.sh --proc {a.name}] terminating runs {todo}")
            try:
                graphql(M_TERMINATE, {"ids": todo})
            except Exception as exc:
                to_log(f"[run.sh --proc {a.name}] terminateRuns failed: {exc}")
            asked.update(todo)
        time.sleep(0.5)
    note(f"Dagster runs still in flight at the stop timeout: {[r['runId'][:8] for r in runs]}")
    return len(asked)


def alive(pid):
    try:
        os.kill(pid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def group_alive(pgid):
    try:
        os.killpg(pgid, 0)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        return True


def signal_group(pgid, sig):
    try:
        os.killpg(pgid, sig)
    except ProcessLookupError:
        pass


def wait_for(pred, deadline, step=0.2):
    while time.monotonic() < deadline:
        if pred():
            return True
        time.sleep(step)
    return pred()


child = None  # the process running now: `orderbook wait-config`, then the command
main_child = None
spawn_lock = threading.Lock()
stopping = threading.Event()


def others_gone():
    for n in filter(None, a.stop_after.split(",")):
        try:
            pid = int((procs / f"{n}.pid").read_text())
        except (OSError, ValueError):
            continue
        if alive(pid):
            return False
    return True


def stop_sequence():
    deadline = time.monotonic() + a.stop_timeout
    wait_for(others_gone, deadline)
    with spawn_lock:  # no new child after this point (the main thread checks `stopping` under the same lock)
        c = child
    if c is None or c.poll() is not None:
        return
    if a.dagster_port and c is main_child:
        n = cancel_dagster_runs(deadline)
        if n:
            note(f"canceled {n} Dagster run(s) that were queued or running")
        try:
            os.kill(c.pid, signal.SIGINT)  # dagster dev then stops its webserver, daemon and code servers
        except ProcessLookupError:
            pass
    else:
        signal_group(c.pid, signal.SIGTERM)
    try:
        c.wait(timeout=max(1.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        note(f"still running {a.stop_timeout:.0f}s after the stop request: killing it")
        signal_group(c.pid, signal.SIGKILL)
    if group_alive(c.pid):  # something it started outlived it (a run worker, say): stop that too
        signal_group(c.pid, signal.SIGTERM)
        if not wait_for(lambda: not group_alive(c.pid), time.monotonic() + 10):
            signal_group(c.pid, signal.SIGKILL)


def on_stop(signum, frame):
    if not stopping.is_set():
        stopping.set()
        to_log(f"[run.sh --proc {a.name}] stop requested (signal {signum})")
        threading.Thread(target=stop_sequence, name="stop", daemon=True).start()


# Not SIG_IGN for SIGINT: an ignored signal stays ignored in the children (dagster dev would ignore its SIGINT)
signal.signal(signal.SIGINT, on_stop)
signal.signal(signal.SIGTERM, on_stop)
signal.signal(signal.SIGHUP, on_stop)


from orderbook_pipelines.devchain.procs import rss_mib  # noqa: E402  (the venv's python runs this)


def status_loop():
    rpc = os.environ.get("OBP_RPC_URL") or f"http://127.0.0.1:{os.environ.get('OBP_ANVIL_PORT', '8545')}"
    live = f"http://127.0.0.1:{os.environ.get('OBP_LIVE_PORT', '8080')}/health"
    q = ("query { q: runsOrError(filter: {statuses: [QUEUED, NOT_STARTED]}) { ... on Runs { count } } "
         "r: runsOrError(filter: {statuses: [STARTING, STARTED, CANCELING]}) { ... on Runs { count } } "
         "s: runsOrError(filter: {statuses: [SUCCESS]}) { ... on Runs { count } } "
         "f: runsOrError(filter: {statuses: [FAILURE]}) { ... on Runs { count } } }")
    while not stopping.wait(status_s):
        parts = []
        try:
            r = http_json(rpc, {"jsonrpc": "2.0", "id": 1, "method": "eth_blockNumber", "params": []})
            parts.append(f"block {int(r['result'], 16)}")
        except Exception:
            parts.append("chain not answering")
        mib = rss_mib(main_child.pid) if main_child is not None else None
        if mib is not None:
            parts.append(f"{a.name} RSS {mib:.0f} MiB")
        try:
            h = http_json(live, timeout=3)
            parts.append(f"live {h.get('status')}: book lag {h.get('lag_blocks')}, "
                         f"ingested lag {h.get('ingestion_lag_blocks')} blocks")
        except Exception:
            parts.append("live not answering")
        try:
            d = graphql(q)
            parts.append("dagster runs: {} queued, {} running, {} succeeded, {} failed".format(
                *(d[k].get("count", "?") for k in "qrsf")))
        except Exception:
            parts.append("dagster not answering")
        say("status: " + " | ".join(parts))


def start(argv):
    """Start argv in its own session (out of honcho's process group), unless a stop was asked for already."""
    global child
    with spawn_lock:
        if stopping.is_set():
            return None
        child = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                 start_new_session=True, text=True, encoding="utf-8", errors="replace", bufsize=1)
        return child


def pump(p):
    for line in p.stdout:
        route(line.rstrip("\n"))
    if tb is not None:
        end_traceback()
    return p.wait()


rc = 0
try:
    to_log(f"[run.sh --proc {a.name}] {time.strftime('%Y-%m-%dT%H:%M:%S%z')} starting: {' '.join(cmd)}")
    if a.wait_config:
        p = start(["orderbook", "wait-config", a.wait_config])
        rc = pump(p) if p is not None else 0
        if rc != 0 and not stopping.is_set():
            note(f"`orderbook wait-config {a.wait_config}` failed (exit {rc}); see {shown_log}")
    if rc == 0:
        main_child = start(cmd)
        if main_child is not None:
            if a.status and status_s > 0:
                threading.Thread(target=status_loop, name="status", daemon=True).start()
            rc = pump(main_child)
    if stopping.is_set():
        # a stop was asked for: let the stop sequence finish with the process group, then report a clean stop
        c = child
        wait_for(lambda: c is None or not group_alive(c.pid), time.monotonic() + a.stop_timeout + 15)
        rc = 0
    elif rc != 0:
        note(f"exited with code {rc}; last lines of {shown_log}:")
        for s in list(recent)[-5:]:
            say("  " + s)
finally:
    try:
        pidfile.unlink()
    except OSError:
        pass
    logf.close()
sys.exit(0 if rc == 0 else (128 - rc if rc < 0 else rc))
PY
}

if [[ "${1:-}" == "--proc" ]]; then
    shift
    # the program on stdin (not -c): `ps` then shows `python - NAME ... -- COMMAND`, not the whole program
    exec "$PY" - "$@" < <(proc_py)
fi

# ============================================================================================ the supervisor ====
# honcho on a Procfile, with a longer grace before its SIGKILL (its KILL_WAIT is 5 s: too short for dagster dev to
# cancel its runs and shut down). On a terminal, honcho runs as the foreground job in its own process group, so that
# Ctrl-C reaches honcho alone (not make, which would report "Error 130"); honcho then sends SIGTERM to every wrapper
# (see --proc above). Without a terminal, honcho runs in the background and SIGINT/SIGTERM/SIGHUP to this script are
# passed on. A stop that was asked for exits 0; a process that died by itself exits non-zero.
HONCHO_PY='
import os, signal, sys
import honcho.manager as manager
manager.KILL_WAIT = int(sys.argv[1])
# a closed terminal (SIGHUP) stops the stack like Ctrl-C does (honcho handles only SIGINT and SIGTERM)
signal.signal(signal.SIGHUP, lambda *_: os.kill(os.getpid(), signal.SIGTERM))
from honcho.command import main
main(["start", "-f", sys.argv[2]])
'

supervise() {
    local procfile="$1" grace="${OBP_RUN_KILL_WAIT_S:-180}" rc=0
    if [[ -t 0 ]]; then
        set -m  # job control: the foreground job gets its own process group and the terminal
        "$PY" -c "$HONCHO_PY" "$grace" "$procfile" || rc=$?
        set +m
    else
        set -m
        "$PY" -c "$HONCHO_PY" "$grace" "$procfile" &
        local pid=$!
        set +m
        trap 'kill -INT "$pid" 2>/dev/null || true' INT
        trap 'kill -TERM "$pid" 2>/dev/null || true' TERM HUP
        while :; do
            wait "$pid" && rc=0 || rc=$?
            kill -0 "$pid" 2>/dev/null || break
        done
        trap - INT TERM HUP
    fi
    case "$rc" in
        0|130|143) return 0 ;;  # stopped as asked (honcho exits 130 after SIGINT, 143 after SIGTERM)
        *) return "$rc" ;;
    esac
}

if [[ "${1:-}" == "--supervise" ]]; then
    [[ -f "${2:-}" ]] || die "usage: run.sh --supervise PROCFILE"
    export PATH="$ROOT/.venv/bin:$PATH"
    supervise "$2" && exit 0 || exit $?
fi

# ================================================================================================== make run ====
export OBP_ANVIL_PORT="${OBP_ANVIL_PORT:-8545}"
export DAGSTER_PORT="${DAGSTER_PORT:-3000}"
export OBP_LIVE_PORT="${OBP_LIVE_PORT:-8080}"
export OBP_RUN_STATUS_S="${OBP_RUN_STATUS_S:-300}"
DAGSTER_DB="${OBP_DAGSTER_DB:-orderbook_dagster}"

# ------------------------------------------------------------- ports ----
port_in_use() {
    if command -v python3 >/dev/null 2>&1; then
        python3 - "$1" <<'PY'
import socket, sys
s = socket.socket()
s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
try:
    s.bind(("127.0.0.1", int(sys.argv[1])))
except OSError:
    sys.exit(0)  # in use
sys.exit(1)
PY
    else
        timeout 2 bash -c "exec 3<>/dev/tcp/127.0.0.1/$1" 2>/dev/null
    fi
}
for spec in "OBP_ANVIL_PORT:chain RPC (anvil)" "DAGSTER_PORT:Dagster UI" "OBP_LIVE_PORT:live depth service"; do
    var="${spec%%:*}"; what="${spec#*:}"; port="${!var}"
    if ! [[ "$port" =~ ^[0-9]+$ ]] || (( port < 1 || port > 65535 )); then
        die "$var must be a TCP port number (got '$port')."
    fi
    if port_in_use "$port"; then
        die "port $port ($what) is already in use on 127.0.0.1. Stop whatever uses it, or pick another port: $var=<port> make run"
    fi
done
[[ "$OBP_ANVIL_PORT" != "$DAGSTER_PORT" ]] || die "OBP_ANVIL_PORT and DAGSTER_PORT must differ (both $DAGSTER_PORT)."

# --------------------------------------------------------- bootstrap ----
bash scripts/bootstrap.sh
PY="$ROOT/.venv/bin/python"

# --------------------------------------------------------------- logs ----
LOGS="$ROOT/.run/logs"
mkdir -p "$LOGS/previous" "$ROOT/.run/procs"
find "$LOGS" -maxdepth 1 -name '*.log' -exec mv -f {} "$LOGS/previous/" \;
rm -f "$ROOT"/.run/procs/*.pid
SETUP_LOG="$LOGS/setup.log"
: >"$SETUP_LOG"
# run a setup step with its output in setup.log; on failure show its last lines
quietly() {
    local what="$1"; shift
    printf '\n### %s: %s\n' "$what" "$*" >>"$SETUP_LOG"
    if ! "$@" >>"$SETUP_LOG" 2>&1; then
        tail -n 25 "$SETUP_LOG" >&2
        die "$what failed (last lines above; full output in .run/logs/setup.log)"
    fi
}

# ---------------------------------------------- postgres, redis + cleanup ----
PG_WAS_RUNNING=0
bash scripts/ensure_postgres.sh --status 2>/dev/null && PG_WAS_RUNNING=1
REDIS_WAS_OURS=0
[[ -f .run/redis.pid ]] && REDIS_WAS_OURS=1

# shellcheck disable=SC2317  # invoked via trap
cleanup() {
    local rc=$?
    if (( PG_WAS_RUNNING == 0 )) && bash scripts/ensure_postgres.sh --status 2>/dev/null; then
        log "stopping the project-local PostgreSQL started by run.sh"
        bash scripts/ensure_postgres.sh --stop >>"$SETUP_LOG" 2>&1 || true
    fi
    if (( REDIS_WAS_OURS == 0 )) && [[ -f .run/redis.pid ]]; then
        bash scripts/ensure_redis.sh --stop >>"$SETUP_LOG" 2>&1 || true
    fi
    exit "$rc"
}
trap cleanup EXIT
# Ctrl-C during the setup: stop quietly (the EXIT trap still stops what this script started)
trap 'printf "\n" >&2; log "interrupted during setup"; exit 0' INT

DATABASE_URL="$(bash scripts/ensure_postgres.sh | tail -n 1)"
[[ -n "$DATABASE_URL" ]] || die "scripts/ensure_postgres.sh printed no DATABASE_URL."
export DATABASE_URL
REDIS_URL="$(bash scripts/ensure_redis.sh | tail -n 1)"
[[ -n "$REDIS_URL" ]] || die "scripts/ensure_redis.sh printed no REDIS_URL."
export REDIS_URL

export PATH="$ROOT/.venv/bin:$PATH"
export OBP_ANVIL="${OBP_ANVIL:-$ROOT/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil}"
export OBP_CONFIG="$ROOT/.run/devchain.yaml"
export OBP_RPC_URL="http://127.0.0.1:$OBP_ANVIL_PORT"
export DAGSTER_HOME="$ROOT/.run/dagster_home"
export OBP_RUN_DIR="$ROOT/.run"
# Dagster's calls to its code server time out after 60 s; on a 2-core machine that is also running a test suite,
# loading the definitions for a run launch took longer, and the daemon gave up on the run (marked failed).
export DAGSTER_GRPC_TIMEOUT_SECONDS="${DAGSTER_GRPC_TIMEOUT_SECONDS:-180}"

# ---------------------------------------------------------- databases ----
# The dev chain starts empty on every run, so its databases do too: stored hashes of the previous chain would
# (rightly) trip the reorg guard, and Dagster's old run keys would suppress the new ranges.
quietly "orderbook db init --reset" orderbook db init --reset
log "database reset and migrated (output in .run/logs/setup.log)"

# Dagster's own storage: a separate database on the same server.
DAGSTER_PG_URL="$("$PY" - "$DATABASE_URL" "$DAGSTER_DB" 2>>"$SETUP_LOG" <<'PY'
import sys

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

url, name = make_url(sys.argv[1]), sys.argv[2]
admin = url.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
print(url.set(drivername="postgresql+psycopg2", database=name).render_as_string(hide_password=False))
PY
)" || { tail -n 15 "$SETUP_LOG" >&2; die "could not create the Dagster storage database '$DAGSTER_DB' (see above)."; }
log "fresh database $DAGSTER_DB for Dagster's storage"

mkdir -p "$DAGSTER_HOME"
(umask 077 && "$PY" - "$DAGSTER_PG_URL" >"$DAGSTER_HOME/dagster.yaml" <<'PY'
import sys

import yaml

print("# Generated by scripts/run.sh on every start; edits are overwritten.")
print(yaml.safe_dump({
    "storage": {"postgres": {"postgres_url": sys.argv[1]}},
    "run_coordinator": {"module": "dagster._core.run_coordinator", "class": "QueuedRunCoordinator"},
    # Ranges run concurrently (convergent, idempotent writes); the rpc pool caps range ops in flight. One
    # analytics run at a time (jobs.py tags): the embedded DuckDB file has a single writer, and twelve runs waiting
    # for its lock held every run slot while the chain's ranges queued behind them.
    "concurrency": {"runs": {"max_concurrent_runs": 4,
                             "tag_concurrency_limits": [{"key": "obp/kind", "value": "analytics", "limit": 1}]},
                    "pools": {"default_limit": 2}},
    # Sensor/schedule ticks would otherwise be kept forever; runs are purged by the purge_dagster_runs job.
    "retention": {"sensor": {"purge_after_days": {"skipped": 1, "failure": 30, "success": 7}},
                  "schedule": {"purge_after_days": {"skipped": 1, "failure": 30, "success": 7}}},
    "telemetry": {"enabled": False},
}, sort_keys=False), end="")
PY
) || die "could not write $DAGSTER_HOME/dagster.yaml."

# The chain starts empty every time: drop the previous deployment's config so that
# `orderbook wait-config` waits for the fresh one.
rm -f "$OBP_CONFIG"

redact() { sed -E 's#(://[^:/@]+):[^@]*@#\1:***@#' <<<"$1"; }
cat >&2 <<BANNER

================================================================================
  orderbook local stack
    Dagster UI : http://127.0.0.1:$DAGSTER_PORT   (after contracts are deployed)
    Live depth : ws://127.0.0.1:$OBP_LIVE_PORT/ws  REST http://127.0.0.1:$OBP_LIVE_PORT/api/markets/summary
    Chain RPC  : $OBP_RPC_URL   (anvil, chain id 31337)
    Database   : $(redact "$DATABASE_URL")   (Dagster storage: $DAGSTER_DB)
    Redis      : $(redact "$REDIS_URL")
    Config     : ${OBP_CONFIG#"$ROOT"/}  (written by the sim process)
    Logs       : .run/logs/<process>.log   (the terminal shows errors and a status line)
  Ctrl-C stops everything.
================================================================================

BANNER

trap - INT
rc=0
supervise "$ROOT/Procfile" || rc=$?

# One line on how Dagster's runs ended (a stop must not leave FAILURE behind).
"$PY" - "$DAGSTER_PG_URL" 2>>"$SETUP_LOG" <<'PY' || true
import sys

import psycopg
from sqlalchemy.engine import make_url

url = make_url(sys.argv[1]).set(drivername="postgresql").render_as_string(hide_password=False)
with psycopg.connect(url, connect_timeout=5) as conn:
    rows = conn.execute("SELECT status, count(*) FROM runs GROUP BY status ORDER BY status").fetchall()
print("[run] Dagster runs of this session: " + (", ".join(f"{n} {s.lower()}" for s, n in rows) or "none"))
PY
# This dev chain is gone for good (the next one gets another Redis prefix): remove its keys, and only its keys.
prefix="$(grep -ho 'Redis keys and channels under obp:[0-9]*:[0-9a-f]*:' "$LOGS/live.log" 2>/dev/null | tail -n 1 \
          | awk '{print $NF}')" || true
if [[ -n "$prefix" ]]; then
    "$PY" - "$REDIS_URL" "$prefix" 2>>"$SETUP_LOG" <<'PY' || true
import sys

import redis

r = redis.Redis.from_url(sys.argv[1], socket_timeout=5, socket_connect_timeout=5)
keys = list(r.scan_iter(match=sys.argv[2] + "*", count=1000))
for i in range(0, len(keys), 500):
    r.delete(*keys[i : i + 500])
print(f"[run] removed this dev chain's {len(keys)} Redis keys ({sys.argv[2]}*)")
PY
fi
if (( rc == 0 )); then
    log "stopped; logs in .run/logs/"
else
    log "a process stopped unexpectedly (exit $rc): see the lines above and .run/logs/"
fi
exit "$rc"
