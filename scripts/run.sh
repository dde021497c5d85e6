#!/usr/bin/env bash
# `make run`: the whole local stack in one terminal, via honcho and the Procfile:
#   chain   - anvil devchain on 127.0.0.1:$OBP_ANVIL_PORT (default 8545)
#   sim     - `orderbook devchain up`: deploys the reference contracts, writes $OBP_CONFIG,
#             then runs the seeded order-flow simulator
#   dagster - `dagster dev` (UI + daemon) on 127.0.0.1:$DAGSTER_PORT (default 3000), once $OBP_CONFIG exists
#   live    - live depth service (WebSocket + REST) on 127.0.0.1:$OBP_LIVE_PORT (default 8080)
# Postgres comes from scripts/ensure_postgres.sh (DATABASE_URL, 127.0.0.1:5432 or a project-local
# cluster), Redis from scripts/ensure_redis.sh. Ctrl-C stops everything, including a project-local
# Postgres/Redis that this script started.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

log() { printf '[run] %s\n' "$*" >&2; }
die() { printf '[run] ERROR: %s\n' "$*" >&2; exit 1; }

export OBP_ANVIL_PORT="${OBP_ANVIL_PORT:-8545}"
export DAGSTER_PORT="${DAGSTER_PORT:-3000}"
export OBP_LIVE_PORT="${OBP_LIVE_PORT:-8080}"
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

# ---------------------------------------------- postgres, redis + cleanup ----
PG_WAS_RUNNING=0
bash scripts/ensure_postgres.sh --status 2>/dev/null && PG_WAS_RUNNING=1
REDIS_WAS_OURS=0
[[ -f .run/redis.pid ]] && REDIS_WAS_OURS=1
STARTED_SERVICES=0

# shellcheck disable=SC2317  # invoked via trap
cleanup() {
    local rc=$?
    if (( PG_WAS_RUNNING == 0 )) && bash scripts/ensure_postgres.sh --status 2>/dev/null; then
        log "stopping the project-local PostgreSQL started by run.sh"
        bash scripts/ensure_postgres.sh --stop || true
    fi
    if (( REDIS_WAS_OURS == 0 )) && [[ -f .run/redis.pid ]]; then
        bash scripts/ensure_redis.sh --stop || true
    fi
    exit "$rc"
}
trap cleanup EXIT

DATABASE_URL="$(bash scripts/ensure_postgres.sh | tail -n 1)"
[[ -n "$DATABASE_URL" ]] || die "scripts/ensure_postgres.sh printed no DATABASE_URL."
export DATABASE_URL
REDIS_URL="$(bash scripts/ensure_redis.sh | tail -n 1)"
[[ -n "$REDIS_URL" ]] || die "scripts/ensure_redis.sh printed no REDIS_URL."
export REDIS_URL
if (( PG_WAS_RUNNING == 0 )) && bash scripts/ensure_postgres.sh --status 2>/dev/null; then STARTED_SERVICES=1; fi
if (( REDIS_WAS_OURS == 0 )) && [[ -f .run/redis.pid ]]; then STARTED_SERVICES=1; fi

export PATH="$ROOT/.venv/bin:$PATH"
export OBP_ANVIL="${OBP_ANVIL:-$ROOT/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil}"
export OBP_CONFIG="$ROOT/.run/devchain.yaml"
export OBP_RPC_URL="http://127.0.0.1:$OBP_ANVIL_PORT"
export DAGSTER_HOME="$ROOT/.run/dagster_home"

# ---------------------------------------------------------- databases ----
# The dev chain starts empty on every run, so its databases do too: stored hashes of the previous chain would
# (rightly) trip the reorg guard, and Dagster's old run keys would suppress the new ranges.
log "orderbook db init --reset"
orderbook db init --reset || die "'orderbook db init' failed (see above); DATABASE_URL=$DATABASE_URL"

# Dagster's own storage: a separate database on the same server.
DAGSTER_PG_URL="$(python - "$DATABASE_URL" "$DAGSTER_DB" <<'PY'
import sys

import psycopg
from psycopg import sql
from sqlalchemy.engine import make_url

url, name = make_url(sys.argv[1]), sys.argv[2]
admin = url.set(drivername="postgresql", database="postgres").render_as_string(hide_password=False)
with psycopg.connect(admin, autocommit=True, connect_timeout=10) as conn:
    conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
    conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    print(f"[run] created a fresh database {name} for Dagster's storage", file=sys.stderr)
print(url.set(drivername="postgresql+psycopg2", database=name).render_as_string(hide_password=False))
PY
)" || die "could not create/check the Dagster storage database '$DAGSTER_DB' (see above)."

mkdir -p "$DAGSTER_HOME"
(umask 077 && python - "$DAGSTER_PG_URL" >"$DAGSTER_HOME/dagster.yaml" <<'PY'
import sys

import yaml

print("# Generated by scripts/run.sh on every start; edits are overwritten.")
print(yaml.safe_dump({
    "storage": {"postgres": {"postgres_url": sys.argv[1]}},
    "run_coordinator": {"module": "dagster._core.run_coordinator", "class": "QueuedRunCoordinator"},
    # Ranges run concurrently (convergent, idempotent writes); the rpc pool caps range ops in flight.
    "concurrency": {"runs": {"max_concurrent_runs": 4}, "pools": {"default_limit": 2}},
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
  Ctrl-C stops everything.
================================================================================

BANNER

if (( STARTED_SERVICES == 0 )); then
    trap - EXIT
    exec honcho start -f "$ROOT/Procfile"
fi

# We started Postgres/Redis: keep this shell alive to stop them when honcho exits.
honcho start -f "$ROOT/Procfile" &
HONCHO_PID=$!
trap 'kill -TERM "$HONCHO_PID" 2>/dev/null || true' INT TERM HUP
rc=0
while :; do
    wait "$HONCHO_PID" && rc=0 || rc=$?
    kill -0 "$HONCHO_PID" 2>/dev/null || break
done
exit "$rc"
