"""API hardening against the running live service (real uvicorn, anvil, Postgres), loopback only.

* schemathesis generates requests from the served OpenAPI spec: no 5xx, whatever the parameters;
* a property-based test goes beyond the spec's types (dates at and past the calendar's limits, integers of
  any size and sign, forged cursors, garbage and unicode): every answer is 200/400/404 with a JSON body;
* one abusive client (its own loopback address, its own process) hammering REST and WebSocket limits does not
  degrade a well-behaved client: every good request succeeds and its p99 stays within a bound relative to a
  baseline measured in the same test;
* slow-loris: a client trickling headers one byte per second is cut off (uvicorn as `orderbook live serve`
  runs it: the HeaderDeadlineProtocol).
"""

from __future__ import annotations

import base64
import json
import os
import random
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, given, seed, settings
from hypothesis import strategies as st
from websockets.sync.client import connect

from orderbook_pipelines.devchain.simulator import Simulator
from orderbook_pipelines.live.http_guard import HEADER_TIMEOUT_S
from orderbook_pipelines.live.service import LiveService, ServiceOptions
from orderbook_pipelines.storage.db import drop_database
from tests.conftest import Anvil, DevChain, make_devchain, new_database
from tests.live_harness import running_service, wait_until_current
from tests.test_security import ingest_all

ABUSER_ADDR = "127.0.0.2"  # a distinct client for the per-client limits; Linux routes all of 127/8 to lo


@contextmanager
def serve(chain: DevChain, db: str, options: ServiceOptions) -> Iterator[tuple[LiveService, str]]:
    """The service as `orderbook live serve` configures uvicorn (header deadline, keep-alive, frame size)."""
    with running_service(chain, db, options=options) as (service, url):
        wait_until_current(service, chain)
        yield service, url


@pytest.fixture(scope="module")
def world(anvil_factory: type[Anvil], tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[DevChain, str]]:
    chain = make_devchain(anvil_factory(), tmp_path_factory.mktemp("hard"), ["SILVER_V1", "GOLD_V1"],
                          ["ALUMINUM_V1"], confirmations=2, range_size=20)
    Simulator(chain.anvil.w3, chain.dep, seed=8, traders=4).run_batches(200, per_block=20)
    chain.anvil.mine(3)
    db = new_database()
    ingest_all(chain, db)
    try:
        yield chain, db
    finally:
        drop_database(db)


def _with_real_market(case: schemathesis.Case) -> schemathesis.Case:
    """Half the cases name a real market, so the fuzzer gets past the market check to the other parameters."""
    if case.query is not None and "market" in case.query:
        case.query["market"] = "SILVER_V1"
    return case


def test_fuzzed_requests_from_the_openapi_spec_never_get_a_5xx(world: tuple[DevChain, str]) -> None:
    chain, db = world
    with serve(chain, db, ServiceOptions(poll_s=0.5, api_requests_per_second=100000)) as (_, url):
        base = f"http://{url}"
        schema = schemathesis.openapi.from_url(f"{base}/openapi.json")
        ops = [r.ok() for r in schema.get_all_operations()]
        assert {op.path for op in ops} >= {"/api/depth", "/api/trades", "/api/orders", "/api/markets/summary"}
        seen: dict[str, set[int]] = {}
        failures: list[str] = []
        with httpx.Client(base_url=base, timeout=30) as http:
            for op in ops:

                @settings(max_examples=60, deadline=None, database=None, derandomize=True,
                          suppress_health_check=list(HealthCheck))
                @given(case=st.one_of(op.as_strategy(), op.as_strategy().map(_with_real_market)))
                def run(case: schemathesis.Case) -> None:
                    kwargs = case.as_transport_kwargs(base_url=base)
                    r = http.request(kwargs["method"], kwargs["url"], params=kwargs.get("params"),
                                     headers={k: v for k, v in (kwargs.get("headers") or {}).items()
                                              if k.lower() not in ("host", "content-length")})
                    seen.setdefault(case.operation.path, set()).add(r.status_code)
                    if r.status_code >= 500:
                        failures.append(f"{r.status_code} {kwargs['method']} {r.url}: {r.text[:200]}")

                run()
        assert not failures, failures[:10]
        # the generator really explored: valid and invalid inputs on the parameterised routes
        for path in ("/api/depth", "/api/trades", "/api/orders"):
            assert {400, 404} & seen[path] and 200 in seen[path], (path, seen[path])
        print("fuzzed statuses:", {p: sorted(s) for p, s in seen.items()})


# -- property: no parameter value gets a 5xx -----------------------------------------------------------------

SEED = int(os.environ.get("OBP_TEST_SEED", random.randrange(2**32)))
LIMIT_DATES = ["9999-12-31T23:59:59Z", "9999-12-31T23:59:59.999999+00:00", "0001-01-01T00:00:00Z",
               "0001-01-01T00:00:00", "9999-12-31T23:00:00-05:00", "0001-01-01T03:00:00+05:00",
               "9999-12-31", "0001-01-01", "10000-01-01T00:00:00Z", "0000-12-31T00:00:00Z", "2026-02-30T00:00:00Z",
               "2026-01-01T24:00:00Z", "2026-01-01T00:00:00+24:00", "-2026-01-01"]
HUGE = [str(2**63), str(2**63 - 1), str(-(2**63)), str(2**64), "9" * 256, "-" + "9" * 255, "1e308", "nan", "inf",
        "-0", "+5", " 7 ", "1_000", "\u0661\u0660", "0x10"]


def _cursor(key: object) -> str:
    return base64.urlsafe_b64encode(json.dumps(key).encode()).decode().rstrip("=")


_ints = st.one_of(st.integers().map(str), st.integers(min_value=-(10**200), max_value=10**200).map(str),
                 st.sampled_from(HUGE))
_dates = st.one_of(
    st.sampled_from(LIMIT_DATES),
    st.builds(lambda t, off: t.replace(tzinfo=None if off is None else timezone(off)).isoformat(),
              st.datetimes(min_value=datetime.min, max_value=datetime.max),
              st.one_of(st.none(), st.timedeltas(min_value=-timedelta(hours=23, minutes=59),
                                                  max_value=timedelta(hours=23, minutes=59)))),
    st.datetimes(min_value=datetime(9999, 12, 1), max_value=datetime.max).map(lambda t: t.isoformat() + "Z"),
    st.datetimes(max_value=datetime(1, 2, 1)).map(lambda t: t.isoformat() + "Z"))
_garbage = st.text(st.characters(exclude_categories=("Cs",)), max_size=300)  # httpx cannot encode lone surrogates
_cursors = st.one_of(
    _garbage,
    st.lists(st.one_of(_ints.map(lambda v: int(v) if v.lstrip("-").isdigit() else v), st.floats(allow_nan=False),
                       st.booleans(), st.none(), st.text(max_size=5)), max_size=3).map(_cursor))
_markets = st.one_of(st.sampled_from(["SILVER_V1", "GOLD_V1", "ALUMINUM_V1", "silver_v1", "NOPE_V1"]), _garbage)
_traders = st.one_of(
    st.builds(lambda h, tail: "0x" + h + tail, st.text("0123456789abcdefABCDEF", min_size=40, max_size=40),
              st.sampled_from(["", "\n", " ", "0", "\u0660"])),
    _garbage)
_statuses = st.one_of(st.sampled_from(["open", "partially_filled", "filled", "cancelled", "active", "history",
                                       "OPEN", "open\n"]), _garbage)
PARAMS: dict[str, dict[str, st.SearchStrategy[str]]] = {
    "/api/depth": {"market": _markets, "levels": _ints},
    "/api/trades": {"market": _markets, "limit": _ints, "cursor": _cursors, "since": _dates, "until": _dates},
    "/api/orders": {"trader": _traders, "market": _markets, "status": _statuses, "limit": _ints, "cursor": _cursors},
    "/api/markets/summary": {},
}


@st.composite
def _requests(draw: st.DrawFn) -> tuple[str, dict[str, str]]:
    path = draw(st.sampled_from(sorted(PARAMS)))
    known = PARAMS[path]
    names = draw(st.lists(st.sampled_from(sorted(known)), unique=True)) if known else []
    params = {n: draw(known[n]) for n in names}
    if draw(st.integers(0, 9)) == 0:  # now and then a parameter the route does not know
        params[draw(_garbage.filter(lambda k: k not in known and k))] = draw(_garbage)
    return path, params


def test_no_parameter_value_gets_a_5xx_or_a_non_json_answer(world: tuple[DevChain, str]) -> None:
    """Dates at and past datetime's limits (once an OverflowError and a plain-text 500), integers of any size,
    forged cursors (numbers beyond bigint), trailing newlines, unicode: always 200/400/404, always JSON."""
    chain, db = world
    print(f"hypothesis seed {SEED} (rerun with OBP_TEST_SEED={SEED})")
    seen: dict[str, set[int]] = {}
    with serve(chain, db, ServiceOptions(poll_s=0.5, api_requests_per_second=100000)) as (_, url), \
            httpx.Client(base_url=f"http://{url}", timeout=30) as http:

        def check(path: str, params: dict[str, str]) -> None:
            r = http.get(path, params=params)
            seen.setdefault(path, set()).add(r.status_code)
            assert r.status_code in (200, 400, 404), f"seed {SEED}: GET {r.url} -> {r.status_code}: {r.text[:300]}"
            assert r.headers["content-type"].startswith("application/json"), r.headers["content-type"]
            body = r.json()
            if r.status_code == 200:
                assert isinstance(body, dict) and "error" not in body
            else:
                err = body["error"]
                assert err["code"] in ("invalid_parameter", "unknown_market") and err["message"]
                assert err["parameter"] in set(params) | set(PARAMS[path]), err

        for date in LIMIT_DATES:  # the reported cases, every time, whatever the seed draws
            for name in ("since", "until"):
                check("/api/trades", {"market": "SILVER_V1", name: date})
            check("/api/trades", {"market": "SILVER_V1", "since": date, "until": date})
        for key in ([2**64 - 1, 0], [2**63, 1], [-1, -1], [1.5, 2], [True, 1], [2**63 - 1, 2**63 - 1]):
            check("/api/trades", {"market": "SILVER_V1", "cursor": _cursor(key)})
            check("/api/orders", {"market": "SILVER_V1", "cursor": _cursor(key)})

        @seed(SEED)
        @settings(max_examples=400, deadline=None, database=None, print_blob=True,
                  suppress_health_check=list(HealthCheck))
        @given(_requests())
        def prop(req: tuple[str, dict[str, str]]) -> None:
            check(*req)

        prop()
    print("statuses:", {p: sorted(s) for p, s in seen.items()})
    assert {200, 400} <= seen["/api/trades"] and {200, 400} <= seen["/api/orders"], seen


ABUSER = r"""
import json, sys, threading, httpx
from websockets.sync.client import connect
base, addr = sys.argv[1], sys.argv[2]
counts = {"ok": 0, "429": 0, "other": 0, "ws_refused": 0, "ws_rate_limited": 0, "ws_msgs": 0}
lock = threading.Lock()

def hammer(n):
    with httpx.Client(transport=httpx.HTTPTransport(local_address=addr), timeout=30) as c:
        for _ in range(n):
            r = c.get(base + "/api/depth", params={"market": "SILVER_V1", "levels": "100"})
            k = "ok" if r.status_code == 200 else "429" if r.status_code == 429 else "other"
            with lock:
                counts[k] += 1

def ws_abuse():
    host = base.removeprefix("http://")
    socks = []
    for _ in range(14):  # more than max_connections_per_client (10)
        ws = connect("ws://" + host + "/ws", source_address=(addr, 0), open_timeout=10)
        socks.append(ws)
    for ws in socks[10:]:
        try:
            m = json.loads(ws.recv(timeout=5))
            if m.get("code") == "too_many_connections":
                counts["ws_refused"] += 1
        except Exception:
            pass
    for ws in socks[:10]:
        for i in range(60):  # subscribe / unsubscribe faster than 20 msg/s
            op = "subscribe" if i % 2 == 0 else "unsubscribe"
            try:
                ws.send(json.dumps({"op": op, "channel": "book", "market": "SILVER_V1", "depth": 100}))
            except Exception:
                break
    for ws in socks[:10]:
        try:
            while True:
                m = json.loads(ws.recv(timeout=1))
                counts["ws_msgs"] += 1
                if m.get("code") == "rate_limited":
                    counts["ws_rate_limited"] += 1
        except Exception:
            pass
    for ws in socks:
        try:
            ws.close()
        except Exception:
            pass

threads = [threading.Thread(target=hammer, args=(500,)) for _ in range(4)] + [threading.Thread(target=ws_abuse)]
for t in threads:
    t.start()
for t in threads:
    t.join()
print(json.dumps(counts))
"""


def _p99(xs: list[float]) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, round(0.99 * (len(s) - 1)))]


def _good_client(base: str, n: int, out: list[float], statuses: list[int]) -> None:
    """A well-behaved client: ~10 requests/s (a fifth of its limit), depth and summary alternately."""
    with httpx.Client(base_url=base, timeout=30) as c:
        for i in range(n):
            t0 = time.perf_counter()
            if i % 2 == 0:
                r = c.get("/api/depth", params={"market": "GOLD_V1", "levels": "20"})
            else:
                r = c.get("/api/markets/summary")
            out.append(time.perf_counter() - t0)
            statuses.append(r.status_code)
            time.sleep(0.1)


def test_one_abusive_client_cannot_degrade_the_others(world: tuple[DevChain, str]) -> None:
    chain, db = world
    with serve(chain, db, ServiceOptions(poll_s=0.5)) as (_, url):  # default limits: 50 req/s per client
        base = f"http://{url}"
        baseline: list[float] = []
        base_status: list[int] = []
        _good_client(base, 40, baseline, base_status)
        assert set(base_status) == {200}

        abuser = subprocess.Popen([sys.executable, "-c", ABUSER, base, ABUSER_ADDR], stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
        time.sleep(0.3)  # let the abuse start
        during: list[float] = []
        statuses: list[int] = []
        ws_ok = threading.Event()

        def good_ws() -> None:
            with connect(f"ws://{url}/ws") as ws:
                ws.send(json.dumps({"op": "subscribe", "channel": "book", "market": "GOLD_V1", "depth": 20}))
                for _ in range(5):
                    m = json.loads(ws.recv(timeout=10))
                    if m.get("type") == "snapshot":
                        ws_ok.set()
                        return

        wst = threading.Thread(target=good_ws)
        wst.start()
        _good_client(base, 40, during, statuses)
        wst.join(timeout=30)
        out, err = abuser.communicate(timeout=240)
        assert abuser.returncode == 0, err[-2000:]
        counts = json.loads(out.strip().splitlines()[-1])

    assert counts["429"] > 0 and counts["ok"] > 0, counts  # the abuser was limited, not cut off entirely
    assert counts["ws_refused"] == 4, counts  # 14 connections, 10 allowed
    assert counts["ws_rate_limited"] > 0, counts
    assert statuses == [200] * 40, statuses
    assert ws_ok.is_set(), "the well-behaved WebSocket client got no snapshot"
    b99, d99 = _p99(baseline), _p99(during)
    print(f"good client p99: baseline {b99 * 1000:.1f} ms, under abuse {d99 * 1000:.1f} ms; abuser {counts}")
    assert d99 <= max(10 * b99, b99 + 0.25), (b99, d99)


def test_slow_loris_headers_are_cut_off(world: tuple[DevChain, str]) -> None:
    chain, db = world
    with serve(chain, db, ServiceOptions(poll_s=0.5)) as (_, url):
        host, port = url.split(":")
        request = b"GET /health HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 40 + b"\r\n\r\n"
        assert len(request) > HEADER_TIMEOUT_S * 2  # it would take longer than twice the deadline to finish
        sent = 0
        cut = False
        with socket.create_connection((host, int(port)), timeout=5) as s:
            s.settimeout(1.0)
            for b in request:  # one byte per second, bounded by the request length
                try:
                    s.send(bytes([b]))
                    sent += 1
                    if s.recv(64) == b"":
                        cut = True
                        break
                except TimeoutError:
                    continue
                except OSError:
                    cut = True
                    break
        assert cut, "the server kept a connection that never finished its headers"
        assert sent < len(request)
        # a normal client on the same server is unaffected, and keep-alive requests still work
        with httpx.Client(base_url=f"http://{url}", timeout=10) as c:
            assert [c.get("/health").status_code for _ in range(3)] == [200, 200, 200]


class FakeClock:
    """The limiter's clock, moved by the test: the limit is stated exactly, however slow the machine is."""

    def __init__(self) -> None:
        self.now = time.monotonic() + 1.0  # past any earlier request

    def __call__(self) -> float:
        return self.now


def test_rest_rate_limit_is_exact_per_client_and_refills_after_the_window(world: tuple[DevChain, str]) -> None:
    chain, db = world
    limit = 7
    with serve(chain, db, ServiceOptions(poll_s=0.5, api_requests_per_second=limit)) as (service, url):
        assert service.api is not None
        clock = service.api.limiter.clock = FakeClock()
        base, params = f"http://{url}", {"market": "SILVER_V1"}
        with httpx.Client(base_url=base, timeout=30) as me, \
                httpx.Client(base_url=base, timeout=30,
                             transport=httpx.HTTPTransport(local_address=ABUSER_ADDR)) as other:
            codes = [me.get("/api/depth", params=params).status_code for _ in range(limit + 3)]
            assert codes == [200] * limit + [429] * 3  # exactly `limit` in the window; refusals are not counted
            refused = me.get("/api/depth", params=params)
            assert refused.status_code == 429 and refused.headers["Retry-After"] == "1"
            assert refused.json()["error"] == {"code": "rate_limited", "parameter": None,
                                               "message": f"at most {limit} requests per second per client"}
            assert service.api.limiter.remaining("127.0.0.1") == 0
            assert other.get("/api/depth", params=params).status_code == 200  # per client: another is served
            assert service.api.limiter.remaining(ABUSER_ADDR) == limit - 1
            clock.now += 0.999  # the window has not passed for any of the hits
            assert me.get("/api/depth", params=params).status_code == 429
            clock.now += 0.001  # now it has, for all of them at once
            codes = [me.get("/api/depth", params=params).status_code for _ in range(limit + 1)]
            assert codes == [200] * limit + [429]
            clock.now += 0.5  # a moving window: hits half a window old still count
            assert me.get("/api/depth", params=params).status_code == 429
