#!/usr/bin/env bash
# Make sure a ClickHouse HTTP interface answers and print CLICKHOUSE_URL (last line of stdout); diagnostics on
# stderr. Exits non-zero (with the reason) when no server can be had: callers then skip the ClickHouse tests.
#
#   scripts/ensure_clickhouse.sh          $CLICKHOUSE_URL if set (must answer /ping), else 127.0.0.1:$PORT,
#                                         starting clickhouse-server there in .run/clickhouse if nothing answers
#                                         (as root: apt-get install --no-install-recommends clickhouse-server)
#   scripts/ensure_clickhouse.sh --stop   stop a server this script started (pidfile .run/clickhouse/server.pid)
# Env: CLICKHOUSE_URL, OBP_CLICKHOUSE_PORT (HTTP, default 8123), OBP_CLICKHOUSE_TCP_PORT (default 19000).
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
DIR="$ROOT/.run/clickhouse"
PIDFILE="$DIR/server.pid"
HOST=127.0.0.1
PORT="${OBP_CLICKHOUSE_PORT:-8123}"
TCP_PORT="${OBP_CLICKHOUSE_TCP_PORT:-19000}"

log() { printf '[clickhouse] %s\n' "$*" >&2; }
die() { printf '[clickhouse] %s\n' "$*" >&2; exit 1; }
ping_ok() { [[ "$(curl -fsS --max-time 3 "$1/ping" 2>/dev/null || true)" == Ok* ]]; }

case "${1:-}" in
    --stop)
        if [[ -f "$PIDFILE" ]]; then
            pid="$(cat "$PIDFILE")"
            if [[ "$pid" =~ ^[0-9]+$ ]] && [[ "$(cat "/proc/$pid/comm" 2>/dev/null)" == clickhouse* ]]; then
                log "stopping clickhouse-server (pid $pid) started by this script"
                kill "$pid"
                for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
            fi
            rm -f "$PIDFILE"
        else
            log "no clickhouse-server started by this script (no $PIDFILE)"
        fi
        exit 0 ;;
    "") ;;
    *) die "unknown argument '$1' (use --stop or no argument)" ;;
esac

command -v curl >/dev/null 2>&1 || die "curl is needed to ping ClickHouse; install curl."

if [[ -n "${CLICKHOUSE_URL:-}" ]]; then
    base="$(sed -E 's#^(https?://[^/]+).*#\1#' <<<"$CLICKHOUSE_URL")"
    ping_ok "$base" || die "ClickHouse at CLICKHOUSE_URL does not answer $base/ping; fix it or unset CLICKHOUSE_URL."
    log "using CLICKHOUSE_URL from the environment"
    printf '%s\n' "$CLICKHOUSE_URL"
    exit 0
fi

# A server that answers /ping may still be unusable: one this script started for another checkout whose
# directory was deleted since keeps answering but cannot create a database. Probe with a real write.
writes_ok() {
    curl -fsS --max-time 5 --data-binary "CREATE DATABASE IF NOT EXISTS obp_probe" "$1/" >/dev/null 2>&1 &&
        curl -fsS --max-time 5 --data-binary "DROP DATABASE IF EXISTS obp_probe" "$1/" >/dev/null 2>&1
}

URL="http://$HOST:$PORT"
if ping_ok "$URL"; then
    if writes_ok "$URL"; then
        log "using the ClickHouse at $URL"
        printf '%s\n' "$URL"
        exit 0
    fi
    orphans=""
    for pid in $(pgrep -f 'clickhouse.*--config-file=.*/\.run/clickhouse/config\.xml' || true); do
        cfg="$(tr '\0' '\n' <"/proc/$pid/cmdline" 2>/dev/null | sed -n 's/^--config-file=//p' | head -n 1)"
        [[ -n "$cfg" && ! -f "$cfg" ]] && orphans="$orphans $pid"
    done
    [[ -n "$orphans" ]] || die "the ClickHouse at $URL answers /ping but cannot create a database; fix it, or set
  CLICKHOUSE_URL / OBP_CLICKHOUSE_PORT to another server."
    log "stopping an orphaned clickhouse-server (pid$orphans: its checkout and data directory are gone)"
    # shellcheck disable=SC2086
    kill $orphans
    for _ in $(seq 1 100); do ping_ok "$URL" || break; sleep 0.1; done
    ping_ok "$URL" && die "the orphaned clickhouse-server at $URL did not stop"
fi

find_server() {
    if command -v clickhouse-server >/dev/null 2>&1; then echo "clickhouse-server"; return; fi
    [[ -x /usr/sbin/clickhouse-server ]] && { echo /usr/sbin/clickhouse-server; return; }
    if command -v clickhouse >/dev/null 2>&1; then echo "clickhouse server"; return; fi
    return 1
}

if ! SERVER="$(find_server)"; then
    if [[ $EUID -ne 0 ]] || ! command -v apt-get >/dev/null 2>&1; then
        die "no ClickHouse answers at $URL and clickhouse-server is not installed (and cannot be: needs root + apt-get).
  Install it (Debian: apt-get install clickhouse-server) or export CLICKHOUSE_URL=http://HOST:8123."
    fi
    export DEBIAN_FRONTEND=noninteractive
    log "installing Debian's clickhouse-server (apt-get, no recommends)"
    # Try without refreshing the index first (fast when the lists are current); refresh only if that fails.
    if ! timeout 300 apt-get install -y --no-install-recommends clickhouse-server >&2; then
        timeout 300 apt-get update >&2 || die "apt-get update failed; no ClickHouse for this run."
        timeout 300 apt-get install -y --no-install-recommends clickhouse-server >&2 \
            || die "apt-get install clickhouse-server failed (see above); no ClickHouse for this run."
    fi
    SERVER="$(find_server)" || die "clickhouse-server installed but not found on PATH."
fi

if timeout 2 bash -c "exec 3<>/dev/tcp/$HOST/$PORT" 2>/dev/null; then
    die "port $PORT on $HOST is taken by something that is not ClickHouse; free it, set OBP_CLICKHOUSE_PORT or CLICKHOUSE_URL."
fi

mkdir -p "$DIR/data" "$DIR/tmp" "$DIR/user_files" "$DIR/format_schemas"
cat >"$DIR/config.xml" <<XML
<?xml version="1.0"?>
<!-- Generated by scripts/ensure_clickhouse.sh: a project-local, loopback-only server for tests and dev. -->
<yandex>
    <logger><level>warning</level><log>$DIR/server.log</log><errorlog>$DIR/server.err.log</errorlog></logger>
    <http_port>$PORT</http_port>
    <tcp_port>$TCP_PORT</tcp_port>
    <listen_host>$HOST</listen_host>
    <path>$DIR/data/</path>
    <tmp_path>$DIR/tmp/</tmp_path>
    <user_files_path>$DIR/user_files/</user_files_path>
    <format_schema_path>$DIR/format_schemas/</format_schema_path>
    <users_config>$DIR/users.xml</users_config>
    <default_profile>default</default_profile>
    <default_database>default</default_database>
    <timezone>UTC</timezone>
    <mark_cache_size>536870912</mark_cache_size>
    <uncompressed_cache_size>536870912</uncompressed_cache_size>
    <mlock_executable>false</mlock_executable>
</yandex>
XML
cat >"$DIR/users.xml" <<'XML'
<?xml version="1.0"?>
<yandex>
    <profiles><default><max_memory_usage>4000000000</max_memory_usage></default></profiles>
    <users><default><password></password><networks><ip>127.0.0.1</ip><ip>::1</ip></networks>
        <profile>default</profile><quota>default</quota></default></users>
    <quotas><default></default></quotas>
</yandex>
XML
log "starting $SERVER on $URL (data: $DIR, log: $DIR/server.err.log)"
# shellcheck disable=SC2086  # "clickhouse server" is two words on purpose
$SERVER --config-file="$DIR/config.xml" --pid-file="$PIDFILE" --daemon >&2 \
    || die "clickhouse-server failed to start; see $DIR/server.err.log."
for _ in $(seq 1 100); do
    if ping_ok "$URL"; then
        printf '%s\n' "$URL"
        exit 0
    fi
    sleep 0.2
done
die "clickhouse-server did not answer $URL/ping within 20s; see $DIR/server.err.log."
