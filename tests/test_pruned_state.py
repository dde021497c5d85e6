"""A node without past state (anvil --prune-history, as `make run` uses; any non-archive node in production):
the book check is reported skipped with the node's words, never as a difference in the books."""

from __future__ import annotations

import os
import subprocess
import time

import pytest

from orderbook_pipelines.chain.rpc import ChainClient
from orderbook_pipelines.devchain.anvil import free_port
from orderbook_pipelines.quality.checks import state_unavailable


@pytest.mark.parametrize("prune", [True, False])
def test_state_unavailable_names_a_pruned_block_and_only_that(prune: bool) -> None:
    port = free_port()
    args = [os.environ["OBP_ANVIL"], "--host", "127.0.0.1", "--port", str(port), "--silent"]
    proc = subprocess.Popen([*args, "--prune-history"] if prune else args)
    try:
        client = ChainClient(f"http://127.0.0.1:{port}", timeout_s=5, retries=0)
        deadline = time.monotonic() + 30
        while True:
            try:
                client.block_number()
                break
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.1)
        client.call("anvil_mine", [hex(20)])
        head = client.block_number()
        assert state_unavailable(client, head) is None
        old = state_unavailable(client, 3)
        if prune:
            assert old is not None and old.strip(), "a pruned block must be reported, with the node's answer"
        else:
            assert old is None
    finally:
        proc.terminate()
        proc.wait(timeout=10)
