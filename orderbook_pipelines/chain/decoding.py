"""The one ABI decoder: raw JSON-RPC logs -> decoded events, or a rejection that says why.

Static ABI types (the common case: uint, address, bytes32) are sliced out of 32-byte words directly, which is
an order of magnitude faster than generic decoding; anything dynamic falls back to eth_abi in strict mode.
A log that does not fit its ABI is never dropped silently: it becomes a `Rejected` with a reason, and the
caller stores it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from eth_abi import decode as abi_decode
from eth_abi.exceptions import DecodingError
from eth_utils import keccak

from orderbook_pipelines.config import EventMapping, ProjectConfig

_WORD = 32


@dataclass(frozen=True, slots=True)
class LogPosition:
    block_number: int
    block_hash: str
    tx_hash: str
    tx_index: int
    log_index: int
    address: str


@dataclass(frozen=True, slots=True)
class DecodedLog:
    pos: LogPosition
    source: str
    event: str
    args: dict[str, Any]
    mapping: EventMapping


@dataclass(frozen=True, slots=True)
class Rejected:
    pos: LogPosition
    topics: tuple[str, ...]
    data: str
    reason: str


@dataclass(frozen=True, slots=True)
class _Param:
    name: str
    type: str

    @property
    def is_static_word(self) -> bool:
        t = self.type
        return (
            (t.startswith(("uint", "int"))
            and "[" not in t)
            or t in ("address", "bool")
            or (t.startswith("bytes") and t != "bytes" and "[" not in t)
        )


@dataclass(frozen=True)
class EventSpec:
    source: str
    name: str
    signature: str
    topic0: str
    indexed: tuple[_Param, ...]
    data: tuple[_Param, ...]
    mapping: EventMapping
    data_static: bool = field(init=False)
    indexed_conv: tuple[tuple[str, Callable[[bytes], Any] | None], ...] = field(init=False)
    data_conv: tuple[tuple[str, Callable[[bytes], Any], int, int], ...] = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_static", all(p.is_static_word for p in self.data))
        object.__setattr__(self, "indexed_conv", tuple(
            (p.name, _converter(p.type) if p.is_static_word else None) for p in self.indexed))
        object.__setattr__(self, "data_conv", tuple(
            (p.name, _converter(p.type), i * _WORD, (i + 1) * _WORD) for i, p in enumerate(self.data))
            if self.data_static else ())


def canonical_type(inp: dict) -> str:
    t = inp["type"]
    if t.startswith("tuple"):
        inner = ",".join(canonical_type(c) for c in inp["components"])
        return f"({inner}){t[5:]}"
    return t


def event_signature(abi_event: dict) -> str:
    return f"{abi_event['name']}({','.join(canonical_type(i) for i in abi_event['inputs'])})"


def event_topic(abi_event: dict) -> str:
    return "0x" + keccak(text=event_signature(abi_event)).hex()


def _converter(typ: str) -> Callable[[bytes], Any]:
    """The strict 32-byte-word decoder of one static type, resolved once per ABI parameter, not per log."""
    if typ.startswith("uint"):
        bits = int(typ[4:] or 256)
        if bits == 256:
            return int.from_bytes  # big-endian by default; 32 bytes always fit (no Python frame per word)
        limit = 1 << bits

        def uint(word: bytes) -> int:
            v = int.from_bytes(word, "big")
            if v >= limit:
                raise ValueError(f"{typ} out of range: {v}")
            return v

        return uint
    if typ == "address":

        def address(word: bytes) -> str:
            if word[:12] != _ZERO12:
                raise ValueError("address word has non-zero padding")
            return "0x" + word[12:].hex()

        return address
    return lambda word: _word_value(typ, word)


_ZERO12 = bytes(12)


def _word_value(typ: str, word: bytes) -> Any:
    """Decode one 32-byte word of the types `_converter` leaves to it (bool, intN, bytesN) strictly: padding
    that does not fit the type is an error."""
    if typ == "bool":
        v = int.from_bytes(word, "big")
        if v > 1:
            raise ValueError(f"bool out of range: {v}")
        return bool(v)
    if typ.startswith("int"):
        bits = int(typ[3:] or 256)
        v = int.from_bytes(word, "big", signed=True)
        if not -(1 << (bits - 1)) <= v < (1 << (bits - 1)):
            raise ValueError(f"{typ} out of range: {v}")
        return v
    if typ.startswith("bytes"):
        n = int(typ[5:])
        if any(word[n:]):
            raise ValueError(f"{typ} has non-zero padding")
        return "0x" + word[:n].hex()
    raise ValueError(f"not a static word type: {typ}")


def _jsonable(v: Any) -> Any:
    if isinstance(v, bytes):
        return "0x" + v.hex()
    if isinstance(v, str) and v.startswith("0x") and len(v) == 42:
        return v.lower()
    if isinstance(v, tuple | list):
        return [_jsonable(x) for x in v]
    return v


def _hex_int(v: str | int) -> int:
    return v if isinstance(v, int) else int(v, 16)


def log_position(log: dict) -> LogPosition:
    bn, ti, li = log["blockNumber"], log["transactionIndex"], log["logIndex"]
    return LogPosition(
        bn if bn.__class__ is int else int(bn, 16),
        log["blockHash"].lower(),
        log["transactionHash"].lower(),
        ti if ti.__class__ is int else int(ti, 16),
        li if li.__class__ is int else int(li, 16),
        log["address"].lower(),
    )


class Decoder:
    """Decodes logs of the configured sources; `address_sources` maps contract address -> source name.

    Every mapping was checked against its ABI when the configuration loaded (config.py): no check here.
    """

    def __init__(self, config: ProjectConfig, address_sources: dict[str, str]):
        self.address_sources = {a.lower(): s for a, s in address_sources.items()}
        self.specs: dict[tuple[str, str], EventSpec] = {}
        for src in config.sources:
            for ev_name, mapping in src.events.items():
                abi_ev = src.abi_events[ev_name]
                spec = EventSpec(
                    source=src.name,
                    name=ev_name,
                    signature=event_signature(abi_ev),
                    topic0=event_topic(abi_ev),
                    indexed=tuple(_Param(i["name"], canonical_type(i)) for i in abi_ev["inputs"] if i["indexed"]),
                    data=tuple(_Param(i["name"], canonical_type(i)) for i in abi_ev["inputs"] if not i["indexed"]),
                    mapping=mapping,
                )
                self.specs[(src.name, spec.topic0)] = spec

    def decode(self, log: dict) -> DecodedLog | Rejected:
        try:
            pos = log_position(log)
            topics = log.get("topics") or ()
            topic0 = topics[0].lower() if topics else None
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            return Rejected(_unknown_pos(log), tuple(log.get("topics") or ()), str(log.get("data", "")),
                            f"malformed log envelope: {exc!r}")
        data_hex = log.get("data") or "0x"
        source = self.address_sources.get(pos.address)
        if source is None:
            return _rejected(pos, topics, data_hex, f"log from unregistered contract {pos.address}")
        if topic0 is None:
            return _rejected(pos, topics, data_hex, "anonymous log (no topic0) is not in any configured ABI")
        spec = self.specs.get((source, topic0))
        if spec is None:
            return _rejected(pos, topics, data_hex, f"unknown event topic0 {topic0} for source {source}")
        try:
            args = self._decode_args(spec, topics, data_hex)
        except (ValueError, DecodingError, OverflowError, TypeError, AttributeError) as exc:
            return _rejected(pos, topics, data_hex, f"malformed {spec.signature}: {exc}")
        return DecodedLog(pos, spec.source, spec.name, args, spec.mapping)

    @staticmethod
    def _decode_args(spec: EventSpec, topics: list[str] | tuple[str, ...], data_hex: str) -> dict[str, Any]:
        if len(topics) != 1 + len(spec.indexed):
            raise ValueError(f"expected {1 + len(spec.indexed)} topics, got {len(topics)}")
        args: dict[str, Any] = {}
        for (name, conv), topic in zip(spec.indexed_conv, topics[1:], strict=True):
            word = bytes.fromhex(topic[2:])
            if len(word) != _WORD:
                raise ValueError(f"topic for {name} is not 32 bytes")
            # Indexed dynamic values (string, bytes, arrays) are stored as their keccak hash.
            args[name] = conv(word) if conv is not None else topic.lower()
        if not data_hex.startswith("0x"):
            raise ValueError("data is not 0x-prefixed hex")
        data = bytes.fromhex(data_hex[2:])
        if spec.data_static:
            if len(data) != _WORD * len(spec.data_conv):
                raise ValueError(f"data is {len(data)} bytes, expected {_WORD * len(spec.data_conv)}")
            for name, conv, lo, hi in spec.data_conv:
                args[name] = conv(data[lo:hi])
        else:
            values = abi_decode([p.type for p in spec.data], data, strict=True)
            for param, value in zip(spec.data, values, strict=True):
                args[param.name] = _jsonable(value)
        return args


def _rejected(pos: LogPosition, topics: Any, data: Any, reason: str) -> Rejected:
    """Topics and data kept as given (lowercased hex), so the stored rejection shows what the node sent."""
    return Rejected(pos, tuple(str(t).lower() for t in topics), str(data), reason)


def _unknown_pos(log: dict) -> LogPosition:
    def _int(key: str) -> int:
        try:
            return _hex_int(log.get(key))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return -1

    return LogPosition(_int("blockNumber"), str(log.get("blockHash", "")), str(log.get("transactionHash", "")),
                       _int("transactionIndex"), _int("logIndex"), str(log.get("address", "")).lower())
