# Two commands on a fresh machine:  make test   /   make run
SHELL := /bin/bash
.SHELLFLAGS := -eu -o pipefail -c
.DEFAULT_GOAL := help

VENV        := .venv
ANVIL       := $(CURDIR)/node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil
PYTEST_ARGS ?=
# Test modules run in TEST_WORKERS processes (a module stays in one: its chain and service fixtures are shared); most
# of a test waits on a chain, a service or Postgres, so 2 cores carry more than 2.
TEST_WORKERS ?= 3
SOAK_SCENARIOS ?= 500

.PHONY: help setup contracts lint test run clean bench soak

help:
	@echo "make setup      create .venv (uv, requirements.lock) and node_modules (npm ci); idempotent"
	@echo "make contracts  build contracts/artifacts (node contracts/build.mjs)"
	@echo "make lint       ruff check . and the type checker (mypy, settings in pyproject.toml)"
	@echo "make test       lint + pytest; starts Postgres/Redis if needed (PYTEST_ARGS=... passes through)"
	@echo "make run        anvil devchain + simulator + Dagster UI (Ctrl-C stops everything)"
	@echo "make bench      benchmarks (bench/): JSON lines + tables; minutes, never part of make test"
	@echo "make soak       randomized fork scenarios, many more than make test (SOAK_SCENARIOS=500; OBP_FORK_BASE_SEED=...)"
	@echo "make clean      stop the project-local Postgres/Redis and remove .run/ (keeps .venv)"

setup:
	@bash scripts/bootstrap.sh

contracts: setup
	node contracts/build.mjs

lint: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/mypy

test: setup
	@db_url="$$(bash scripts/ensure_postgres.sh | tail -n 1)"; \
	redis_url="$$(bash scripts/ensure_redis.sh | tail -n 1)"; \
	export DATABASE_URL="$$db_url" REDIS_URL="$$redis_url" OBP_ANVIL="$(ANVIL)"; \
	if ch_url="$$(bash scripts/ensure_clickhouse.sh | tail -n 1)" && [[ -n "$$ch_url" ]]; then \
		export CLICKHOUSE_URL="$$ch_url"; echo "[test] CLICKHOUSE_URL=$$CLICKHOUSE_URL"; \
	else echo "[test] no ClickHouse server: the ClickHouse analytics tests will be skipped (see above)"; fi; \
	echo "[test] DATABASE_URL=$$DATABASE_URL REDIS_URL=$$REDIS_URL"; \
	bash scripts/ensure_promtool.sh >/dev/null || echo "[test] promtool unavailable: tests/test_alerts.py will skip"; \
	echo "[test] ruff check . && mypy"; \
	$(VENV)/bin/ruff check .; \
	$(VENV)/bin/mypy; \
	echo "[test] pytest -q -n $(TEST_WORKERS) --dist loadfile --durations=15 $(PYTEST_ARGS)"; \
	bash scripts/pytest_summary.sh -q -n $(TEST_WORKERS) --dist loadfile --durations=15 $(PYTEST_ARGS)

bench: setup
	@db_url="$$(bash scripts/ensure_postgres.sh | tail -n 1)"; \
	redis_url="$$(bash scripts/ensure_redis.sh | tail -n 1)"; \
	export DATABASE_URL="$$db_url" REDIS_URL="$$redis_url" OBP_ANVIL="$(ANVIL)"; \
	$(VENV)/bin/python -m bench.realmix $(BENCH_REALMIX_ARGS); \
	$(VENV)/bin/python -m bench.analytics_incremental $(BENCH_ANALYTICS_ARGS); \
	$(VENV)/bin/python -m bench.backfill $(BENCH_ARGS); \
	$(VENV)/bin/python -m bench.live $(BENCH_LIVE_ARGS); \
	$(VENV)/bin/python -m bench.scale_markets; \
	$(VENV)/bin/python -m bench.cli_start

soak: setup
	@db_url="$$(bash scripts/ensure_postgres.sh | tail -n 1)"; \
	redis_url="$$(bash scripts/ensure_redis.sh | tail -n 1)"; \
	export DATABASE_URL="$$db_url" REDIS_URL="$$redis_url" OBP_ANVIL="$(ANVIL)" OBP_FORK_SCENARIOS="$(SOAK_SCENARIOS)"; \
	bash scripts/pytest_summary.sh -q tests/test_fork_scenarios.py $(PYTEST_ARGS)

run:
	@bash scripts/run.sh

clean:
	-@bash scripts/ensure_postgres.sh --purge
	-@bash scripts/ensure_redis.sh --stop
	-@bash scripts/ensure_clickhouse.sh --stop
	rm -rf .run
