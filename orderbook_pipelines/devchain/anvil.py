"""A local anvil process on a free port: the dev chain of the tests and the benchmarks (`make run` uses honcho)."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
from pathlib import Path
from typing import Any

from web3 import Web3
from web3.providers.rpc import HTTPProvider

from orderbook_pipelines.config import PROJECT_ROOT
from orderbook_pipelines.devchain.deploy import wait_for_chain

ANVIL = os.environ.get("OBP_ANVIL") or str(PROJECT_ROOT / "node_modules/@foundry-rs/anvil-linux-amd64/bin/anvil")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Anvil:
    def __init__(self, accounts: int = 20, gas_limit: int = 100_000_000, chain_id: int = 31337,
                 extra: list[str] | None = None, rpc_timeout_s: float = 10.0, port: int | None = None) -> None:
        """`port`: where a node is expected (a test brings a dead node's port to life); default a free one."""
        if not (Path(ANVIL).exists() or shutil.which(ANVIL)):
            raise RuntimeError(f"anvil not found at {ANVIL}: run `make setup` (installs it from npm)")
        self.port = free_port() if port is None else port
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen(
            [ANVIL, "--port", str(self.port), "--silent", "--accounts", str(accounts), "--gas-limit", str(gas_limit),
             "--chain-id", str(chain_id), *(extra or [])],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
        )
        wait_for_chain(self.url, timeout_s=30)
        self.w3 = Web3(HTTPProvider(self.url, request_kwargs={"timeout": rpc_timeout_s}))

    def rpc(self, method: str, *params: object) -> Any:
        resp = self.w3.provider.make_request(method, list(params))  # type: ignore[arg-type]
        if resp.get("error"):
            raise RuntimeError(f"{method}: {resp['error']}")
        return resp.get("result")

    def mine(self, n: int = 1) -> None:
        # in steps: thousands of blocks in one call can outlast the RPC timeout on a loaded machine
        while n > 0:
            step = min(n, 500)
            self.rpc("anvil_mine", hex(step))
            n -= step

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()

    def __enter__(self) -> Anvil:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
