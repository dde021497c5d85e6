"""State exporter: chain head vs indexed vs finalized, staleness, deep reorgs and failed checks, read at scrape time.

Dagster runs are short-lived processes, so their in-process counters are never scraped; what alerts need is
the *state* (how far the index is behind a moving head, whether checks fail), and Postgres plus the chain
are its truth. `orderbook metrics serve` exposes it on /metrics; `orderbook metrics show` prints it once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, text

from orderbook_pipelines.chain.rpc import ChainClient
from orderbook_pipelines.config import ProjectConfig
from orderbook_pipelines.storage import checkpoints


class StateCollector(Collector):
    def __init__(self, config: ProjectConfig, engine: Engine, chain: ChainClient):
        self.config, self.engine, self.chain = config, engine, chain

    def collect(self) -> Iterator[Metric]:
        t0 = time.perf_counter()
        c = self.config.chain
        up = 1.0
        head: int | None
        safe: int | None
        chain_fams: list[GaugeMetricFamily] = []
        try:
            head = self.chain.block_number()
            safe = self.chain.safe_head(c.finality, c.confirmations)
            chain_fams.append(GaugeMetricFamily("obp_chain_head_block", "Chain head (latest block)", value=head))
            chain_fams.append(GaugeMetricFamily("obp_chain_safe_block",
                                                "Highest final block per the configured finality", value=safe))
            try:
                fin = self.chain.header("finalized").number
                chain_fams.append(GaugeMetricFamily("obp_chain_finalized_block", "The node's finalized tag",
                                                    value=fin))
            except Exception:  # nodes without the tag: the safe head says it all
                pass
        except Exception:
            head = safe = None
            up = 0.0
        yield from chain_fams

        try:
            with self.engine.connect() as conn:
                ranges = [tuple(r) for r in conn.execute(text(
                    "SELECT range_start, range_end, processed_to FROM ingestion_checkpoints WHERE chain_id = :c"),
                    {"c": c.chain_id})]
                latest_event = conn.execute(text(
                    "SELECT coalesce(max(block_number), -1) FROM order_events WHERE chain_id = :c"),
                    {"c": c.chain_id}).scalar_one()
                events = conn.execute(text(
                    "SELECT coalesce(sum(events), 0) FROM ingestion_checkpoints WHERE chain_id = :c"),
                    {"c": c.chain_id}).scalar_one()
                reorgs, unrepaired = conn.execute(text(
                    "SELECT count(*), count(*) FILTER (WHERE NOT repaired) FROM reorgs WHERE chain_id = :c"),
                    {"c": c.chain_id}).one()
                failing = conn.execute(text(
                    """SELECT check_name, count(*) FILTER (WHERE NOT passed) FROM (
                           SELECT DISTINCT ON (market_id, check_name) market_id, check_name, passed
                           FROM market_checks WHERE chain_id = :c
                           ORDER BY market_id, check_name, range_start DESC) latest
                       GROUP BY check_name"""), {"c": c.chain_id}).all()
            frontier = checkpoints.contiguous(ranges, c.start_block)
            indexed = -1 if frontier is None else frontier
            yield GaugeMetricFamily("obp_indexed_block", "Highest block indexed contiguously from the deployment "
                                    "block (ingestion_checkpoints)", value=indexed)
            yield GaugeMetricFamily("obp_indexed_max_block", "Highest block of any indexed range",
                                    value=max((r[2] for r in ranges), default=-1))
            yield GaugeMetricFamily("obp_latest_event_block", "Block of the newest stored order event",
                                    value=latest_event)
            yield GaugeMetricFamily("obp_indexed_events", "Order events recorded by ingestion checkpoints",
                                    value=float(events))
            if head is not None:
                yield GaugeMetricFamily("obp_index_lag_blocks", "Chain head minus obp_indexed_block",
                                        value=head - indexed)
                yield GaugeMetricFamily("obp_index_final_lag_blocks", "Safe head minus obp_indexed_block "
                                        "(what ingestion could have written)", value=max(0, (safe or 0) - indexed))
            yield GaugeMetricFamily("obp_deep_reorgs", "Reorgs deeper than the confirmation depth, recorded by "
                                    "ingestion or reconciliation (rows of table reorgs)", value=reorgs)
            yield GaugeMetricFamily("obp_deep_reorgs_unrepaired", "Such reorgs not repaired", value=unrepaired)
            checks = GaugeMetricFamily("obp_asset_checks_failing",
                                       "Markets whose latest checked range failed this check", labels=["check"])
            for name, n in failing:
                checks.add_metric([name], n)
            yield checks
        except Exception:
            up = 0.0
        yield GaugeMetricFamily("obp_exporter_up", "1 if the chain and Postgres both answered this scrape", value=up)
        yield GaugeMetricFamily("obp_exporter_scrape_seconds", "Time this scrape took",
                                value=time.perf_counter() - t0)


def registry_for(config: ProjectConfig, engine: Engine, chain: ChainClient) -> CollectorRegistry:
    reg = CollectorRegistry(auto_describe=False)
    reg.register(StateCollector(config, engine, chain))
    return reg
