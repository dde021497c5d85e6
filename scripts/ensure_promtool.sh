#!/usr/bin/env bash
# Make promtool (the Prometheus rule validator) available and print its path (last line of stdout).
#
# Order of preference: $OBP_PROMTOOL; `promtool` on PATH; .tools/bin/promtool; else Debian's `prometheus`
# package, fetched with `apt-get download` and unpacked with dpkg-deb into .tools/ (only promtool is kept:
# nothing is installed system-wide and no Prometheus daemon is started). Exits non-zero, with the reason on
# stderr, when none of this works; tests/test_alerts.py then skips with that reason.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
TOOLS="$ROOT/.tools"
log() { printf '[promtool] %s\n' "$*" >&2; }

if [[ -n "${OBP_PROMTOOL:-}" && -x "${OBP_PROMTOOL}" ]]; then echo "$OBP_PROMTOOL"; exit 0; fi
if command -v promtool >/dev/null 2>&1; then command -v promtool; exit 0; fi
if [[ -x "$TOOLS/bin/promtool" ]]; then echo "$TOOLS/bin/promtool"; exit 0; fi

command -v apt-get >/dev/null 2>&1 || { log "apt-get not available: cannot fetch Debian's prometheus package"; exit 1; }
command -v dpkg-deb >/dev/null 2>&1 || { log "dpkg-deb not available"; exit 1; }

work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
cd "$work"
if ! apt-get download prometheus >/dev/null 2>"$work/err"; then
    log "apt-get download prometheus failed; running apt-get update once"
    if [[ "$(id -u)" == 0 ]]; then apt-get update -qq >/dev/null 2>&1 || true; fi
    apt-get download prometheus >/dev/null 2>"$work/err" || { log "cannot download prometheus: $(cat "$work/err")"; exit 1; }
fi
deb="$(ls prometheus_*.deb | head -n 1)"
dpkg-deb -x "$deb" "$work/x"
mkdir -p "$TOOLS/bin"
install -m 0755 "$work/x/usr/bin/promtool" "$TOOLS/bin/promtool"
log "installed $("$TOOLS/bin/promtool" --version 2>&1 | head -n 1) from $deb"
echo "$TOOLS/bin/promtool"
