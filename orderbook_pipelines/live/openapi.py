"""OpenAPI 3.1 description of the REST read API; served at /openapi.json and committed as docs/openapi.json.

`python -m orderbook_pipelines.live.openapi` rewrites docs/openapi.json from SPEC (a test compares the two).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any


def _p(name: str, schema: dict[str, Any], desc: str, required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "description": desc, "schema": schema}


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


_MARKET = _p("market", {"type": "string", "pattern": "^[A-Za-z0-9_x]{3,100}$"}, "Market metric id, e.g. SILVER_V1")
_LIMIT = _p("limit", {"type": "integer", "minimum": 1, "maximum": 500, "default": 100}, "Page size (capped at 500)")
_CURSOR = _p("cursor", {"type": "string", "maxLength": 256}, "Opaque cursor from the previous page's next_cursor")
_ERR = {"description": "Invalid parameter", "content": {"application/json": {"schema": _ref("Error")}}}
_STARTING = {"description": "The live service is starting (cold start not finished; the message says why) or "
                            "Postgres is unavailable: retry later",
             "content": {"application/json": {"schema": _ref("Error")}}}
_LEVELS = {"type": "array", "items": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 2}}
_INT_OR_NULL = {"type": ["integer", "null"]}
_STR_OR_NULL = {"type": ["string", "null"]}
_TIME_NOTE = ("ISO-8601; without an offset it is UTC; must lie between 0001-01-01 and 9999-12-31 UTC. A window "
              "given by one end only is 31 days long and ends at the calendar's limits.")
_LIVE = "Live book (the WebSocket's source): current to as_of.live_block."
_INGESTED = "Postgres (follows ingestion): complete up to as_of.ingested_block."


def _ok(props: dict[str, Any], required: list[str] | None = None, desc: str = "OK") -> dict[str, Any]:
    schema: dict[str, Any] = {"type": "object", "properties": props}
    if required:
        schema["required"] = required
    return {"description": desc, "content": {"application/json": {"schema": schema}}}


def _d(schema: dict[str, Any], desc: str) -> dict[str, Any]:
    return {**schema, "description": desc}


_SUMMARY_MARKET = {"type": "object", "properties": {
    "market": {"type": "string"},
    "decimals": _d(_INT_OR_NULL, "Scale of every amount of this market: human value = raw / 10^decimals."),
    "best_bid": _d(_STR_OR_NULL, _LIVE), "best_ask": _d(_STR_OR_NULL, _LIVE),
    "mid": _d(_STR_OR_NULL, _LIVE + " (best_bid + best_ask) // 2."),
    "spread": _d(_STR_OR_NULL, _LIVE + " best_ask - best_bid."),
    "seq": _d({"type": "integer"}, _LIVE + " The market's book sequence number (as on the WebSocket)."),
    "paused": _d({"type": "boolean"}, "Publishing of this market is paused by an operator."),
    "volume_24h": _d({"type": "string"}, _INGESTED + " Traded quantity over the 24 h before stats_computed_at."),
    "high_24h": _d(_STR_OR_NULL, _INGESTED), "low_24h": _d(_STR_OR_NULL, _INGESTED),
    "last": _d(_STR_OR_NULL, _INGESTED + " Last trade price within the 24 h window."),
    "trades_24h": _d({"type": "integer"}, _INGESTED),
    "open_interest": _d({"type": "string"}, _INGESTED + " Sum of positive net positions."),
}}

SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "orderbook-pipelines read API", "version": "1.1.0",
             "description": (
                 "Amounts are raw on-chain integers as decimal strings; scale by the market's decimals (in "
                 "/api/markets/summary). Two sources with different freshness: /api/depth, the WebSocket and "
                 "the summary's best_bid/best_ask/mid/spread/seq come from the live book, which follows the "
                 "chain head block by block; /api/trades, /api/orders and the summary's 24 h figures come from "
                 "Postgres, which follows ingestion (final blocks only, so it trails the head by at least the "
                 "configured confirmations). Every Postgres-backed answer carries `as_of` (ingested_block: "
                 "everything up to it is included; later blocks may be partial; live_block: the live book's "
                 "block at the time of the answer). /health reports the difference as ingestion_lag_blocks.")},
    "paths": {
        "/api/depth": {"get": {
            "summary": "Top levels of a market's live book, with seq, block and checksum (live: follows the head)",
            "parameters": [{**_MARKET, "required": True},
                           _p("levels", {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
                              "Levels per side")],
            "responses": {"200": _ok({"market": {"type": "string"}, "seq": {"type": "integer"},
                                      "block": {"type": "object", "properties": {
                                          "number": {"type": "integer"}, "hash": {"type": "string"}}},
                                      "bids": _LEVELS, "asks": _LEVELS,
                                      "checksum": {"type": "integer"}, "paused": {"type": "boolean"}}),
                          "400": _ERR, "404": _ERR, "503": _STARTING}}},
        "/api/trades": {"get": {
            "summary": "Trades of a market, newest first, cursor-paginated by (block, log index) (follows "
                       "ingestion: see as_of)",
            "parameters": [{**_MARKET, "required": True}, _LIMIT, _CURSOR,
                           _p("since", {"type": "string", "format": "date-time"},
                              "Inclusive start time. " + _TIME_NOTE),
                           _p("until", {"type": "string", "format": "date-time"},
                              "Exclusive end (range <= 31 days). " + _TIME_NOTE)],
            "responses": {"200": _ok({"market": {"type": "string"}, "trades": {"type": "array"},
                                      "next_cursor": _STR_OR_NULL, "as_of": _ref("AsOf")},
                                     ["trades", "next_cursor", "as_of"]),
                          "400": _ERR, "404": _ERR, "503": _STARTING}}},
        "/api/orders": {"get": {
            "summary": "Orders of a trader and/or market, newest first (trader or market required; follows "
                       "ingestion: see as_of)",
            "parameters": [_p("trader", {"type": "string", "pattern": "^0x[0-9a-fA-F]{40}$"}, "Trader address"),
                           _MARKET,
                           _p("status", {"type": "string", "enum": ["open", "partially_filled", "filled", "cancelled",
                                                                    "active", "history"]}, "Status or group"),
                           _LIMIT, _CURSOR],
            "responses": {"200": _ok({"orders": {"type": "array"}, "next_cursor": _STR_OR_NULL,
                                      "as_of": _ref("AsOf")}, ["orders", "next_cursor", "as_of"]),
                          "400": _ERR, "404": _ERR, "503": _STARTING}}},
        "/api/compat/orders": {"get": {
            "summary": "Today's orders API shape, for the frontend's migration (docs/pusher-compat.md): offset pages "
                       "with a total, the market's live depth (marketDepth) next to its orders, camelCase fields. "
                       "Same page cap and 400s as /api/orders; the cursor route stays the one for deep history "
                       "(offset is capped at 10000). Follows ingestion: see as_of",
            "parameters": [_p("trader", {"type": "string", "pattern": "^0x[0-9a-fA-F]{40}$"},
                              "Trader address (trader or metricId required)"),
                           _p("metricId", _MARKET["schema"], "Market metric id, e.g. SILVER_V1"),
                           _p("type", {"type": "string", "enum": ["active", "history", "market"]},
                              "active: open and partially filled; history: filled and cancelled; market: one "
                              "market's open orders of every trader (needs metricId, no trader); omitted: all"),
                           _p("limit", {"type": "integer", "minimum": 1, "maximum": 500, "default": 100},
                              "Page size (capped at 500)"),
                           _p("offset", {"type": "integer", "minimum": 0, "maximum": 10000, "default": 0},
                              "Rows to skip (newest first); at most 10000")],
            "responses": {"200": _ok({
                "orders": {"type": "array", "items": {"type": "object", "properties": {
                    k: {"type": t} for k, t in (
                        ("orderId", "string"), ("metricId", "string"), ("trader", "string"), ("side", "string"),
                        ("orderType", "string"), ("price", "string"), ("quantity", "string"),
                        ("filled", "string"), ("remaining", "string"), ("status", "string"),
                        ("createdBlock", "integer"), ("updatedBlock", "integer"))}}},
                "marketDepth": _d({"type": ["object", "null"], "properties": {
                    "metricId": {"type": "string"}, "seq": {"type": "integer"}, "block": {"type": "object"},
                    "bids": _LEVELS, "asks": _LEVELS, "bestBid": _STR_OR_NULL, "bestAsk": _STR_OR_NULL}},
                    _LIVE + " Top 20 levels of metricId's book; null without metricId."),
                "pagination": {"type": "object", "properties": {
                    "limit": {"type": "integer"}, "offset": {"type": "integer"}, "total": {"type": "integer"},
                    "hasMore": {"type": "boolean"}}, "required": ["limit", "offset", "total", "hasMore"]},
                "as_of": _ref("AsOf")}, ["orders", "marketDepth", "pagination", "as_of"]),
                "400": _ERR, "404": _ERR, "503": _STARTING}}},
        "/pusher/auth": {"post": {
            "summary": "Signs a private-user channel for the Pusher endpoint /app/{key} (HMAC-SHA256 of "
                       "socket_id:channel_name with the app secret, as Pusher's auth endpoints do); for the "
                       "frontend's backend, with the bearer token OBP_PUSHER_AUTH_TOKEN",
            "requestBody": {"required": True, "content": {
                "application/x-www-form-urlencoded": {"schema": {"type": "object", "properties": {
                    "socket_id": {"type": "string"}, "channel_name": {"type": "string"}}}}}},
            "responses": {"200": _ok({"auth": _d({"type": "string"}, "key:signature, for pusher:subscribe")}),
                          "400": _ERR, "403": _ERR, "404": _d(_ERR, "Private channels are not configured"),
                          "413": _ERR, "429": _ERR}}},
        "/api/markets/summary": {"get": {
            "summary": "Per market: decimals; best bid/ask, mid, spread (live book); 24h volume/high/low/last, "
                       "open interest (Postgres, as of as_of.ingested_block)",
            "responses": {"200": _ok({
                "markets": {"type": "array", "items": _SUMMARY_MARKET},
                "stats_as_of": _d(_STR_OR_NULL, "Same as as_of.stats_computed_at (kept for older clients)."),
                "as_of": {"allOf": [_ref("AsOf")], "type": "object", "properties": {
                    "stats_computed_at": _d(_STR_OR_NULL, "When the 24 h figures were computed (every few seconds); "
                                                          "ingested_block is the frontier at that moment.")}},
            }, ["markets", "as_of"]), "400": _ERR, "503": _STARTING}}},
        "/health": {"get": {
            "summary": "Liveness (always 200 while the process runs) and state: readiness and its reason, head, "
                       "applied block, ingestion lag, reorgs, pauses",
            "responses": {"200": _ok({
                "status": _d({"type": "string", "enum": ["ok", "starting", "degraded"]},
                             "ok: ready; starting: the cold start has not succeeded yet (see reason: e.g. the RPC "
                             "node's host:port and its error; retried with a bounded backoff); degraded: started "
                             "but not current"),
                "ready": {"type": "boolean"}, "reason": _d({"type": "string"}, "Why not ready, or 'current'"),
                "chain_head": _d({"type": "integer"}, "Highest head seen from the node (-1: none yet)"),
                "applied_block": _d(_INT_OR_NULL, "Block of the live book"),
                "lag_blocks": _d(_INT_OR_NULL, "chain_head - applied_block"),
                "ingested_block": _d(_INT_OR_NULL, "Ingested frontier: Postgres is complete up to this block "
                                                   "(null: nothing ingested yet)"),
                "ingestion_lag_blocks": _d(_INT_OR_NULL, "chain_head - ingested_block: how far REST history "
                                                         "(trades, orders, summary statistics) trails the chain; "
                                                         "includes the confirmations ingestion waits for. Does "
                                                         "not affect /ready."),
                "rpc_node": _d({"type": "string"}, "host:port of the RPC node (no path or credentials)"),
                "start_attempts": {"type": "integer"},
                "seconds_since_progress": {"type": "number"}, "reorgs": {"type": "integer"},
                "max_reorg_depth": {"type": "integer"}, "resets": {"type": "integer"},
                "cold_start_s": {"type": "number"}, "markets": {"type": "integer"}, "paused": {"type": "object"},
                "redis": {"type": "boolean"}, "head_subscription": {"type": "boolean"},
                "cluster": {"type": ["object", "null"]},
            }, ["status", "ready", "reason"])}}},
        "/ready": {"get": {
            "summary": "200 only while the live book is current (started, node answering, not behind the head); "
                       "ingestion lag does not count (REST history says it in as_of)",
            "responses": {"200": _ok({"ready": {"type": "boolean"}, "reason": {"type": "string"}}),
                          "503": _ok({"ready": {"type": "boolean"}, "reason": {"type": "string"}},
                                     desc="Not ready; reason says why")}}},
    },
    "components": {"schemas": {
        "Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
            "code": {"type": "string"}, "message": {"type": "string"},
            "parameter": {"type": ["string", "null"]}}}}},
        "AsOf": {"type": "object", "description": "How current the answer is.", "properties": {
            "ingested_block": _d(_INT_OR_NULL, "Ingested frontier: every trade, order and position event up to "
                                               "this block is included; later blocks may be missing or partial "
                                               "(null: nothing ingested yet)"),
            "live_block": _d(_INT_OR_NULL, "Block of the live book (WebSocket, /api/depth) when answering; null "
                                           "before the cold start and in an API-only cluster process"),
        }, "required": ["ingested_block", "live_block"]},
    }},
}


def render() -> str:
    """docs/openapi.json's exact text."""
    return json.dumps(SPEC, indent=2, sort_keys=True) + "\n"


if __name__ == "__main__":
    Path(__file__).resolve().parents[2].joinpath("docs", "openapi.json").write_text(render())
