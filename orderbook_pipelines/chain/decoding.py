"""The one ABI decoder: raw JSON-RPC logs -> decoded events, or a rejection that says why.

Static ABI types (the common case: uint, address, bytes32) are sliced out of 32-byte words directly, which is
an order of magnitude faster than generic decoding; anything dynamic falls back to eth_abi in strict mode.
A log that does not fit its ABI is never dropped silently: it becomes a `Rejected` with a reason, and the
caller stores it.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple, TypeVar

import orjson
from eth_hash.auto import keccak

from orderbook_pipelines.config import EventMapping, ProjectConfig

_WORD = 32
T = TypeVar("T")
# A log straight to what the caller keeps: (log, block number, block hash, tx hash, tx index, log index, address).
DirectRow = Callable[[dict, int, str, str, int, int, str], T]


# Named tuples, not frozen dataclasses: a backfill makes two per log, and a frozen dataclass's __init__ costs a
# setattr call per field (a third of decoding a log).
class LogPosition(NamedTuple):
    block_number: int
    block_hash: str
    tx_hash: str
    tx_index: int
    log_index: int
    address: str


class DecodedLog(NamedTuple):
    pos: LogPosition
    spec: EventSpec
    args: dict[str, Any]

    @property
    def source(self) -> str:
        return self.spec.source

    @property
    def event(self) -> str:
        return self.spec.name

    @property
    def mapping(self) -> EventMapping:
        return self.spec.mapping


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
    args_json: Callable[[dict[str, Any]], str] = field(init=False)
    fast_args: Callable[[Sequence[str], str], dict[str, Any]] | None = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "data_static", all(p.is_static_word for p in self.data))
        object.__setattr__(self, "indexed_conv", tuple(
            (p.name, _converter(p.type) if p.is_static_word else None) for p in self.indexed))
        object.__setattr__(self, "data_conv", tuple(
            (p.name, _converter(p.type), i * _WORD, (i + 1) * _WORD) for i, p in enumerate(self.data))
            if self.data_static else ())
        object.__setattr__(self, "args_json", _json_writer(self))
        object.__setattr__(self, "fast_args", _compile_args(self) if self.data_static else None)


def canonical_type(inp: dict) -> str:
    t = inp["type"]
    if t.startswith("tuple"):
        inner = ",".join(canonical_type(c) for c in inp["components"])
        return f"({inner}){t[5:]}"
    return t


def event_signature(abi_event: dict) -> str:
    return f"{abi_event['name']}({','.join(canonical_type(i) for i in abi_event['inputs'])})"


def event_topic(abi_event: dict) -> str:
    return "0x" + keccak(event_signature(abi_event).encode()).hex()


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
_UINT = re.compile(r"uint(\d*)")


def decode_lines(spec: EventSpec) -> tuple[dict[str, Any], list[str], list[tuple[_Param, str]]]:
    """The body of `Decoder._decode_args` for one all-static event as straight-line code, generated once from its
    ABI: the same checks and values, without the per-parameter loop, tuple unpacking and converter calls (a third
    of decoding a log of the real mix). The code reads `topics` and `data_hex` and leaves each parameter's value in
    a local variable (returned with its parameter); it raises on anything malformed without saying what: the caller
    then runs the generic decoder, whose error names the fault. Parameter names reach the code only as string
    literals (repr). Also the first half of a row built straight from a log (chain/normalize.py)."""
    ns: dict[str, Any] = {"fromhex": bytes.fromhex, "from_bytes": int.from_bytes, "Z12": _ZERO12}
    code = [f"    if len(topics) != {1 + len(spec.indexed)}: raise ValueError"]
    items: list[tuple[_Param, str]] = []

    def value(param: _Param, word: str) -> None:
        v = f"v{len(items)}"
        if m := _UINT.fullmatch(param.type):
            code.append(f"    {v} = from_bytes({word})")
            if (bits := int(m.group(1) or 256)) < 256:
                code.append(f"    if {v} >= {1 << bits}: raise ValueError")
        elif param.type == "address":
            code.append(f"    if {word}[:12] != Z12: raise ValueError")
            code.append(f"    {v} = '0x' + {word}[12:].hex()")
        else:
            ns[f"c{v}"] = _converter(param.type)
            code.append(f"    {v} = c{v}({word})")
        items.append((param, v))

    for i, param in enumerate(spec.indexed, start=1):
        code += [f"    t = topics[{i}]", "    w = fromhex(t[2:])", "    if len(w) != 32: raise ValueError"]
        if param.is_static_word:
            value(param, "w")
        else:  # stored as the keccak hash of the value
            code.append(f"    v{len(items)} = t.lower()")
            items.append((param, f"v{len(items)}"))
    code += ["    if not data_hex.startswith('0x'): raise ValueError", "    d = fromhex(data_hex[2:])",
             f"    if len(d) != {_WORD * len(spec.data)}: raise ValueError"]
    for i, param in enumerate(spec.data):
        value(param, f"d[{i * _WORD}:{(i + 1) * _WORD}]")
    return ns, code, items


def _compile_args(spec: EventSpec) -> Callable[[Sequence[str], str], dict[str, Any]]:
    """`Decoder._decode_args` of one all-static event, from `decode_lines`."""
    ns, code, items = decode_lines(spec)
    code = ["def decode(topics, data_hex):", *code,
            "    return {" + ", ".join(f"{p.name!r}: {v}" for p, v in items) + "}"]
    exec("\n".join(code), ns)  # code built by decode_lines from ABI types; names only as literals
    return ns["decode"]


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


def args_json(args: dict[str, Any]) -> str:
    """Decoded arguments as stored (`order_events.args`): JSON, keys sorted, integers as decimal strings (a uint256
    does not fit a JSON number that every reader parses exactly)."""
    return orjson.dumps({k: (str(v) if v.__class__ is int else v) for k, v in args.items()},
                        option=orjson.OPT_SORT_KEYS).decode()


_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def json_template(spec: EventSpec) -> tuple[str, tuple[str, ...]] | None:
    """`args_json` of one event as a %-format string and the argument names it takes, in order, when every value is
    a number or a hex string (uints, ints, addresses, bytesN; dynamic indexed values are their topic's hex): the same
    text as `args_json`, without its per-log dict of converted values (a third of normalizing a log). None for the
    other events, which take `args_json`."""
    params = (*spec.indexed, *spec.data)
    if not spec.data_static or any(p.type == "bool" or not _NAME.fullmatch(p.name) for p in params) \
            or len({p.name for p in params}) != len(params):
        return None
    names = tuple(sorted(p.name for p in params))
    return "{" + ",".join(f'"{n}":"%s"' for n in names) + "}", names


def _json_writer(spec: EventSpec) -> Callable[[dict[str, Any]], str]:
    got = json_template(spec)
    if got is None:
        return args_json
    template, names = got
    if not names:
        return lambda args: "{}"
    pick = operator.itemgetter(*names)
    if len(names) == 1:
        return lambda args: template % (pick(args),)
    return lambda args: template % pick(args)


def _jsonable(v: Any) -> Any:
    if isinstance(v, bytes):
        return "0x" + v.hex()
    if isinstance(v, str) and v.startswith("0x") and len(v) == 42:
        return v.lower()
    if isinstance(v, tuple | list):
        return [_jsonable(x) for x in v]
    return v


def _int(v: str | int) -> int:
    """A quantity as nodes send it (hex string), or as an int (tests, some clients); None and junk raise."""
    return v if v.__class__ is int else int(v, 16)  # type: ignore[arg-type]


def log_position(log: dict) -> LogPosition:
    return LogPosition(_int(log["blockNumber"]), log["blockHash"].lower(), log["transactionHash"].lower(),
                       _int(log["transactionIndex"]), _int(log["logIndex"]), log["address"].lower())


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
        except _ENVELOPE_ERRORS as exc:
            return _malformed_envelope(log, exc)
        return self._decode(log, pos)

    def decode_all(self, logs: Iterable[dict]) -> tuple[list[DecodedLog], list[Rejected]]:
        """`decode` of every log of an answer."""
        return self.read_all(logs, {}, _same)

    def read_all(self, logs: Iterable[dict], direct: Mapping[tuple[str, str], DirectRow[T]],
                 build: Callable[[DecodedLog], T]) -> tuple[list[T], list[Rejected]]:
        """Every log of an answer turned into what the caller keeps (`T`), in chain order, and the rejected ones.

        A log whose (source, topic0) has a `direct` function goes straight from its JSON to its `T` (generated code
        that decodes and builds in one step, chain/normalize.py); anything that function refuses, and every other
        log, is decoded here (`decode`: a rejection says why) and handed to `build`. Consecutive logs of one block
        or transaction carry the same position strings: each block's and transaction's are parsed once, not once
        per log (a block holds hundreds)."""
        out: list[T] = []
        rejected: list[Rejected] = []
        sources = self.address_sources
        bn_raw = bh_raw = th_raw = ti_raw = None
        bn = ti = 0
        bh = th = ""
        for log in logs:
            try:
                if log["blockHash"] != bh_raw or log["blockNumber"] != bn_raw:
                    bn_raw = bh_raw = None  # until both parsed
                    bn, bh = _int(log["blockNumber"]), log["blockHash"].lower()
                    bn_raw, bh_raw = log["blockNumber"], log["blockHash"]
                if log["transactionHash"] != th_raw or log["transactionIndex"] != ti_raw:
                    th_raw = ti_raw = None
                    th, ti = log["transactionHash"].lower(), _int(log["transactionIndex"])
                    th_raw, ti_raw = log["transactionHash"], log["transactionIndex"]
                li = log["logIndex"]
                li = int(li, 16) if li.__class__ is str else _int(li)
                address = log["address"].lower()
            except _ENVELOPE_ERRORS:
                got = self.decode(log)  # which says what is wrong with it
            else:
                if direct:
                    try:
                        fn = direct.get((sources.get(address), log["topics"][0].lower()))  # type: ignore[arg-type]
                        if fn is not None:
                            out.append(fn(log, bn, bh, th, ti, li, address))
                            continue
                    except Exception:  # malformed: the generic decoder below says how
                        pass
                # tuple.__new__: a namedtuple's own __new__ is a Python frame, twice per log
                got = self._decode(log, _new(LogPosition, (bn, bh, th, ti, li, address)))
            if got.__class__ is DecodedLog:
                out.append(build(got))
            else:
                rejected.append(got)  # type: ignore[arg-type]
        return out, rejected

    def _decode(self, log: dict, pos: LogPosition) -> DecodedLog | Rejected:
        try:
            topics = log.get("topics") or ()
            topic0 = topics[0].lower() if topics else None
        except _ENVELOPE_ERRORS as exc:
            return _malformed_envelope(log, exc)
        data_hex = log.get("data") or "0x"
        source = self.address_sources.get(pos.address)
        if source is None:
            return _rejected(pos, topics, data_hex, f"log from unregistered contract {pos.address}")
        if topic0 is None:
            return _rejected(pos, topics, data_hex, "anonymous log (no topic0) is not in any configured ABI")
        spec = self.specs.get((source, topic0))
        if spec is None:
            return _rejected(pos, topics, data_hex, f"unknown event topic0 {topic0} for source {source}")
        if spec.fast_args is not None:
            try:
                return _new(DecodedLog, (pos, spec, spec.fast_args(topics, data_hex)))
            except Exception:  # malformed: the generic decoder below says how
                pass
        try:
            args = self._decode_args(spec, topics, data_hex)
        except (ValueError, OverflowError, TypeError, AttributeError) as exc:
            return _rejected(pos, topics, data_hex, f"malformed {spec.signature}: {exc}")
        return DecodedLog(pos, spec, args)

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
            values = _abi_decode([p.type for p in spec.data], data)
            for param, value in zip(spec.data, values, strict=True):
                args[param.name] = _jsonable(value)
        return args


_ENVELOPE_ERRORS = (KeyError, TypeError, ValueError, AttributeError)
_new = tuple.__new__


def _same(decoded: DecodedLog) -> DecodedLog:
    return decoded


def _abi_decode(types: list[str], data: bytes) -> tuple[Any, ...]:
    """eth_abi's strict decoding of dynamic data, its errors as ValueError. Imported here, on the first dynamic
    event: none of the exchange's events has one, and with eth_utils it was a tenth of a command's start-up."""
    from eth_abi import decode
    from eth_abi.exceptions import DecodingError

    try:
        return decode(types, data, strict=True)
    except DecodingError as exc:
        raise ValueError(str(exc)) from exc


def _malformed_envelope(log: dict, exc: Exception) -> Rejected:
    return Rejected(_unknown_pos(log), tuple(log.get("topics") or ()), str(log.get("data", "")),
                    f"malformed log envelope: {exc!r}")


def _rejected(pos: LogPosition, topics: Any, data: Any, reason: str) -> Rejected:
    """Topics and data kept as given (lowercased hex), so the stored rejection shows what the node sent."""
    return Rejected(pos, tuple(str(t).lower() for t in topics), str(data), reason)


def _unknown_pos(log: dict) -> LogPosition:
    def number(key: str) -> int:
        try:
            return _int(log.get(key))  # type: ignore[arg-type]
        except (TypeError, ValueError):
            return -1

    return LogPosition(number("blockNumber"), str(log.get("blockHash", "")), str(log.get("transactionHash", "")),
                       number("transactionIndex"), number("logIndex"), str(log.get("address", "")).lower())
