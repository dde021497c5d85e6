#!/usr/bin/env bash
# Make sure Redis answers and print REDIS_URL (last line of stdout); diagnostics on stderr.
#
#   scripts/ensure_redis.sh          use $REDIS_URL if set (must answer), else 127.0.0.1:6379,
#                                    starting redis-server there if nothing answers
#                                    (apt-get install -y redis-server when missing and root)
#   scripts/ensure_redis.sh --stop   stop a redis-server this script started (pidfile .run/redis.pid)
# Env: REDIS_URL (used as is), OBP_REDIS_PORT (default 6379).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR="$ROOT/.run"
PIDFILE="$RUN_DIR/redis.pid"
HOST=127.0.0.1
PORT="${OBP_REDIS_PORT:-6379}"

log() { printf '[redis] %s\n' "$*" >&2; }
die() { printf '[redis] ERROR: %s\n' "$*" >&2; exit 1; }

# PING host port -> 0 if +PONG (redis-cli when available, plain bash otherwise)
redis_ping() {
    local host="$1" port="$2" reply=""
    if command -v redis-cli >/dev/null 2>&1; then
        reply="$(timeout 3 redis-cli -h "$host" -p "$port" ping 2>/dev/null || true)"
        [[ "$reply" == PONG* ]]
        return
    fi
    reply="$(timeout 3 bash -c "exec 3<>/dev/tcp/$host/$port && printf 'PING\r\n' >&3 && IFS= read -r line <&3 && printf '%s' \"\$line\"" 2>/dev/null || true)"
    [[ "$reply" == +PONG* ]]
}

case "${1:-}" in
    --stop)
        if [[ -f "$PIDFILE" ]]; then
            pid="$(cat "$PIDFILE")"
            if [[ "$pid" =~ ^[0-9]+$ ]] && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == redis-server* ]]; then
                log "stopping redis-server (pid $pid) started by this script"
                kill "$pid"
                for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            fi
            rm -f "$PIDFILE"
        else
            log "no redis-server started by this script (no $PIDFILE)"
        fi
        exit 0 ;;
    "") ;;
    *) die "unknown argument '$1' (use --stop or no argument)" ;;
esac

if [[ -n "${REDIS_URL:-}" ]]; then
    log "using REDIS_URL from the environment"
    if command -v redis-cli >/dev/null 2>&1; then
        [[ "$(timeout 5 redis-cli -u "$REDIS_URL" ping 2>/dev/null || true)" == PONG* ]] \
            || die "Redis at REDIS_URL does not answer PING; fix it or unset REDIS_URL to use 127.0.0.1:$PORT."
    elif [[ -x "$ROOT/.venv/bin/python" ]]; then
        "$ROOT/.venv/bin/python" -c 'import sys, redis; redis.Redis.from_url(sys.argv[1], socket_timeout=5).ping()' "$REDIS_URL" \
            || die "Redis at REDIS_URL does not answer PING; fix it or unset REDIS_URL to use 127.0.0.1:$PORT."
    fi
    printf '%s\n' "$REDIS_URL"
    exit 0
fi

URL="redis://$HOST:$PORT/0"
if redis_ping "$HOST" "$PORT"; then
    log "using the Redis at $HOST:$PORT"
    printf '%s\n' "$URL"
    exit 0
fi

if ! command -v redis-server >/dev/null 2>&1; then
    if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        die "nothing answers at $HOST:$PORT and redis-server is not installed.
  Install it (Debian/Ubuntu: sudo apt-get install -y redis-server) or export REDIS_URL=redis://HOST:PORT/0."
    fi
    log "redis-server not found; installing Debian's 'redis-server' package (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update >&2 || die "apt-get update failed; check network/apt sources, then re-run."
    apt-get install -y redis-server >&2 || die "apt-get install -y redis-server failed (see above)."
    # the package may have started its own service
    if redis_ping "$HOST" "$PORT"; then
        log "using the Redis started by the package at $HOST:$PORT"
        printf '%s\n' "$URL"
        exit 0
    fi
fi

if timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$PORT" 2>/dev/null; then
    die "port $PORT on $HOST is taken by something that is not a password-less Redis; free it or export REDIS_URL."
fi

mkdir -p "$RUN_DIR"
log "starting redis-server on $HOST:$PORT (log: $RUN_DIR/redis.log)"
redis-server --daemonize yes --bind "$HOST" --port "$PORT" --save "" --appendonly no \
    --dir "$RUN_DIR" --pidfile "$PIDFILE" --logfile "$RUN_DIR/redis.log" >&2 \
    || die "redis-server failed to start; see $RUN_DIR/redis.log."
for _ in $(seq 1 50); do
    if redis_ping "$HOST" "$PORT"; then
        printf '%s\n' "$URL"
        exit 0
    fi
    sleep 0.2
done
die "redis-server did not answer on $HOST:$PORT within 10s; see $RUN_DIR/redis.log."
