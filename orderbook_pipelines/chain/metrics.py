"""Prometheus metrics of the one RPC client (names are part of the operational contract: see
docs/observability.md and ops/prometheus/alerts.yml before renaming)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

RPC_REQUESTS = Counter("obp_rpc_requests_total", "JSON-RPC calls made (each retry counts)", ["method"])
RPC_ERRORS = Counter("obp_rpc_errors_total", "JSON-RPC calls that failed, by error class", ["method", "error"])
RPC_SECONDS = Histogram("obp_rpc_request_seconds", "JSON-RPC call latency", ["method"],
                        buckets=(0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30))
GETLOGS_RANGE = Histogram("obp_rpc_getlogs_range_blocks", "Blocks per successful eth_getLogs window",
                          buckets=(1, 2, 5, 10, 25, 50, 100, 250, 500, 1000, 2000, 5000, 10000))
GETLOGS_WINDOW = Gauge("obp_rpc_getlogs_window_blocks", "Size of the last successful eth_getLogs window")
GETLOGS_REFUSED = Counter("obp_rpc_getlogs_refused_total", "eth_getLogs windows refused as too large (then halved)")
