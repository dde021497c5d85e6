"""Project configuration: one YAML file (contracts, ABIs, event mapping, markets) plus environment overrides.

Contracts are not ours and have shipped in several generations, so every address, ABI and the mapping from a
contract's event to our canonical event kinds comes from here, never from code. Validation happens once, at
start, and produces one readable message listing every problem.
"""

from __future__ import annotations

import copy
import json
import logging
from enum import StrEnum
from functools import cached_property
from pathlib import Path
from typing import Annotated, Any, Literal

import yaml
from eth_hash.auto import keccak
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

PROJECT_ROOT = Path(__file__).resolve().parent.parent


class ConfigError(ValueError):
    """Raised with a human-readable list of every configuration problem."""


class _Problems(ValueError):
    """Every cross-check problem at once: pydantic keeps one error per validator, the message lists each."""

    def __init__(self, problems: list[str]):
        super().__init__("; ".join(problems))
        self.problems = problems


class EventKind(StrEnum):
    """Canonical event kinds every contract generation is mapped onto."""

    OPEN = "open"
    FILL = "fill"
    CANCEL = "cancel"
    TRADE = "trade"
    BOOK_ADD = "book_add"
    BOOK_REMOVE = "book_remove"


CANONICAL_FIELDS = (
    "order_id",
    "trader",
    "counterparty",
    "side",
    "order_type",
    "price",
    "quantity",
    "buy_order_id",
    "sell_order_id",
    "buyer",
    "seller",
)

_FIELDS_REQUIRED: dict[EventKind, tuple[str, ...]] = {
    EventKind.OPEN: ("order_id", "trader", "side", "price", "quantity"),
    EventKind.FILL: ("order_id", "quantity", "price"),
    EventKind.CANCEL: ("order_id",),
    EventKind.TRADE: ("buyer", "seller", "price", "quantity"),
    EventKind.BOOK_ADD: ("order_id", "price", "side", "quantity"),
    EventKind.BOOK_REMOVE: ("order_id",),
}


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class EventMapping(Strict):
    """How one ABI event maps onto a canonical kind.

    `fields` maps canonical field -> ABI argument name. `market` says how the market is found:
    `emitter` (the log's address is the market's contract), `metric_hash:<arg>` (an indexed string holding
    keccak(metricId)) or `tx` (taken from another log of the same transaction).
    """

    kind: EventKind
    fields: dict[str, str]
    market: str = "emitter"

    @field_validator("fields")
    @classmethod
    def _known_fields(cls, v: dict[str, str]) -> dict[str, str]:
        unknown = sorted(set(v) - set(CANONICAL_FIELDS))
        if unknown:
            raise ValueError(f"unknown canonical field(s) {unknown}; allowed: {list(CANONICAL_FIELDS)}")
        return v

    @field_validator("market")
    @classmethod
    def _market_rule(cls, v: str) -> str:
        if v in ("emitter", "tx") or (v.startswith("metric_hash:") and len(v) > len("metric_hash:")):
            return v
        raise ValueError("market must be 'emitter', 'tx' or 'metric_hash:<indexed string argument>'")

    @model_validator(mode="after")
    def _required_fields(self) -> EventMapping:
        missing = [f for f in _FIELDS_REQUIRED[self.kind] if f not in self.fields]
        if missing:
            raise ValueError(f"kind {self.kind.value!r} needs field(s) {missing}")
        return self


Address = Annotated[str, Field(pattern=r"^0x[0-9a-fA-F]{40}$")]


class Source(Strict):
    """One contract shape: an ABI, the contracts that speak it, and its event mapping.

    `addresses: markets` means "every registered market of this source" (one contract per market).
    """

    name: str = Field(pattern=r"^[a-z][a-z0-9_]{1,40}$")
    abi: Path
    addresses: list[Address] | Literal["markets"]
    events: dict[str, EventMapping]

    @cached_property
    def abi_entries(self) -> list[dict]:
        return load_abi(self.abi)

    @cached_property
    def abi_events(self) -> dict[str, dict]:
        """The ABI's events by name (the decoder and the mapping checks read the same one)."""
        return {e["name"]: e for e in self.abi_entries if e.get("type") == "event"}


def _mapping_problems(src: Source) -> list[str]:
    """Each event mapping checked against its ABI event, so a typo fails at load time, not deep in ingestion."""
    problems: list[str] = []
    try:
        events = src.abi_events
    except ValueError as exc:  # unreadable ABI file: reported with the other problems
        return [f"source {src.name}: {exc}"]
    for ev, mapping in src.events.items():
        abi_ev = events.get(ev)
        if abi_ev is None:
            problems.append(f"source {src.name}: event {ev!r} is not in ABI {src.abi} ({sorted(events)})")
            continue
        args = [i["name"] for i in abi_ev["inputs"]]
        for canon, arg in mapping.fields.items():
            if arg not in args:
                problems.append(f"source {src.name}: event {ev}: field {canon} maps to unknown argument {arg!r}; "
                                f"{ev} has {', '.join(args) or 'no arguments'}")
        if mapping.market.startswith("metric_hash:"):
            arg = mapping.market.split(":", 1)[1]
            indexed = [i["name"] for i in abi_ev["inputs"] if i.get("indexed")]
            if arg not in indexed:
                problems.append(f"source {src.name}: event {ev}: market rule {mapping.market!r} names {arg!r}, "
                                f"not an indexed argument; indexed: {', '.join(indexed) or 'none'}")
    return problems


class Market(Strict):
    metric_id: str = Field(pattern=r"^[A-Z0-9_]{3,100}$")
    source: str
    address: Address | None = None
    decimals: int = Field(default=18, ge=0, le=36)
    status: Literal["canary", "active", "paused"] = "active"

    @property
    def metric_hash(self) -> str:
        return "0x" + keccak(self.metric_id.encode()).hex()


_REMOVED_CHAIN_KEYS = {
    "tip_interval_blocks": "ranges now run once, when all their blocks are final; size range_size to bound lag",
}


class Chain(Strict):
    @model_validator(mode="before")
    @classmethod
    def _removed_keys(cls, data: Any) -> Any:
        """Keys of earlier versions are dropped with a warning that says why, not refused: a config that worked
        keeps working after an upgrade."""
        if isinstance(data, dict) and _REMOVED_CHAIN_KEYS.keys() & data.keys():
            data = dict(data)
            for key in sorted(_REMOVED_CHAIN_KEYS.keys() & data.keys()):
                data.pop(key)
                logging.getLogger(__name__).warning("chain.%s is no longer used (%s): remove it from the config",
                                                    key, _REMOVED_CHAIN_KEYS[key])
        return data

    rpc_url: str = "http://127.0.0.1:8545"
    chain_id: int = Field(default=31337, gt=0)
    start_block: int = Field(default=0, ge=0)
    finality: Literal["depth", "finalized"] = "depth"
    confirmations: int = Field(default=12, ge=0, le=10_000)
    range_size: int = Field(default=1000, ge=1, le=1_000_000)
    max_logs_range: int = Field(default=2000, ge=1)
    rpc_timeout_s: float = Field(default=10.0, gt=0, description=(
        "Seconds one JSON-RPC request may take (connect, then each read); a getLogs timeout halves the window."))
    rpc_retries: int = Field(default=5, ge=0, le=50, description=(
        "Retries of a failed call (connection trouble, 429, 5xx), with exponential backoff."))
    rpc_deadline_s: float = Field(default=10.0, gt=0, description=(
        "Seconds one call may spend retrying (on top of the rpc_retries cap): no retry starts after it, so an "
        "unreachable node fails within about this long, a silent one within this plus rpc_timeout_s at worst."))


class Reconciliation(Strict):
    """Reconciliation and book checks: how far back to re-check, how much one repair may rewrite, sample sizes."""

    lookback_ranges: int = Field(default=20, ge=1)
    max_repair_events: int = Field(default=50_000, ge=0)
    check_markets_per_run: int = Field(default=50, ge=1)
    check_levels: int = Field(default=20, ge=1, le=500)
    check_orders_per_run: int = Field(default=200, ge=0)


class Pusher(Strict):
    """The live service's Pusher Channels endpoint (docs/pusher-compat.md): what today's frontend needs to connect
    with only its host settings changed. The app secret is a secret, so it comes from the environment only."""

    app_key: str = Field(default="obp-dev", pattern=r"^[A-Za-z0-9_.\-]{1,64}$", description=(
        "Key in the endpoint path /app/{key}; OBP_PUSHER_KEY overrides it."))
    private_user_channels: bool = Field(default=False, description=(
        "Refuse public user-{trader} channels: a trader's orders only on private-user-{trader}, which needs a "
        "signature made with OBP_PUSHER_SECRET."))
    activity_timeout_s: int = Field(default=30, ge=1, le=600, description=(
        "Announced in pusher:connection_established: a client pings after this long without a message."))
    price_levels: int = Field(default=50, ge=1, le=100, description="Levels per side in a price-update.")


class ProjectConfig(Strict):
    chain: Chain = Chain()
    pusher: Pusher = Pusher()
    sources: list[Source]
    markets: list[Market] = []
    order_events_partition_blocks: int = Field(default=1_000_000, ge=1000)
    canary_ranges_required: int = Field(default=3, ge=1)
    reconciliation: Reconciliation = Reconciliation()

    @model_validator(mode="after")
    def _cross_checks(self) -> ProjectConfig:
        problems: list[str] = []
        names = [s.name for s in self.sources]
        if len(set(names)) != len(names):
            problems.append(f"source names must be unique, got {names}")
        for m in self.markets:
            if m.source not in names:
                problems.append(f"market {m.metric_id} names unknown source {m.source!r}; known: {names}")
        for s in self.sources:
            problems.extend(_mapping_problems(s))
            if s.addresses == "markets":
                for m in self.markets:
                    if m.source == s.name and m.address is None:
                        problems.append(f"market {m.metric_id} of source {s.name} needs an address")
        ids = [m.metric_id for m in self.markets]
        if len(set(ids)) != len(ids):
            problems.append("market metric_ids must be unique")
        if problems:
            raise _Problems(problems)
        return self

    def source(self, name: str) -> Source:
        for s in self.sources:
            if s.name == name:
                return s
        raise KeyError(name)


def load_abi(path: Path) -> list[dict]:
    """Accept a bare ABI list or a build artifact with an `abi` key."""
    try:
        doc = json.loads(Path(path).read_text())
    except FileNotFoundError as exc:
        raise ValueError(f"ABI file not found: {path}") from exc
    except json.JSONDecodeError as exc:
        raise ValueError(f"ABI file {path} is not JSON: {exc}") from exc
    abi = doc["abi"] if isinstance(doc, dict) and "abi" in doc else doc
    if not isinstance(abi, list):
        raise ValueError(f"ABI file {path} holds neither an ABI list nor an artifact with 'abi'")
    return abi


class EnvSettings(BaseSettings):
    """Process-level settings; secrets live only here (environment or a secrets file)."""

    model_config = SettingsConfigDict(env_prefix="OBP_", extra="ignore")

    def __init__(self, **values: Any) -> None:
        from orderbook_pipelines.obs import load_secret_files

        load_secret_files()  # DATABASE_URL_FILE, OBP_RPC_URL_FILE, ... (Docker/Kubernetes secrets): env wins
        super().__init__(**values)

    config: Path = PROJECT_ROOT / ".run" / "devchain.yaml"  # what `make run` writes
    database_url: str = Field(
        default="postgresql+psycopg://postgres@127.0.0.1:5432/orderbook",
        validation_alias="DATABASE_URL",
    )
    rpc_url: str | None = None
    pusher_key: str | None = None  # OBP_PUSHER_KEY: overrides pusher.app_key
    pusher_secret: str | None = None  # OBP_PUSHER_SECRET: signs private channels; unset = no private channels
    pusher_auth_token: str | None = None  # OBP_PUSHER_AUTH_TOKEN: bearer token of POST /pusher/auth; unset = off


def _resolve_paths(raw: dict, base: Path) -> dict:
    for src in raw.get("sources", []) or []:
        if isinstance(src, dict) and "abi" in src and not Path(src["abi"]).is_absolute():
            candidate = base / src["abi"]
            src["abi"] = str(candidate if candidate.exists() else PROJECT_ROOT / src["abi"])
    return raw


def format_validation_error(exc: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration in {origin}:"]
    for err in exc.errors():
        error = err.get("ctx", {}).get("error")
        if isinstance(error, _Problems):  # cross-checks name their own place (source, event, field)
            lines.extend(f"  - {p}" for p in error.problems)
            continue
        loc = ".".join(str(p) for p in err["loc"]) or "(top level)"
        lines.append(f"  - {loc}: {err['msg']}")
    return "\n".join(lines)


def parse_config(raw: dict, origin: str = "<dict>", base: Path | None = None) -> ProjectConfig:
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid configuration in {origin}: expected a mapping at the top level")
    raw = _resolve_paths(copy.deepcopy(raw), base or PROJECT_ROOT)
    try:
        cfg = ProjectConfig.model_validate(raw)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, origin)) from None
    except ValueError as exc:  # ABI loading errors raised outside field validation
        raise ConfigError(f"invalid configuration in {origin}: {exc}") from None
    return cfg


def _load_yaml(text: str) -> Any:
    """yaml.safe_load, with libyaml's parser where PyYAML has it: ~8x faster, 40 ms of `orderbook ingest` start-up
    at 50 markets. Same resolver and constructor, so the same values; a document it refuses is parsed again by the
    pure-Python parser, so the error message is the same as ever."""
    loader = getattr(yaml, "CSafeLoader", None)
    if loader is not None:
        try:
            return yaml.load(text, Loader=loader)  # the safe loader, in C
        except yaml.YAMLError:
            pass
    return yaml.safe_load(text)


def load_config(path: Path | str | None = None, env: EnvSettings | None = None) -> ProjectConfig:
    """Load the YAML file named by OBP_CONFIG (or `path`) and apply environment overrides."""
    env = env or EnvSettings()
    path = Path(path or env.config)
    if not path.exists():
        raise ConfigError(f"configuration file not found: {path} (set OBP_CONFIG or run `orderbook devchain deploy`)")
    try:
        raw = _load_yaml(path.read_text()) or {}
    except yaml.YAMLError as exc:
        raise ConfigError(f"configuration file {path} is not valid YAML: {exc}") from None
    if isinstance(raw, dict) and env.rpc_url:
        chain = raw.get("chain", {})
        if isinstance(chain, dict):  # anything else is reported by validation below
            raw["chain"] = {**chain, "rpc_url": env.rpc_url}
    if isinstance(raw, dict) and env.pusher_key:
        pusher = raw.get("pusher", {})
        if isinstance(pusher, dict):
            raw["pusher"] = {**pusher, "app_key": env.pusher_key}
    return parse_config(raw, str(path), path.parent)
