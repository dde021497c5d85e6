#!/usr/bin/env bash
# Runs pytest and ends with one plain summary line ("tests: N passed, N failed, N skipped"), because native
# extensions (DuckDB's nanobind) may print leak notices at interpreter exit, after pytest's own summary.
set -uo pipefail
out="$(mktemp)"
trap 'rm -f "$out"' EXIT
.venv/bin/pytest "$@" 2>&1 | tee "$out"
rc=${PIPESTATUS[0]}
line="$(grep -E '^=*[ ]*[0-9]+ (passed|failed|skipped|error)' "$out" | tail -n 1)"
count() { grep -oE "[0-9]+ $1" <<<"$line" | grep -oE '^[0-9]+' || echo 0; }
failed=$(( $(count failed) + $(count error) ))
printf "\ntests: %s passed, %s failed, %s skipped\n" "$(count passed)" "$failed" "$(count skipped)"
exit "$rc"
