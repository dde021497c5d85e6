"""State exporter: chain head vs indexed vs finalized, staleness, deep reorgs and failed checks, read at scrape time.

Dagster runs are short-lived processes, so their in-process counters are never scraped; what alerts need is
the *state* (how far the index is behind a moving head, whether checks fail), and Postgres plus the chain
are its truth. `orderbook metrics serve` exposes it on /metrics; `orderbook metrics show` prints it once.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import typer
from prometheus_client import CollectorRegistry, generate_latest, start_http_server
from prometheus_client.core import GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from sqlalchemy import Engine, text

from orderbook_pipelines.chain.rpc import ChainClient
from orderbook_pipelines.config import ProjectConfig


def contiguous_indexed(ranges: list[tuple[int, int, int]], start_block: int) -> int:
    """Highest block N such that every block from the deployment block to N is written (gaps stop it).

    `ranges` are (range_start, range_end, processed_to) rows; -1 before anything is indexed.
    """
    upto = start_block - 1
    for rs, _, processed in sorted(ranges):
        if rs > upto + 1:
            break
        upto = max(upto, processed)
    return upto if upto >= start_block else -1


class StateCollector(Collector):
    def __init__(self, config: ProjectConfig, engine: Engine, chain: ChainClient):
        self.config, self.engine, self.chain = config, engine, chain

    def collect(self) -> Iterator[Metric]:
        t0 = time.perf_counter()
        c = self.config.chain
        up = 1.0
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
            indexed = contiguous_indexed(ranges, c.start_block)  # type: ignore[arg-type]
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
            yield GaugeMetricFamily("obp_deep_reorgs", "Reorgs deeper than the confirmation depth found by "
                                    "reconciliation (rows of table reorgs)", value=reorgs)
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


metrics_app = typer.Typer(no_args_is_help=True, help="State exporter for Prometheus (chain vs index, checks).")


def _registry() -> CollectorRegistry:
    from orderbook_pipelines.config import EnvSettings, load_config
    from orderbook_pipelines.storage.db import engine_for

    cfg = load_config()
    c = cfg.chain
    return registry_for(cfg, engine_for(EnvSettings().database_url),
                        ChainClient(c.rpc_url, c.rpc_timeout_s, 1, c.max_logs_range))


@metrics_app.command("show")
def show() -> None:
    """Print the exported state once (Prometheus text format): head, indexed, lag, reorgs, failing checks."""
    typer.echo(generate_latest(_registry()).decode(), nl=False)


@metrics_app.command("serve")
def serve(host: str = typer.Option("127.0.0.1"), port: int = typer.Option(9464, min=1, max=65535)) -> None:
    """Serve the state on http://HOST:PORT/metrics until interrupted."""
    start_http_server(port, addr=host, registry=_registry())
    typer.echo(f"exporter on http://{host}:{port}/metrics")
    while True:
        time.sleep(3600)
