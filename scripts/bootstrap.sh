#!/usr/bin/env bash
# Idempotent bootstrap: .venv (Python >= 3.11, uv, requirements.lock, editable project) and node_modules.
# Near no-op when nothing changed: stamp files keyed on sha256 of the inputs.
#   .venv/.bootstrap-stamp        <- requirements.lock + pyproject.toml + uv version
#   node_modules/.bootstrap-stamp <- package-lock.json
# Env knobs: OBP_PYTHON=/path/to/python (interpreter used to create .venv), OBP_BOOTSTRAP_FORCE=1.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$ROOT"

UV_VERSION="0.13.9"
VENV="$ROOT/.venv"
VPY="$VENV/bin/python"
PY_STAMP="$VENV/.bootstrap-stamp"
NPM_STAMP="$ROOT/node_modules/.bootstrap-stamp"
ANVIL="$ROOT/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil"

log() { printf '[bootstrap] %s\n' "$*" >&2; }
die() { printf '[bootstrap] ERROR: %s\n' "$*" >&2; exit 1; }

need_file() { [[ -f "$1" ]] || die "$1 is missing; run this from a complete checkout of the repository."; }
need_file requirements.lock
need_file pyproject.toml
need_file package-lock.json

command -v sha256sum >/dev/null 2>&1 || die "sha256sum not found; install coreutils."

# Prints "major minor" of a python interpreter, or fails.
py_version() { "$1" -c 'import sys; print(sys.version_info[0], sys.version_info[1])' 2>/dev/null; }
py_ok() {
    local v major minor
    v="$(py_version "$1")" || return 1
    read -r major minor <<<"$v"
    (( major == 3 && minor >= 11 ))
}

# ---------------------------------------------------------------- Python ----
py_key="$(cat requirements.lock pyproject.toml | sha256sum | cut -d' ' -f1) uv=$UV_VERSION"

venv_ready() {
    [[ -x "$VPY" ]] && py_ok "$VPY" && [[ -f "$PY_STAMP" ]] \
        && [[ "$(cat "$PY_STAMP")" == "$py_key" ]] && [[ -z "${OBP_BOOTSTRAP_FORCE:-}" ]]
}

if venv_ready; then
    log "Python environment up to date (.venv)"
else
    # 1. an interpreter >= 3.11
    if [[ -x "$VPY" ]] && py_ok "$VPY"; then
        log "reusing existing .venv ($("$VPY" -V 2>&1))"
    else
        if [[ -e "$VENV" ]]; then
            log "existing .venv is broken or too old; recreating it"
            rm -rf "$VENV"
        fi
        PY=""
        for cand in ${OBP_PYTHON:-} python3.11 python3; do
            if command -v "$cand" >/dev/null 2>&1 && py_ok "$(command -v "$cand")"; then
                PY="$(command -v "$cand")"; break
            fi
        done
        if [[ -z "$PY" ]]; then
            found="$(command -v python3 >/dev/null 2>&1 && python3 -V 2>&1 || echo 'no python3 on PATH')"
            die "Python >= 3.11 is required (found: $found). Install it (Debian 12: apt-get install -y python3 python3-venv) or point OBP_PYTHON at a 3.11 interpreter."
        fi
        read -r _maj _min <<<"$(py_version "$PY")"
        if (( _min != 11 )); then
            log "WARNING: $PY is Python 3.$_min; requirements.lock was resolved for 3.11 (set OBP_PYTHON to a 3.11 interpreter if installation fails)"
        fi
        log "creating .venv with $PY ($("$PY" -V 2>&1))"
        if ! "$PY" -m venv "$VENV" >&2; then
            rm -rf "$VENV"
            # Debian/Ubuntu ship venv/ensurepip separately.
            if [[ $EUID -eq 0 && "$PY" == /usr/bin/* ]] && command -v apt-get >/dev/null 2>&1; then
                log "python venv support missing; installing python3.$_min-venv with apt-get"
                export DEBIAN_FRONTEND=noninteractive
                { apt-get update >&2 && apt-get install -y "python3.$_min-venv" >&2; } \
                    || die "apt-get install python3.$_min-venv failed; install it manually and re-run."
                "$PY" -m venv "$VENV" >&2 || { rm -rf "$VENV"; die "creating .venv with $PY failed (see above)."; }
            else
                die "creating .venv with $PY failed (see above). On Debian/Ubuntu install the venv module: sudo apt-get install -y python3.$_min-venv"
            fi
        fi
    fi

    # 2. uv (pinned), installed with the venv's pip (pip honours pip.conf; uv uses its default index)
    if [[ "$("$VENV/bin/uv" --version 2>/dev/null || true)" != "uv $UV_VERSION"* ]]; then
        log "installing uv==$UV_VERSION into .venv"
        "$VPY" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION" >&2 \
            || die "pip install uv==$UV_VERSION failed (network/index problem?). Check that pip can reach a package index, then re-run."
    fi

    # 3. exact dependency set from the lock, then the project itself (editable, no deps)
    log "syncing .venv with requirements.lock (uv pip sync)"
    # --compile-bytecode: with PYTHONDONTWRITEBYTECODE set (common in containers) nothing would ever write the .pyc
    # files, and every process would compile web3, SQLAlchemy and Dagster from source again (about 4 s of CPU).
    "$VENV/bin/uv" pip sync --compile-bytecode --python "$VPY" requirements.lock >&2 \
        || die "uv pip sync requirements.lock failed (see above). If the lock is out of date regenerate it with: uv pip compile pyproject.toml --group dev --generate-hashes --python-version 3.11 -o requirements.lock"
    log "installing the project (editable, --no-deps)"
    "$VENV/bin/uv" pip install --python "$VPY" --no-deps -e . >&2 \
        || die "editable install of the project failed (see above); check pyproject.toml."
    # uv pip sync removes packages that are not in the lock; the venv may have lost uv/pip. Keep uv around.
    if [[ ! -x "$VENV/bin/uv" ]]; then
        "$VPY" -m pip --version >/dev/null 2>&1 || "$VPY" -m ensurepip --upgrade >&2 || true
        "$VPY" -m pip install --quiet --disable-pip-version-check "uv==$UV_VERSION" >&2 || true
    fi
    "$VPY" -c 'import orderbook_pipelines' 2>/dev/null \
        || log "WARNING: 'import orderbook_pipelines' failed in .venv (package not importable yet?)"
    printf '%s\n' "$py_key" >"$PY_STAMP"
    log "Python environment ready ($("$VPY" -V 2>&1))"
fi

# ------------------------------------------------------------------- npm ----
npm_key="$(sha256sum package-lock.json | cut -d' ' -f1)"
if [[ -d node_modules && -f "$NPM_STAMP" && "$(cat "$NPM_STAMP")" == "$npm_key" && -z "${OBP_BOOTSTRAP_FORCE:-}" ]]; then
    log "node_modules up to date"
else
    command -v node >/dev/null 2>&1 || die "node not found. Install Node.js >= 20 (with npm), e.g. Debian: apt-get install -y nodejs npm, then re-run."
    command -v npm >/dev/null 2>&1 || die "npm not found. Install npm (Debian: apt-get install -y npm), then re-run."
    node_major="$(node -p 'process.versions.node.split(".")[0]' 2>/dev/null || echo 0)"
    (( node_major >= 18 )) || die "Node.js >= 18 required (found $(node --version 2>/dev/null)); install Node.js 20."
    log "installing npm packages (npm ci)"
    npm ci --no-audit --no-fund >&2 \
        || die "npm ci failed (see above). Check network access to the npm registry and that package-lock.json matches package.json (npm install regenerates it)."
    printf '%s\n' "$npm_key" >"$NPM_STAMP"
fi

# ----------------------------------------------------------------- anvil ----
if [[ "$(uname -s)-$(uname -m)" != "Linux-x86_64" ]]; then
    die "the pinned anvil package (@foundry-rs/anvil-linux-amd64) only runs on Linux x86_64; this is $(uname -s)-$(uname -m)."
fi
[[ -x "$ANVIL" ]] || die "anvil binary missing at ${ANVIL#"$ROOT"/}; delete node_modules and re-run this script."
anvil_v="$("$ANVIL" --version 2>&1 | head -n1)" \
    || die "anvil does not run ($ANVIL --version failed: $anvil_v). Delete node_modules and re-run; check glibc/architecture."
log "ok: $anvil_v, $("$VPY" -V 2>&1), uv $UV_VERSION"
