"""What every `orderbook` command group shares: failing with a clear message, the config, Postgres, the chain.

Heavy libraries (SQLAlchemy, web3, Dagster) are imported inside these helpers and the commands, never at
module level: `orderbook --help` must not pay for them.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, NoReturn

import typer

if TYPE_CHECKING:
    from sqlalchemy import Engine

    from orderbook_pipelines.chain.rpc import ChainClient, RpcError
    from orderbook_pipelines.config import ProjectConfig

# sysexits' EX_UNAVAILABLE: the node cannot be used. Distinct from every command's own codes (reconcile's 1, 3
# and 4, check's 1), so a runbook never takes "node down" for "ranges differ".
NODE_UNAVAILABLE = 69
# sysexits' EX_CONFIG: the node serves another chain than chain.chain_id (chain/rpc.py WrongChain); nothing was
# written. Not 69: waiting for the node does not help, the URL or the configuration must change.
WRONG_CHAIN = 78
# sysexits' EX_DATAERR: the chain no longer agrees with what is stored beyond the confirmations; an operator follows
# docs/runbooks/reorg-handling.md (the reorg is already recorded for `orderbook reorgs list`).
REORG_DETECTED = 65
INTERRUPTED = 130  # 128 + SIGINT, what a shell reports for Ctrl-C


def fail(msg: str, code: int = 2) -> NoReturn:
    typer.secho(msg, fg=typer.colors.RED, err=True)
    raise typer.Exit(code)


def fail_node(exc: RpcError) -> NoReturn:
    """One red line naming the node and what was tried, instead of a traceback (OBP_LOG_LEVEL=DEBUG logs it)."""
    from orderbook_pipelines.chain.rpc import WrongChain
    from orderbook_pipelines.obs import redact_text

    logging.getLogger("obp.cli").debug("RPC failure", exc_info=exc)
    if isinstance(exc, WrongChain):
        fail(redact_text(str(exc)), WRONG_CHAIN)
    fail(redact_text(f"node {exc.node or '(unknown)'}: {exc}"), NODE_UNAVAILABLE)


def config() -> ProjectConfig:
    """The validated YAML configuration, or exit 2 with every problem listed."""
    from orderbook_pipelines.config import ConfigError, load_config

    try:
        return load_config()
    except ConfigError as exc:
        fail(str(exc))


def database_url() -> str:
    from orderbook_pipelines.config import EnvSettings

    return EnvSettings().database_url


def engine(migrate: bool = True) -> Engine:
    """The engine of DATABASE_URL, migrated first unless told not to (read-only commands)."""
    from orderbook_pipelines.storage.db import engine_for
    from orderbook_pipelines.storage.db import migrate as apply_migrations

    url = database_url()
    if migrate:
        apply_migrations(url)
    return engine_for(url)


def chain_client(cfg: ProjectConfig, retries: int | None = None) -> ChainClient:
    from orderbook_pipelines.chain.rpc import ChainClient

    return ChainClient.from_config(cfg.chain, retries)


def market_id(market: str | None) -> int | None:
    """A market given as id, metric id, metric hash or address -> its id (exit 2 if unknown)."""
    if market is None:
        return None
    from orderbook_pipelines.storage.registry import resolve_market

    with engine().connect() as conn:
        try:
            return resolve_market(conn, market)[0]
        except LookupError as exc:
            fail(str(exc))
