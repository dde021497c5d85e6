"""`orderbook live`: run the live depth service, and the operator's emergency pause of its publishers."""

from __future__ import annotations

import os

import typer

from orderbook_pipelines.cli.common import config, engine, fail

app = typer.Typer(no_args_is_help=True, help="Live depth service: WebSocket + REST.")


@app.command("serve")
def live_serve(host: str = typer.Option("127.0.0.1"), port: int = typer.Option(8080, min=1, max=65535),
               cluster: bool = typer.Option(False, help="share markets with other processes through REDIS_URL"),
               worker_id: str | None = typer.Option(None, help="with --cluster: follow the chain as this worker "
                                                          "(omit for an API-only process)")) -> None:
    """Follow the chain tip and serve /ws, /api/*, /health, /ready, /metrics."""
    from orderbook_pipelines.live.service import LiveService, serve

    cfg = config()
    redis_url = os.environ.get("REDIS_URL") or None
    if cluster and not redis_url:
        fail("--cluster needs REDIS_URL (the processes share markets and streams through Redis)")
    service = LiveService(cfg, engine(), redis_url=redis_url, cluster=cluster, worker_id=worker_id)
    serve(service, host, port)


@app.command("pause")
def live_pause(market: str | None = typer.Option(None, help="one market; all markets when omitted"),
               resume: bool = typer.Option(False, help="resume instead of pause"),
               url: str = typer.Option("http://127.0.0.1:8080")) -> None:
    """Emergency pause (or resume) of publishers; needs OBP_ADMIN_TOKEN, the same the service was started with."""
    import httpx

    token = os.environ.get("OBP_ADMIN_TOKEN")
    if not token:
        fail("OBP_ADMIN_TOKEN is not set")
    body = {"paused": not resume, **({"market": market} if market else {})}
    r = httpx.post(f"{url}/admin/pause", json=body, headers={"Authorization": f"Bearer {token}"}, timeout=10)
    if r.status_code != 200:
        fail(f"pause failed: HTTP {r.status_code}: {r.text}")
    typer.echo(r.text)
