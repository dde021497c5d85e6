"""Shared fixtures: a real anvil chain, real Postgres databases made (and dropped) per test module."""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import pytest
from sqlalchemy.engine import make_url
from web3 import Web3
from web3.providers.rpc import HTTPProvider

from orderbook_pipelines.config import ProjectConfig, load_config
from orderbook_pipelines.devchain.anvil import Anvil
from orderbook_pipelines.devchain.deploy import Deployment, deploy, project_config, write_config
from orderbook_pipelines.storage.db import drop_database, ensure_database, migrate, sqlalchemy_url

PG_SERVER = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")


@pytest.fixture(scope="session")
def anvil_factory() -> Iterator[type[Anvil]]:
    started: list[Anvil] = []

    class _Tracked(Anvil):
        def __init__(self) -> None:
            super().__init__()
            started.append(self)

    yield _Tracked
    for a in started:
        a.stop()


# The installed command, as users run it; `cli_argv` is the same command through this interpreter (no script shim).
ORDERBOOK = str(Path(sys.executable).parent / "orderbook")


def cli_argv(*args: str) -> list[str]:
    return [sys.executable, "-c", "from orderbook_pipelines.cli import app; app()", *args]

def new_database() -> str:
    u = make_url(sqlalchemy_url(PG_SERVER)).set(database=f"obp_test_{uuid.uuid4().hex[:10]}")
    url = u.render_as_string(hide_password=False)
    ensure_database(url)
    migrate(url)
    return url


@pytest.fixture
def database() -> Iterator[str]:
    url = new_database()
    yield url
    drop_database(url)


ROUTER = "0x" + "11" * 20
GEN1_BOOK = "0x" + "22" * 20
GEN2_BOOK = "0x" + "33" * 20


def sample_config(**kw: int) -> dict:
    """A valid configuration document for made-up addresses (one gen-1 and one gen-2 market); no chain needed."""
    dep = Deployment(rpc_url="http://x", chain_id=31337, start_block=1, router=ROUTER,
                     gen1_books={"SILVER_V1": GEN1_BOOK}, gen2_books={"ALUMINUM_V1": GEN2_BOOK})
    return project_config(dep, **kw)


@dataclass
class DevChain:
    anvil: Anvil
    dep: Deployment
    config_path: Path
    config: ProjectConfig


def make_devchain(anvil: Anvil, tmp: Path, gen1: list[str], gen2: list[str], confirmations: int = 2,
                  range_size: int = 25) -> DevChain:
    dep = deploy(anvil.url, gen1, gen2)
    path = tmp / "config.yaml"
    write_config(project_config(dep, confirmations=confirmations, range_size=range_size), path)
    return DevChain(anvil, dep, path, load_config(path))


def _build_simulated_chain(anvil: Anvil, tmp: Path) -> DevChain:
    from orderbook_pipelines.cli.devchain import GEN1_MARKETS, GEN2_MARKETS
    from orderbook_pipelines.devchain.simulator import Simulator

    chain = make_devchain(anvil, tmp, GEN1_MARKETS, GEN2_MARKETS)
    t0 = time.perf_counter()
    stats = Simulator(anvil.w3, chain.dep, seed=11, traders=10).run_batches(5000, per_block=40)
    anvil.mine(chain.config.chain.confirmations + 1)
    print(f"simulated {stats} in {time.perf_counter() - t0:.1f}s")
    return chain


class _SharedAnvil(Anvil):
    """A node another test worker started: this worker talks to it and never stops it (the controller does)."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.port = int(url.rsplit(":", 1)[1])
        self.w3 = Web3(HTTPProvider(url, request_kwargs={"timeout": 10.0}))

    def stop(self) -> None:
        pass


def _shared_root(config: pytest.Config) -> Path:
    """The directory all test workers of one run share: the controller's base temp directory."""
    base = config._tmp_path_factory.getbasetemp()  # type: ignore[attr-defined]
    return base.parent if hasattr(config, "workerinput") else base


@pytest.fixture(scope="session")
def simulated_chain(anvil_factory: type[Anvil], tmp_path_factory: pytest.TempPathFactory,
                    request: pytest.FixtureRequest) -> DevChain:
    """12 markets (8 gen-1, 4 gen-2) and 5,000 simulated orders, then enough blocks to make them final.

    Built once per run, not once per test worker: the first worker to ask builds it under a file lock and records
    it; the others attach to the same node (no test writes to this chain). The controller stops the node at the end
    of the run, because the worker that built it may finish first."""
    if not hasattr(request.config, "workerinput"):
        return _build_simulated_chain(anvil_factory(), tmp_path_factory.mktemp("sim"))
    root = _shared_root(request.config)
    record, lock = root / "simulated_chain.json", root / "simulated_chain.lock"
    with open(lock, "w") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        if not record.exists():
            anvil = Anvil()  # not the factory's: it must outlive this worker
            (root / f"anvil-{anvil.proc.pid}.pid").write_text(str(anvil.proc.pid))
            chain = _build_simulated_chain(anvil, root / "sim")
            record.write_text(json.dumps({"url": anvil.url, "dep": asdict(chain.dep),
                                          "config": str(chain.config_path)}))
            return chain
    shared = json.loads(record.read_text())
    path = Path(shared["config"])
    return DevChain(_SharedAnvil(shared["url"]), Deployment(**shared["dep"]), path, load_config(path))


def pytest_sessionfinish(session: pytest.Session) -> None:
    """Stop the nodes test workers left for the whole run (the shared simulated chain)."""
    if hasattr(session.config, "workerinput"):
        return
    for pidfile in _shared_root(session.config).glob("anvil-*.pid"):
        with contextlib.suppress(ProcessLookupError, ValueError):
            os.kill(int(pidfile.read_text()), signal.SIGTERM)
        pidfile.unlink()


def pytest_configure(config: pytest.Config) -> None:
    """Draw the fork scenarios' base seed once, in the process that starts the test workers (they inherit the
    environment): every worker must collect the same seeded test ids, and one printed seed reruns them all."""
    if not hasattr(config, "workerinput") and not os.environ.get("OBP_FORK_BASE_SEED"):
        import random

        os.environ["OBP_FORK_BASE_SEED"] = str(random.SystemRandom().getrandbits(32))


def eventually(probe: Callable[[], Any], ok: Callable[[Any], bool], timeout: float, what: str,
               every: float = 0.1) -> Any:
    """Poll `probe` until `ok(result)`: a condition, never a fixed sleep; the last result is in the failure message."""
    deadline = time.monotonic() + timeout
    while True:
        got = probe()
        if ok(got):
            return got
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: still {got!r} after {timeout:.0f}s")
        time.sleep(every)
