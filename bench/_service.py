"""Runs the live service (uvicorn, real port) in its own process for the live benchmarks.

    python -m bench._service --config C --db URL --port P [--limits JSON] [--options JSON]

Prints one line `BENCH_SERVICE {json}` once the first correct book is served (cold start time, RSS).
"""

from __future__ import annotations

import argparse
import gc
import json
import threading
import time

from bench.common import raise_nofile, rss_bytes
from orderbook_pipelines.config import load_config
from orderbook_pipelines.live.hub import Limits
from orderbook_pipelines.live.service import LiveService, ServiceOptions, serve
from orderbook_pipelines.storage.db import engine_for


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", required=True)
    ap.add_argument("--db", required=True)
    ap.add_argument("--port", type=int, required=True)
    ap.add_argument("--limits", default="{}")
    ap.add_argument("--options", default="{}")
    ap.add_argument("--redis", default=None, help="Redis URL: enables the write-through tier")
    ap.add_argument("--redis-prefix", default="obp_bench:")
    ap.add_argument("--gc-freeze", action="store_true",
                    help="experiment: gc.freeze() once the books are loaded (see README, Performance)")
    a = ap.parse_args()
    raise_nofile()
    t_start = time.perf_counter()
    limits = Limits(**json.loads(a.limits))
    service = LiveService(load_config(a.config), engine_for(a.db), limits, ServiceOptions(**json.loads(a.options)),
                          redis_url=a.redis, redis_prefix=a.redis_prefix)
    rss_before = rss_bytes()

    def report() -> None:
        while service.first_book_s is None:
            time.sleep(0.005)
        if a.gc_freeze:
            gc.collect()
            gc.freeze()
        books = service.follower.books.books
        print("BENCH_SERVICE " + json.dumps({
            "first_book_s": service.first_book_s, "cold_start_s": service.follower.stats.cold_start_s,
            "since_process_start_s": time.perf_counter() - t_start, "rss_before": rss_before, "rss": rss_bytes(),
            "markets": len(books), "open_orders": sum(len(b.orders) for b in books.values())}), flush=True)

    threading.Thread(target=report, daemon=True).start()
    serve(service, "127.0.0.1", a.port)


if __name__ == "__main__":
    main()
