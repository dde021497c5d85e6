"""Shared plumbing for the benchmarks: anvil, throwaway databases (obp_bench_*), the EventSpammer load generator,
the bench configuration, and the output format (one JSON line per figure plus a short human table)."""

from __future__ import annotations

import contextlib
import copy
import json
import os
import resource
import signal
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml
from eth_utils import keccak
from sqlalchemy.engine import make_url
from web3 import Web3

from orderbook_pipelines.config import PROJECT_ROOT, ProjectConfig, load_config
from orderbook_pipelines.devchain.anvil import Anvil as DevAnvil
from orderbook_pipelines.devchain.deploy import GEN1_ROUTER_EVENTS, artifact
from orderbook_pipelines.storage.db import drop_database, ensure_database, migrate, sqlalchemy_url

PG_SERVER = os.environ.get("DATABASE_URL", "postgresql://postgres@127.0.0.1:5432/postgres")
REDIS_URL = os.environ.get("REDIS_URL", "redis://127.0.0.1:6379/0")
CHAIN_ID = 31337
TICK = 10**16
UNIT = 10**18


# -- output -----------------------------------------------------------------------------------------------------
@dataclass
class Report:
    bench: str
    rows: list[dict[str, Any]] = field(default_factory=list)

    def figure(self, name: str, value: float, unit: str, **params: Any) -> float:
        row = {"bench": self.bench, "name": name, "value": round(float(value), 4), "unit": unit, "params": params}
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        return value

    def table(self, title: str | None = None) -> None:
        print(f"\n== {title or self.bench} ==")
        w = max(len(r["name"]) for r in self.rows) if self.rows else 10
        for r in self.rows:
            v = r["value"]
            txt = f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.3f}"
            print(f"  {r['name']:<{w}}  {txt:>14} {r['unit']}")
        print(flush=True)


def _exit_on_term(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


signal.signal(signal.SIGTERM, _exit_on_term)  # run the cleanup (drop databases, stop anvil) on kill


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def raise_nofile(want: int = 65536) -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = min(want, hard) if hard != resource.RLIM_INFINITY else want
    if soft < target:
        resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_bytes(pid: int | str = "self") -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


_TCK = os.sysconf("SC_CLK_TCK")


def _stat(pid: int | str) -> list[str]:
    return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()


def process_cpu_s(pid: int | str) -> float:
    """CPU seconds (user + system) of one live process."""
    f = _stat(pid)
    return (int(f[11]) + int(f[12])) / _TCK


def postgres_cpu_s() -> float:
    """CPU seconds of the local Postgres server: every live server process plus the exited backends the postmaster
    has reaped (its children's time), so connections that close during a measurement still count."""
    total = 0.0
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            if Path(f"/proc/{d}/comm").read_text().strip() != "postgres":
                continue
            f = _stat(d)
            total += (int(f[11]) + int(f[12])) / _TCK
            ppid = f[1]
            if Path(f"/proc/{ppid}/comm").read_text().strip() != "postgres":  # the postmaster
                total += (int(f[13]) + int(f[14])) / _TCK
        except (FileNotFoundError, ProcessLookupError, IndexError):
            continue
    return total


def own_cpu_s() -> float:
    """CPU seconds of this process and of its reaped children (worker processes once their pool has exited)."""
    s, c = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return s.ru_utime + s.ru_stime + c.ru_utime + c.ru_stime


def process_env() -> dict[str, str]:
    """The environment of a measured process, with a bytecode cache as users have one (pip compiles on install;
    Python writes caches on first run). A shell exporting PYTHONDONTWRITEBYTECODE over a venv installed without
    bytecode would otherwise compile every module at every start (seconds of CPU); the cache lives in .run/bench."""
    env = {k: v for k, v in os.environ.items() if k != "PYTHONDONTWRITEBYTECODE"}
    env["PYTHONPYCACHEPREFIX"] = str(PROJECT_ROOT / ".run" / "bench" / "pycache")
    return env


def warm_up(env: dict[str, str], *argvs: list[str]) -> None:
    """Untimed runs that fill the bytecode and page caches before anything is measured."""
    import subprocess

    for argv in argvs:
        subprocess.run(argv, cwd=PROJECT_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                       check=True)


def children_cpu_s() -> float:
    """CPU seconds of this process's reaped children (and theirs): the measured processes, not the bench."""
    c = resource.getrusage(resource.RUSAGE_CHILDREN)
    return c.ru_utime + c.ru_stime


def percentile(xs: list[float], p: float) -> float:
    if not xs:
        return float("nan")
    s = sorted(xs)
    k = min(len(s) - 1, max(0, round(p / 100 * (len(s) - 1))))
    return s[k]


# -- services ---------------------------------------------------------------------------------------------------
class Anvil(DevAnvil):
    """The dev chain with a block gas limit for event floods and a long RPC timeout for huge log answers."""

    def __init__(self, gas_limit: int = 2_000_000_000, extra: list[str] | None = None, accounts: int = 4) -> None:
        super().__init__(accounts=accounts, gas_limit=gas_limit, chain_id=CHAIN_ID, extra=extra, rpc_timeout_s=600)


@contextlib.contextmanager
def anvil(**kw: Any) -> Iterator[Anvil]:
    a = Anvil(**kw)
    try:
        yield a
    finally:
        a.stop()


@contextlib.contextmanager
def bench_database(tag: str) -> Iterator[str]:
    """A fresh, migrated database `obp_bench_<tag>_<random>`, dropped afterwards."""
    u = make_url(sqlalchemy_url(PG_SERVER)).set(database=f"obp_bench_{tag}_{uuid.uuid4().hex[:8]}")
    url = u.render_as_string(hide_password=False)
    ensure_database(url)
    try:
        migrate(url)
        yield url
    finally:
        drop_database(url)


# -- load generator ---------------------------------------------------------------------------------------------
def market_name(i: int) -> str:
    return f"BENCH_{i:04d}"


def market_mid(i: int) -> int:
    return (1000 + i) * UNIT


def events_per_burst(opens: int) -> int:
    return opens + opens // 4 + opens // 8


class Spammer:
    """The deployed EventSpammer plus the bookkeeping of the order ids it has used."""

    def __init__(self, chain: Anvil):
        self.chain = chain
        w3 = chain.w3
        self.sender = w3.eth.accounts[0]
        art = artifact("EventSpammer")
        factory = w3.eth.contract(abi=art["abi"], bytecode=art["bytecode"])
        tx = w3.eth.send_transaction({"from": self.sender, "data": factory.constructor().build_transaction(
            {"from": self.sender, "gas": 5_000_000})["data"], "gas": 5_000_000})
        rcpt = w3.eth.wait_for_transaction_receipt(tx)
        self.address = rcpt["contractAddress"].lower()
        self.start_block = int(rcpt["blockNumber"])
        self.contract = w3.eth.contract(address=Web3.to_checksum_address(self.address), abi=art["abi"])
        self.next_id = 1
        self.nonce = w3.eth.get_transaction_count(self.sender)

    def send_burst(self, market: int, opens: int) -> str:
        data = self.contract.encode_abi("burst", [market_name(market), self.next_id, opens, market_mid(market),
                                                  TICK, UNIT])
        self.next_id += opens
        gas = 60_000 + opens * 9_000
        resp = self.chain.w3.provider.make_request("eth_sendTransaction", [
            {"from": self.sender, "to": self.address, "data": data, "gas": hex(gas), "gasPrice": hex(2 * 10**9),
             "nonce": hex(self.nonce)}])
        if resp.get("error"):
            raise RuntimeError(f"eth_sendTransaction failed: {resp['error']}")
        self.nonce += 1
        return resp["result"]


def bench_config(spammer_address: str, start_block: int, markets: int, path: Path, rpc_url: str,
                 range_size: int = 100, confirmations: int = 0, max_logs_range: int = 2000) -> ProjectConfig:
    """The indexer configuration for the spammer: gen-1 router ABI and mapping, `markets` metric ids."""
    doc = {
        "chain": {"rpc_url": rpc_url, "chain_id": CHAIN_ID, "start_block": start_block, "finality": "depth",
                  "confirmations": confirmations, "range_size": range_size, "max_logs_range": max_logs_range,
                  "rpc_timeout_s": 600},
        "sources": [{
            "name": "gen1_router",
            "abi": str(PROJECT_ROOT / "contracts/artifacts/OrderRouter.json"),
            "addresses": [spammer_address],
            "events": copy.deepcopy(GEN1_ROUTER_EVENTS),
        }],
        "markets": [{"metric_id": market_name(i), "source": "gen1_router", "decimals": 18} for i in range(markets)],
    }
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    return load_config(path)


def metric_hash(i: int) -> str:
    return "0x" + keccak(text=market_name(i)).hex()
