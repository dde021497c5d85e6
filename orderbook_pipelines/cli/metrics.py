"""`orderbook metrics`: the chain-vs-index state exporter for Prometheus (quality/exporter.py)."""

from __future__ import annotations

import time
from typing import TYPE_CHECKING

import typer

from orderbook_pipelines.cli.common import chain_client, config, engine

if TYPE_CHECKING:
    from prometheus_client import CollectorRegistry

app = typer.Typer(no_args_is_help=True, help="State exporter for Prometheus (chain vs index, checks).")


def _registry() -> CollectorRegistry:
    from orderbook_pipelines.quality.exporter import registry_for

    cfg = config()
    return registry_for(cfg, engine(migrate=False), chain_client(cfg, retries=1))


@app.command("show")
def show() -> None:
    """Print the exported state once (Prometheus text format): head, indexed, lag, reorgs, failing checks."""
    from prometheus_client import generate_latest

    typer.echo(generate_latest(_registry()).decode(), nl=False)


@app.command("serve")
def serve(host: str = typer.Option("127.0.0.1"), port: int = typer.Option(9464, min=1, max=65535)) -> None:
    """Serve the state on http://HOST:PORT/metrics until interrupted."""
    from prometheus_client import start_http_server

    start_http_server(port, addr=host, registry=_registry())
    typer.echo(f"exporter on http://{host}:{port}/metrics")
    while True:
        time.sleep(3600)
