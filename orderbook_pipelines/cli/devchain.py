"""`orderbook devchain`: the local chain `make run` starts (reference contracts deployed, order flow simulated)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import typer

app = typer.Typer(no_args_is_help=True, help="Local dev chain: deploy reference contracts, simulate flow.")

GEN1_MARKETS = ["SILVER_V1", "GOLD_V1", "COPPER_V1", "OIL_WTI_V1", "GAS_HH_V1", "CORN_V1", "WHEAT_V1", "BTC_HASH_V1"]
GEN2_MARKETS = ["ALUMINUM_V1", "NICKEL_V1", "ZINC_V1", "LITHIUM_V1"]
WAIT_HELP = "seconds to wait for the chain to answer (make run gives the chain it starts alongside more)"


def _deploy(rpc_url: str, gen1: list[str], gen2: list[str], wait_s: float) -> Any:
    """Deploy after waiting for the node; no node within the wait is one line and exit 69, like every command."""
    from orderbook_pipelines.cli.common import NODE_UNAVAILABLE, fail
    from orderbook_pipelines.devchain.deploy import ChainUnavailable, deploy

    try:
        return deploy(rpc_url, gen1, gen2, wait_s=wait_s, progress=lambda m: typer.echo(m, err=True))
    except ChainUnavailable as exc:
        fail(f"orderbook devchain: {exc}", NODE_UNAVAILABLE)


@app.command("deploy")
def devchain_deploy(rpc_url: str = typer.Option("http://127.0.0.1:8545"),
                    config_out: Path = typer.Option(Path(".run/devchain.yaml")),
                    gen1: int = typer.Option(8, min=0, max=len(GEN1_MARKETS)),
                    gen2: int = typer.Option(4, min=0, max=len(GEN2_MARKETS)),
                    confirmations: int = typer.Option(2, min=0),
                    range_size: int = typer.Option(100, min=1),
                    wait: float = typer.Option(10.0, min=0.0, help=WAIT_HELP)) -> None:
    """Deploy router + books and write the indexer configuration for them."""
    from orderbook_pipelines.devchain.deploy import project_config, write_config

    dep = _deploy(rpc_url, GEN1_MARKETS[:gen1], GEN2_MARKETS[:gen2], wait)
    write_config(project_config(dep, confirmations, range_size), config_out)
    typer.echo(f"deployed router {dep.router}, {gen1} gen-1 and {gen2} gen-2 markets from block "
               f"{dep.start_block}; config written to {config_out}")


@app.command("up")
def devchain_up(rpc_url: str = typer.Option("http://127.0.0.1:8545"),
                config_out: Path = typer.Option(Path(".run/devchain.yaml")),
                rate: float = typer.Option(5.0, min=0.1, help="orders per second"),
                range_size: int = typer.Option(30, min=1, help="blocks per Dagster partition: a range runs once, "
                                               "when final, so this bounds how far Postgres trails the chain"),
                seed: int = typer.Option(7),
                wait: float = typer.Option(10.0, min=0.0, help=WAIT_HELP)) -> None:
    """Deploy, write the config, then simulate order flow until interrupted."""
    from orderbook_pipelines.devchain.deploy import project_config, wait_for_chain, write_config
    from orderbook_pipelines.devchain.simulator import Simulator

    dep = _deploy(rpc_url, GEN1_MARKETS, GEN2_MARKETS, wait)
    write_config(project_config(dep, range_size=range_size), config_out)
    typer.echo(f"deployed; config at {config_out}; simulating {rate}/s (seed {seed})")
    sim = Simulator(wait_for_chain(rpc_url), dep, seed=seed)
    sim.run_forever(rate, report=lambda s: typer.echo(
        f"sim: sent={s.sent} limit={s.limit} market={s.market} cancels={s.cancels} reverted={s.reverted}"))
