"""Prometheus metrics of the live service. Names are part of the operational contract (docs/observability.md)."""

from prometheus_client import Counter, Gauge, Histogram

CHAIN_HEAD = Gauge("obp_live_chain_head_block", "Latest block number the chain reported")
APPLIED_HEAD = Gauge("obp_live_applied_block", "Latest block applied to the live books")
REORGS = Counter("obp_live_reorgs_total", "Reorgs rolled back by the live books")
REORG_DEPTH = Histogram("obp_live_reorg_depth_blocks", "Depth of rolled-back reorgs", buckets=(1, 2, 3, 5, 8, 13, 64))
CLIENTS = Gauge("obp_ws_clients", "Open WebSocket connections")
SUBSCRIPTIONS = Gauge("obp_ws_subscriptions", "Active WebSocket subscriptions")
DELTAS_SENT = Counter("obp_ws_deltas_sent_total", "Book deltas queued to subscribers")
MESSAGES_DROPPED = Counter("obp_ws_messages_dropped_total", "Queued messages dropped by slow-consumer conflation")
CONFLATIONS = Counter("obp_ws_conflations_total", "Slow-consumer queue overflows answered with fresh snapshots")
SLOW_CONSUMER_DISCONNECTS = Counter("obp_ws_slow_consumer_disconnects_total", "Clients dropped as slow consumers")
WS_ERRORS = Counter("obp_ws_errors_total", "Error messages sent to WebSocket clients", ["code"])
PUBLISH_LATENCY = Histogram("obp_live_publish_latency_seconds", "Block seen -> deltas queued",
                            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0))
API_LATENCY = Histogram("obp_api_request_seconds", "REST latency per route", ["route"],
                        buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0, 2.5))
