"""`orderbook live`: run the live depth service, and the operator's emergency pause of its publishers."""

from __future__ import annotations

import hashlib
import logging
import os
from typing import TYPE_CHECKING

import typer

from orderbook_pipelines.cli.common import config, engine, fail, fail_node

if TYPE_CHECKING:
    from orderbook_pipelines.config import ProjectConfig

app = typer.Typer(no_args_is_help=True, help="Live depth service: WebSocket + REST.")
log = logging.getLogger("obp.live")

REDIS_ROOT = "obp"


def deployment_id(cfg: ProjectConfig, anchor: str) -> str:
    """Ten hex digits naming one deployment: the chain id, the start block, the sources' fixed contract addresses
    and `anchor`, the hash of the start block on this chain.

    The addresses alone are not enough: a fresh dev chain deploys the same contracts from the same account and
    nonces, so it gets the same addresses every time, but never the same start block hash (block timestamps).
    Markets added later (`addresses: markets` sources, a market's own address) do not change the id: adding a
    market must not move every key of a running deployment.
    """
    fixed = sorted({a.lower() for s in cfg.sources if isinstance(s.addresses, list) for a in s.addresses})
    material = "|".join([str(cfg.chain.chain_id), str(cfg.chain.start_block), anchor.lower(), *fixed])
    return hashlib.blake2b(material.encode(), digest_size=5).hexdigest()


def redis_prefix(cfg: ProjectConfig, anchor: str) -> str:
    """`obp:<chain id>:<deployment id>:`, the start of every Redis key and channel of the live service, so that a
    new chain or deployment never reads the keys an earlier one left (see docs/runbooks/local-stack.md)."""
    return f"{REDIS_ROOT}:{cfg.chain.chain_id}:{deployment_id(cfg, anchor)}:"


def _anchor(cfg: ProjectConfig) -> str:
    """The hash of the configured start block, from the node (exit 69 with one line if the node cannot answer)."""
    from orderbook_pipelines.chain.rpc import ChainClient, RpcError

    try:
        return ChainClient.from_config(cfg.chain).header(cfg.chain.start_block).hash
    except RpcError as exc:
        fail_node(exc)


@app.command("serve")
def live_serve(host: str = typer.Option("127.0.0.1"), port: int = typer.Option(8080, min=1, max=65535),
               cluster: bool = typer.Option(False, help="share markets with other processes through REDIS_URL"),
               worker_id: str | None = typer.Option(None, help="with --cluster: follow the chain as this worker "
                                                          "(omit for an API-only process)"),
               redis_prefix_opt: str | None = typer.Option(
                   None, "--redis-prefix", envvar="OBP_REDIS_PREFIX",
                   help="prefix of every Redis key and channel; default obp:<chain id>:<deployment id>: where the "
                        "deployment id hashes the start block's hash and the sources' addresses (reading that "
                        "hash needs the node at start; give the prefix to start without it)")) -> None:
    """Follow the chain tip and serve /ws, /api/*, /health, /ready, /metrics."""
    from orderbook_pipelines.live.service import LiveService, serve

    cfg = config()
    redis_url = os.environ.get("REDIS_URL") or None
    if cluster and not redis_url:
        fail("--cluster needs REDIS_URL (the processes share markets and streams through Redis)")
    prefix = redis_prefix_opt or (redis_prefix(cfg, _anchor(cfg)) if redis_url else f"{REDIS_ROOT}:")
    # Not migrated here: the service only reads, and may run as the read-only obp_api role (docs/security.md),
    # which cannot take the migration lock; `orderbook db init` (schema owner) migrates.
    service = LiveService(cfg, engine(migrate=False), redis_url=redis_url, cluster=cluster, worker_id=worker_id,
                          redis_prefix=prefix)
    if redis_url:
        log.info("live: Redis keys and channels under %s", prefix)
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
