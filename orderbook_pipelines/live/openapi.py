"""OpenAPI 3.1 description of the REST read API; served at /openapi.json and committed as docs/openapi.json."""

from typing import Any


def _p(name: str, schema: dict[str, Any], desc: str, required: bool = False) -> dict[str, Any]:
    return {"name": name, "in": "query", "required": required, "description": desc, "schema": schema}


_MARKET = _p("market", {"type": "string", "pattern": "^[A-Za-z0-9_x]{3,100}$"}, "Market metric id, e.g. SILVER_V1")
_LIMIT = _p("limit", {"type": "integer", "minimum": 1, "maximum": 500, "default": 100}, "Page size (capped at 500)")
_CURSOR = _p("cursor", {"type": "string", "maxLength": 256}, "Opaque cursor from the previous page's next_cursor")
_ERR = {"description": "Invalid parameter",
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
_LEVELS = {"type": "array", "items": {"type": "array", "items": {"type": "string"}, "minItems": 2, "maxItems": 2}}


def _ok(props: dict[str, Any]) -> dict[str, Any]:
    return {"description": "OK", "content": {"application/json": {"schema": {"type": "object", "properties": props}}}}


SPEC: dict[str, Any] = {
    "openapi": "3.1.0",
    "info": {"title": "orderbook-pipelines read API", "version": "1.0.0",
             "description": "Amounts are raw on-chain integers as decimal strings; scale by the market's decimals."},
    "paths": {
        "/api/depth": {"get": {
            "summary": "Top levels of a market's live book, with seq, block and checksum",
            "parameters": [{**_MARKET, "required": True},
                           _p("levels", {"type": "integer", "minimum": 1, "maximum": 100, "default": 20},
                              "Levels per side")],
            "responses": {"200": _ok({"market": {"type": "string"}, "seq": {"type": "integer"},
                                      "block": {"type": "object"}, "bids": _LEVELS, "asks": _LEVELS,
                                      "checksum": {"type": "integer"}, "paused": {"type": "boolean"}}),
                          "400": _ERR, "404": _ERR, "503": _ERR}}},
        "/api/trades": {"get": {
            "summary": "Trades of a market, newest first, cursor-paginated by (block, log index)",
            "parameters": [{**_MARKET, "required": True}, _LIMIT, _CURSOR,
                           _p("since", {"type": "string", "format": "date-time"}, "Inclusive start time"),
                           _p("until", {"type": "string", "format": "date-time"}, "Exclusive end (range <= 31 days)")],
            "responses": {"200": _ok({"trades": {"type": "array"}, "next_cursor": {"type": ["string", "null"]}}),
                          "400": _ERR, "404": _ERR}}},
        "/api/orders": {"get": {
            "summary": "Orders of a trader and/or market, newest first (trader or market required)",
            "parameters": [_p("trader", {"type": "string", "pattern": "^0x[0-9a-fA-F]{40}$"}, "Trader address"),
                           _MARKET,
                           _p("status", {"type": "string", "enum": ["open", "partially_filled", "filled", "cancelled",
                                                                    "active", "history"]}, "Status or group"),
                           _LIMIT, _CURSOR],
            "responses": {"200": _ok({"orders": {"type": "array"}, "next_cursor": {"type": ["string", "null"]}}),
                          "400": _ERR, "404": _ERR}}},
        "/api/markets/summary": {"get": {
            "summary": "Per market: best bid/ask, mid, spread, 24h volume/high/low/last, open interest",
            "responses": {"200": _ok({"markets": {"type": "array"}, "stats_as_of": {"type": ["string", "null"]}}),
                          "400": _ERR}}},
        "/health": {"get": {"summary": "Liveness and state (head, applied block, lag, reorgs, pauses)",
                            "responses": {"200": _ok({"status": {"type": "string"}})}}},
        "/ready": {"get": {"summary": "200 only while the live book is current",
                           "responses": {"200": _ok({"ready": {"type": "boolean"}}),
                                         "503": _ok({"ready": {"type": "boolean"}})}}},
    },
    "components": {"schemas": {"Error": {"type": "object", "properties": {"error": {"type": "object", "properties": {
        "code": {"type": "string"}, "message": {"type": "string"}, "parameter": {"type": "string"}}}}}}},
}
