"""`orderbook` command line: database setup, dev chain, manual ingestion and the market registry.

One module per command group; every module imports its heavy libraries (SQLAlchemy, web3, Dagster, pydantic
settings) inside the commands, so `orderbook --help` starts in a fraction of a second (tests/test_cli.py).
Every command ends the same way on Ctrl-C (exit 130), an unusable node (exit 69), a node of another chain (78) or a
reorg deeper than the confirmations (65): one red line, no traceback.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Any

import typer
from typer.core import TyperGroup

from orderbook_pipelines.cli import (
    check,
    db,
    devchain,
    ingest,
    live,
    markets,
    metrics,
    reconcile,
    reorgs,
    replay,
    snapshot,
)
from orderbook_pipelines.cli.common import INTERRUPTED, REORG_DETECTED, fail, fail_node

if TYPE_CHECKING:
    from typer._click import Context  # typer vendors click: the base class its groups are typed with


class _Orderbook(TyperGroup):
    """The top-level group: one place where every command's Ctrl-C and node failures become one line."""

    def invoke(self, ctx: Context) -> Any:
        try:
            return super().invoke(ctx)
        except KeyboardInterrupt:
            fail(f"{' '.join(filter(None, ('orderbook', ctx.invoked_subcommand)))}: interrupted", INTERRUPTED)
        except Exception as exc:
            rpc = sys.modules.get("orderbook_pipelines.chain.rpc")  # loaded only by commands that use the node
            if rpc is not None and isinstance(exc, rpc.RpcError):
                fail_node(exc)
            writer = sys.modules.get("orderbook_pipelines.storage.writer")
            if writer is not None and isinstance(exc, writer.ReorgDetected):
                fail(f"{' '.join(filter(None, ('orderbook', ctx.invoked_subcommand)))}: {exc}; recorded (orderbook "
                     "reorgs list); see docs/runbooks/reorg-handling.md", REORG_DETECTED)
            raise


app = typer.Typer(cls=_Orderbook, no_args_is_help=True, add_completion=False,
                  help="`orderbook` command line: database setup, dev chain, manual ingestion and the market registry.")


@app.callback()
def _bootstrap() -> None:
    # Secret files and JSON logs before any command runs; obs (structlog) is imported here, not at start.
    from orderbook_pipelines import obs

    obs.bootstrap()


app.command("wait-config")(ingest.wait_config)
app.command("ingest")(ingest.ingest)
app.add_typer(db.app, name="db")
app.add_typer(devchain.app, name="devchain")
app.add_typer(markets.app, name="markets")
app.add_typer(live.app, name="live")
app.add_typer(snapshot.app, name="snapshot")
app.add_typer(replay.app, name="replay")
app.add_typer(reconcile.app, name="reconcile")
app.add_typer(check.app, name="check")
app.add_typer(reorgs.app, name="reorgs")
app.add_typer(metrics.app, name="metrics")

__all__ = ["app"]
