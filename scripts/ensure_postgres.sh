#!/usr/bin/env bash
# Make sure a PostgreSQL server is reachable and print its DATABASE_URL (last line of stdout).
# All diagnostics go to stderr.
#
#   scripts/ensure_postgres.sh            print a DATABASE_URL, starting a project-local cluster if needed
#   scripts/ensure_postgres.sh --status   exit 0 iff the project-local cluster is running
#   scripts/ensure_postgres.sh --stop     stop the project-local cluster (only one this script started)
#   scripts/ensure_postgres.sh --purge    --stop, then delete its data directory
#
# Order of preference:
#   1. $DATABASE_URL, used as is (it must answer);
#   2. a server at 127.0.0.1:5432 accepting password-less login as `postgres`
#      -> postgresql://postgres@127.0.0.1:5432/orderbook   (skip with OBP_PG_FORCE_LOCAL=1);
#   3. a project-local cluster in .run/pgdata (trust auth, 127.0.0.1:${OBP_PG_LOCAL_PORT:-55432},
#      socket dir .run/pgsock, log .run/postgres.log), installing Debian's `postgresql` package
#      with apt-get when the server binaries are missing and we are root.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
RUN_DIR="$ROOT/.run"
LOCAL_PORT="${OBP_PG_LOCAL_PORT:-55432}"
DB_NAME="${OBP_PG_DB:-orderbook}"
VPY="$ROOT/.venv/bin/python"

log() { printf '[postgres] %s\n' "$*" >&2; }
die() { printf '[postgres] ERROR: %s\n' "$*" >&2; exit 1; }

[[ "$LOCAL_PORT" =~ ^[0-9]+$ ]] || die "OBP_PG_LOCAL_PORT must be a port number (got '$LOCAL_PORT')."

# Where the local cluster lives. Normally .run/; when running as root and the `postgres` OS user
# cannot reach the checkout (e.g. it lives under /root), a directory under /var/tmp is used
# instead and recorded in .run/pg.base.
pg_base() {
    if [[ -f "$RUN_DIR/pg.base" ]]; then cat "$RUN_DIR/pg.base"; else printf '%s\n' "$RUN_DIR"; fi
}
PG_BASE="$(pg_base)"
PGDATA_DIR="$PG_BASE/pgdata"
LOG_FILE="$PG_BASE/postgres.log"

# ------------------------------------------------------------ binaries ----
PGBIN=""          # directory holding initdb + pg_ctl (+ postgres)
find_pg_bin() {
    local i p d
    i="$(command -v initdb 2>/dev/null || true)"
    p="$(command -v pg_ctl 2>/dev/null || true)"
    if [[ -n "$i" && -n "$p" ]]; then
        # resolve symlinks (e.g. /usr/local/bin/initdb -> /usr/lib/postgresql/15/bin/initdb)
        d="$(dirname "$(readlink -f "$p")")"
        if [[ -x "$d/initdb" && -x "$d/pg_ctl" ]]; then PGBIN="$d"; return 0; fi
    fi
    while IFS= read -r d; do
        if [[ -x "$d/initdb" && -x "$d/pg_ctl" && -x "$d/postgres" ]]; then PGBIN="$d"; return 0; fi
    done < <(for d in /usr/lib/postgresql/*/bin /usr/pgsql-*/bin; do [[ -d "$d" ]] && printf '%s\n' "$d"; done | sort -V -r)
    return 1
}

pg_isready_bin() {
    if command -v pg_isready >/dev/null 2>&1 && pg_isready --version >/dev/null 2>&1; then
        command -v pg_isready; return 0
    fi
    if [[ -n "$PGBIN" && -x "$PGBIN/pg_isready" ]]; then printf '%s\n' "$PGBIN/pg_isready"; return 0; fi
    if find_pg_bin && [[ -x "$PGBIN/pg_isready" ]]; then printf '%s\n' "$PGBIN/pg_isready"; return 0; fi
    return 1
}

have_psycopg() { [[ -x "$VPY" ]] && "$VPY" -c 'import psycopg' >/dev/null 2>&1; }

# libpq wants postgresql://, SQLAlchemy URLs may carry a driver (postgresql+psycopg://).
libpq_url() { sed -E 's#^postgres(ql)?(\+[A-Za-z0-9_]+)?://#postgresql://#' <<<"$1"; }

# Does a postgres server accept connections at host:port? (no auth involved)
pg_answers() {
    local host="$1" port="$2" isready
    if isready="$(pg_isready_bin)"; then
        "$isready" -q -h "$host" -p "$port" -t 3 >/dev/null 2>&1
    else
        timeout 3 bash -c "exec 3<>/dev/tcp/$host/$port" >/dev/null 2>&1
    fi
}

# Can we log in with this URL? A missing database counts as success (it is created later).
# Returns 0 ok, 1 failed (reason on stderr), 2 could not check.
pg_login() {
    local url; url="$(libpq_url "$1")"
    if have_psycopg; then
        "$VPY" - "$url" <<'PY'
import sys
import psycopg
try:
    psycopg.connect(sys.argv[1], connect_timeout=5).close()
except psycopg.OperationalError as exc:
    msg = str(exc).strip()
    if "does not exist" in msg and "database" in msg:
        sys.exit(0)
    print(msg, file=sys.stderr)
    sys.exit(1)
PY
        return $?
    fi
    if command -v psql >/dev/null 2>&1; then
        local out
        if out="$(PGCONNECT_TIMEOUT=5 psql -w -X -Atq -c 'select 1' "$url" 2>&1 >/dev/null)"; then return 0; fi
        [[ "$out" == *database*"does not exist"* ]] && return 0
        printf '%s\n' "$out" >&2
        return 1
    fi
    return 2
}

# ------------------------------------------------- local cluster helpers ----
run_as_pg() {  # run a command as the cluster's OS user (postgres refuses to run as root)
    if [[ $EUID -eq 0 ]]; then
        (cd / && runuser -u postgres -- "$@" 9>&-)
    else
        "$@" 9>&-   # fd 9 holds our flock; the postmaster must not inherit it
    fi
}

local_running() {
    [[ -f "$PGDATA_DIR/postmaster.pid" ]] || return 1
    find_pg_bin || return 1
    run_as_pg "$PGBIN/pg_ctl" -D "$PGDATA_DIR" status >/dev/null 2>&1
}

stop_local() {
    if [[ ! -f "$PGDATA_DIR/postmaster.pid" ]]; then
        log "no project-local cluster running (no $PGDATA_DIR/postmaster.pid)"
        return 0
    fi
    find_pg_bin || die "cannot find pg_ctl to stop the cluster in $PGDATA_DIR; stop it by hand: kill \$(head -1 $PGDATA_DIR/postmaster.pid)"
    if run_as_pg "$PGBIN/pg_ctl" -D "$PGDATA_DIR" status >/dev/null 2>&1; then
        log "stopping project-local cluster ($PGDATA_DIR)"
        run_as_pg "$PGBIN/pg_ctl" -D "$PGDATA_DIR" -m fast -w -t 60 stop >&2 \
            || die "pg_ctl stop failed; see $LOG_FILE"
    else
        log "project-local cluster is not running (stale postmaster.pid)"
    fi
}

install_postgres() {
    if [[ $EUID -ne 0 ]]; then
        die "PostgreSQL server binaries (initdb, pg_ctl) not found and not running as root.
  Either install them (Debian/Ubuntu: sudo apt-get install -y postgresql),
  or start a PostgreSQL server yourself and export DATABASE_URL=postgresql://USER@HOST:PORT/orderbook."
    fi
    command -v apt-get >/dev/null 2>&1 \
        || die "PostgreSQL server binaries not found and apt-get is unavailable; install PostgreSQL (initdb/pg_ctl) or set DATABASE_URL."
    log "PostgreSQL server binaries not found; installing Debian's 'postgresql' package (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update >&2 || die "apt-get update failed; check network/apt sources, then re-run."
    apt-get install -y postgresql >&2 || die "apt-get install -y postgresql failed (see above)."
    find_pg_bin || die "installed 'postgresql' but still cannot find initdb/pg_ctl under /usr/lib/postgresql/*/bin."
}

ensure_pg_os_user() {
    [[ $EUID -eq 0 ]] || return 0
    command -v runuser >/dev/null 2>&1 || die "runuser (util-linux) is needed to run PostgreSQL as a non-root user when running as root."
    if ! id -u postgres >/dev/null 2>&1; then
        log "creating system user 'postgres' (initdb refuses to run as root)"
        useradd --system --user-group --no-create-home --home-dir /nonexistent \
            --shell /usr/sbin/nologin postgres \
            || die "could not create the 'postgres' system user; create it (useradd -r postgres) or run as a normal user."
    fi
}

# As root, decide where the cluster lives (the postgres user must be able to reach it).
choose_base_as_root() {
    [[ $EUID -eq 0 ]] || return 0
    [[ -f "$RUN_DIR/pg.base" ]] && return 0
    mkdir -p "$RUN_DIR"
    if (cd / && runuser -u postgres -- test -x "$RUN_DIR") 2>/dev/null; then
        return 0
    fi
    local alt
    alt="/var/tmp/orderbook-pg-$(printf '%s' "$ROOT" | sha256sum | cut -c1-12)"
    log "the 'postgres' OS user cannot reach $RUN_DIR (parent directory permissions); using $alt instead"
    mkdir -p "$alt"
    printf '%s\n' "$alt" >"$RUN_DIR/pg.base"
    PG_BASE="$alt"; PGDATA_DIR="$PG_BASE/pgdata"; LOG_FILE="$PG_BASE/postgres.log"
}

start_local() {
    find_pg_bin || install_postgres
    ensure_pg_os_user
    choose_base_as_root
    local sock_dir="$PG_BASE/pgsock"
    if (( ${#sock_dir} + 20 > 100 )); then   # unix socket paths are limited to ~107 bytes
        sock_dir="/tmp/obp-pgsock-$(printf '%s' "$ROOT" | sha256sum | cut -c1-12)"
    fi
    mkdir -p "$PG_BASE" "$sock_dir"
    [[ $EUID -eq 0 ]] && chown postgres: "$sock_dir"
    chmod 0700 "$sock_dir"

    if [[ ! -s "$PGDATA_DIR/PG_VERSION" ]]; then
        log "initialising project-local cluster in $PGDATA_DIR ($("$PGBIN/postgres" --version 2>/dev/null || echo "$PGBIN"))"
        rm -rf "$PGDATA_DIR"
        mkdir -p "$PGDATA_DIR"
        [[ $EUID -eq 0 ]] && chown postgres: "$PGDATA_DIR"
        chmod 0700 "$PGDATA_DIR"
        run_as_pg "$PGBIN/initdb" -D "$PGDATA_DIR" -U postgres --auth=trust \
            --encoding=UTF8 --no-locale >"$PG_BASE/initdb.log" 2>&1 \
            || { cat "$PG_BASE/initdb.log" >&2; die "initdb failed (log above, also in $PG_BASE/initdb.log)."; }
        cat >>"$PGDATA_DIR/postgresql.conf" <<CONF

# --- project-local development cluster (scripts/ensure_postgres.sh) ---
listen_addresses = '127.0.0.1'
port = $LOCAL_PORT
unix_socket_directories = '$sock_dir'
max_connections = 200
synchronous_commit = off
CONF
    else
        # the port / socket dir may have changed since initdb
        sed -i -E "s#^port = [0-9]+\$#port = $LOCAL_PORT#; s#^unix_socket_directories = .*#unix_socket_directories = '$sock_dir'#" \
            "$PGDATA_DIR/postgresql.conf"
    fi

    if pg_answers 127.0.0.1 "$LOCAL_PORT"; then
        die "port $LOCAL_PORT is already used by another server; set OBP_PG_LOCAL_PORT to a free port (or set DATABASE_URL)."
    fi
    touch "$LOG_FILE"
    [[ $EUID -eq 0 ]] && chown postgres: "$LOG_FILE"
    log "starting project-local cluster on 127.0.0.1:$LOCAL_PORT (log: $LOG_FILE)"
    if ! run_as_pg "$PGBIN/pg_ctl" -D "$PGDATA_DIR" -l "$LOG_FILE" -w -t 60 start >&2; then
        tail -n 20 "$LOG_FILE" >&2 || true
        die "pg_ctl start failed (last log lines above, full log: $LOG_FILE)."
    fi
}

wait_ready() {
    local host="$1" port="$2" i
    for i in $(seq 1 60); do
        pg_answers "$host" "$port" && return 0
        sleep 0.5
    done
    return 1
}

# ------------------------------------------------------------------ main ----
case "${1:-}" in
    --status) local_running; exit $? ;;
    --stop)   stop_local; exit 0 ;;
    --purge)
        stop_local
        if [[ "$PG_BASE" != "$RUN_DIR" ]]; then rm -rf "$PG_BASE"; fi
        rm -rf "$RUN_DIR/pgdata" "$RUN_DIR/pgsock" "$RUN_DIR/pg.base"
        log "project-local cluster data removed"
        exit 0 ;;
    "") ;;
    -h|--help) sed -n '2,17p' "$0" | sed 's/^# \{0,1\}//' >&2; exit 0 ;;
    *) die "unknown argument '$1' (use --status, --stop, --purge or no argument)" ;;
esac

# 1. explicit DATABASE_URL
if [[ -n "${DATABASE_URL:-}" ]]; then
    log "using DATABASE_URL from the environment"
    rc=0; pg_login "$DATABASE_URL" || rc=$?
    if [[ $rc -eq 2 ]]; then
        isready="$(pg_isready_bin)" \
            || die "cannot check DATABASE_URL: neither the project venv (psycopg; run scripts/bootstrap.sh) nor pg_isready/psql is available."
        "$isready" -q -t 5 -d "$(libpq_url "$DATABASE_URL")" && rc=0 || rc=1
    fi
    [[ $rc -eq 0 ]] || die "the server in DATABASE_URL does not answer or refuses the login (details above).
  Fix the URL/server, or unset DATABASE_URL to use a local server."
    printf '%s\n' "$DATABASE_URL"
    exit 0
fi

# 2. a server already listening on the default port
if [[ -z "${OBP_PG_FORCE_LOCAL:-}" ]] && pg_answers 127.0.0.1 5432; then
    rc=0; pg_login "postgresql://postgres@127.0.0.1:5432/postgres" 2>/dev/null || rc=$?
    if [[ $rc -eq 0 || $rc -eq 2 ]]; then
        log "using the server at 127.0.0.1:5432"
        printf '%s\n' "postgresql://postgres@127.0.0.1:5432/$DB_NAME"
        exit 0
    fi
    log "a server answers at 127.0.0.1:5432 but refuses password-less login as 'postgres'; using a project-local cluster instead (export DATABASE_URL to use that server)"
fi

# 3. project-local cluster
mkdir -p "$RUN_DIR"
if command -v flock >/dev/null 2>&1; then
    exec 9>"$RUN_DIR/.pg.lock"
    flock -w 180 9 || die "timed out waiting for another ensure_postgres.sh run (lock $RUN_DIR/.pg.lock)."
fi
if local_running; then
    log "project-local cluster already running ($PGDATA_DIR)"
else
    start_local
fi
wait_ready 127.0.0.1 "$LOCAL_PORT" \
    || die "project-local cluster does not answer on 127.0.0.1:$LOCAL_PORT; see $LOG_FILE."
printf '%s\n' "postgresql://postgres@127.0.0.1:$LOCAL_PORT/$DB_NAME"
