"""The one RPC client: raw JSON-RPC over a requests session, retries with backoff, adaptive getLogs.

Raw dicts (hex strings) are kept instead of web3's AttributeDicts: decoding is ours and the conversion cost
matters at a million logs. Providers refuse large log queries in different words; every such answer
shrinks the window (halving), and success grows it back, so a backfill neither stalls nor hammers.
A call retries within a deadline as well as an attempt cap, logging each retry: a dead node is reported in
seconds, by its (redacted) URL, with the one useful phrase of the transport error.

A client built from the configuration also knows the chain id it must serve: it checks `eth_chainId` before its
first answer is used and again after every new TCP connection (urllib3 reconnects a dropped keep-alive
connection in place, silently: a restarted or failed-over node behind the same URL is only seen this way) and
after every transient error. A node of another chain raises WrongChain before any of its answers is returned,
so no caller can write or serve that chain's data under the configured id.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import orjson
import requests
from requests.adapters import HTTPAdapter
from tenacity import (
    RetryCallState,
    RetryError,
    Retrying,
    retry_if_exception_type,
    stop_after_attempt,
    stop_before_delay,
    wait_exponential_jitter,
)

from orderbook_pipelines import obs
from orderbook_pipelines.chain import metrics
from orderbook_pipelines.config import Chain

log = logging.getLogger(__name__)

# Phrases providers use when a log query is too large or too slow (Alchemy, Infura, QuickNode, geth, erigon…).
_TOO_LARGE = (
    "too many results",
    "query returned more than",
    "more than 10000 results",
    "log response size exceeded",
    "response size",
    "block range",
    "range is too large",
    "timeout",
    "timed out",
)
_ADDRESS_CHUNK = 500
_ERRNO = re.compile(r"\[Errno -?\d+\] ([^'\")]+)")


class RpcError(RuntimeError):
    """An RPC call failed for good (after retries), with the method and the provider's words.

    `node` is the redacted URL of the node, set by ChainClient.call (an attribute, so it survives pickling
    from a worker process).
    """

    node: str | None = None


class TransientRpcError(RpcError):
    """Worth retrying: connection trouble, 429/5xx, rate limits."""


class RangeTooLarge(RpcError):
    """The provider refused a getLogs window as too large; the caller splits it."""


class WrongChain(RpcError):
    """The node serves another chain than the configured one: nothing it answers may be used.

    Not retried (the node answered, and will answer the same); the CLI exits with its own code, the live
    service reports it as the reason it is not ready.
    """

    def __init__(self, expected: int, actual: int, node: str):
        self.expected, self.actual = expected, actual
        self.node = node
        super().__init__(f"wrong chain: the node at {node} serves chain id {actual}, but the configuration says "
                         f"chain.chain_id {expected}; refusing to use it (nothing was read or written)")

    def __reduce__(self) -> tuple[type[WrongChain], tuple[int, int, str]]:  # survives a worker process boundary
        return WrongChain, (self.expected, self.actual, self.node or "")


@dataclass(frozen=True)
class BlockHeader:
    number: int
    hash: str
    parent_hash: str
    timestamp: int


def redacted_url(url: str) -> str:
    """The node's URL as it may be printed: its password and API-key-like path or query parts redacted."""
    obs.register_env_secrets({"OBP_RPC_URL": url})  # a key in the YAML's URL is as secret as one in the env
    return obs.redact_text(url)


def _transport_reason(exc: requests.RequestException, timeout_s: float) -> str:
    """The one useful phrase of a transport failure (requests nests four exceptions into one message)."""
    if isinstance(exc, requests.ConnectTimeout):
        return f"no connection within {timeout_s:g}s"
    if isinstance(exc, requests.Timeout):
        return f"no answer within {timeout_s:g}s"
    m = _ERRNO.search(str(exc))
    if m:  # "Connection refused", "Name or service not known", ...
        return m.group(1).strip().lower()
    return f"{type(exc).__name__}: {str(exc)[:200]}"


def _is_too_large(message: str) -> bool:
    m = message.lower()
    return any(p in m for p in _TOO_LARGE) and not _is_rate_limit(message)


def _is_rate_limit(message: str) -> bool:
    m = message.lower()
    return "rate limit" in m or "too many requests" in m


def _observed(fn: Callable[[str, list[Any]], Any], method: str, params: list[Any]) -> Any:
    """One JSON-RPC attempt with its count, latency, error class and, for getLogs, the window size."""
    metrics.RPC_REQUESTS.labels(method).inc()
    t0 = time.perf_counter()
    try:
        result = fn(method, params)
    except Exception as exc:
        metrics.RPC_ERRORS.labels(method, type(exc).__name__).inc()
        if isinstance(exc, RangeTooLarge):
            metrics.GETLOGS_REFUSED.inc()
        raise
    finally:
        metrics.RPC_SECONDS.labels(method).observe(time.perf_counter() - t0)
    if method == "eth_getLogs" and params and isinstance(params[0], dict) and "fromBlock" in params[0]:
        blocks = int(params[0]["toBlock"], 16) - int(params[0]["fromBlock"], 16) + 1
        metrics.GETLOGS_RANGE.observe(blocks)
        metrics.GETLOGS_WINDOW.set(blocks)
    return result


class _CountingAdapter(HTTPAdapter):
    """The HTTP transport, counting the TCP connections it opens (a dropped keep-alive connection is reopened in
    place, invisible to the caller): each new one may lead to another node, so its chain id is checked again."""

    def __init__(self) -> None:
        self.connects = 0
        super().__init__()

    def init_poolmanager(self, *args: Any, **kwargs: Any) -> None:
        super().init_poolmanager(*args, **kwargs)
        adapter = self

        def counted(pool_cls: Any) -> Any:
            class Connection(pool_cls.ConnectionCls):
                def connect(self) -> None:
                    super().connect()
                    adapter.connects += 1

            return type(pool_cls.__name__, (pool_cls,), {"ConnectionCls": Connection})

        pm = self.poolmanager
        pm.pool_classes_by_scheme = {k: counted(v) for k, v in pm.pool_classes_by_scheme.items()}


class _JsonRpc:
    """JSON-RPC over the client's session. (web3's HTTPProvider did this; importing web3 also imports eth_account
    and py_ecc, about 2 s of CPU at every process start, and its stdlib JSON decoding is slower than orjson's.)"""

    def __init__(self, url: str, session: requests.Session, timeout_s: float) -> None:
        self.url, self.session, self.timeout_s = url, session, timeout_s
        self._next_id = 0

    def _body(self, method: str, params: Any) -> dict[str, Any]:
        self._next_id += 1
        return {"jsonrpc": "2.0", "method": method, "params": params, "id": self._next_id}

    def _post(self, body: Any) -> Any:
        resp = self.session.post(self.url, data=orjson.dumps(body), timeout=self.timeout_s,
                                 headers={"Content-Type": "application/json"}, stream=True)
        resp.raise_for_status()  # the error body is still unread: the caller quotes it (exc.response.text)
        # The body in one read: `.content` reads it in 10 kB chunks, twice the CPU for a 70 MB window of logs, in
        # the fetch thread that shares the GIL with decoding. iter_content maps transport errors as `.content`
        # does, and the connection goes back to the pool once the body is read.
        return orjson.loads(b"".join(resp.iter_content(chunk_size=None)))

    def make_request(self, method: str, params: Any) -> Any:
        return self._post(self._body(method, params))

    def make_batch_request(self, calls: list[tuple[str, Any]]) -> Any:
        """Answers in call order (servers may answer a batch in any order); a single error object as it came."""
        out = self._post([self._body(m, p) for m, p in calls])
        return sorted(out, key=lambda r: r.get("id") or 0) if isinstance(out, list) else out


class ChainClient:
    def __init__(self, rpc_url: str, timeout_s: float = 10.0, retries: int = 5, max_logs_range: int = 2000,
                 backoff_max_s: float = 8.0, deadline_s: float = 10.0, expected_chain_id: int | None = None):
        """`expected_chain_id`: the chain the node must serve (from_config sets it); None checks nothing."""
        self.rpc_url = rpc_url
        self.node = redacted_url(rpc_url)
        self.timeout_s = timeout_s
        self.retries = retries
        self.backoff_max_s = backoff_max_s
        self.deadline_s = deadline_s
        self.max_logs_range = max_logs_range
        self.logs_window = max_logs_range
        self.stats = {"rpc_calls": 0, "rpc_errors": 0, "range_splits": 0}
        self.expected_chain_id = expected_chain_id
        self._transport = _CountingAdapter()
        session = requests.Session()
        session.mount("http://", self._transport)
        session.mount("https://", self._transport)
        self._checked_at = -1  # connection count when the chain id was last confirmed; -1: check before next use
        # Raw dicts, no middleware: decoding is ours, and a million logs pay no conversion.
        self.provider = _JsonRpc(rpc_url, session, timeout_s)

    @classmethod
    def from_config(cls, chain: Chain, retries: int | None = None) -> ChainClient:
        """The client every process builds from the `chain` section (`retries` overrides it: probes use 0-1)."""
        return cls(chain.rpc_url, chain.rpc_timeout_s, chain.rpc_retries if retries is None else retries,
                   chain.max_logs_range, deadline_s=chain.rpc_deadline_s, expected_chain_id=chain.chain_id)

    # -- which chain ---------------------------------------------------------------------------------------
    def _unconfirmed(self) -> bool:
        return self.expected_chain_id is not None and self._checked_at != self._transport.connects

    def _confirm(self, raw: Any) -> None:
        """Compare an eth_chainId answer with the configuration; remember the connections it covers."""
        assert self.expected_chain_id is not None
        actual = int(raw, 16)
        if actual != self.expected_chain_id:
            self._checked_at = -1
            raise WrongChain(self.expected_chain_id, actual, self.node)
        self._checked_at = self._transport.connects

    def _attempt(self, method: str, params: list[Any]) -> Any:
        """One attempt, its answer used only if the chain id was confirmed on the connections it may have used."""
        if self.expected_chain_id is None:
            return _observed(self._once, method, params)

        def check(m: str, p: list[Any]) -> Any:
            return self._once(m, p, name=method)

        if method != "eth_chainId" and self._unconfirmed():
            self._confirm(_observed(check, "eth_chainId", []))
        result = _observed(self._once, method, params)
        if method == "eth_chainId":
            self._confirm(result)
        elif self._unconfirmed():  # this answer came over a new connection: perhaps from another node
            self._confirm(_observed(check, "eth_chainId", []))
        return result

    def verify_chain(self) -> None:
        """Check the chain id now if it is due (never checked, a new connection, an error since); retried."""
        if self._unconfirmed():
            self.call("eth_chainId", [])

    # -- transport -----------------------------------------------------------------------------------------
    def _once(self, method: str, params: list[Any], name: str | None = None) -> Any:
        """One request; errors say `name` (the call being answered: a chain-id check made for
        eth_blockNumber fails as eth_blockNumber)."""
        name = name or method
        self.stats["rpc_calls"] += 1
        try:
            resp = self.provider.make_request(method, params)
        except requests.HTTPError as exc:
            self.stats["rpc_errors"] += 1
            status = exc.response.status_code if exc.response is not None else 0
            if status == 429 or status >= 500:  # a proxy or balancer in front may fail over: check the chain again
                self._checked_at = -1
            body = exc.response.text[:300] if exc.response is not None else ""
            if status == 429 or _is_rate_limit(body):
                raise TransientRpcError(f"{name}: HTTP {status}: {body}") from exc
            if method == "eth_getLogs" and _is_too_large(body):
                raise RangeTooLarge(f"{name}: HTTP {status}: {body}") from exc
            if status >= 500:
                raise TransientRpcError(f"{name}: HTTP {status}: {body}") from exc
            raise RpcError(f"{name}: HTTP {status}: {body}") from exc
        except (requests.ConnectionError, requests.Timeout) as exc:
            self.stats["rpc_errors"] += 1
            self._checked_at = -1
            if method == "eth_getLogs" and isinstance(exc, requests.ReadTimeout):  # connected, but too slow
                raise RangeTooLarge(f"{name}: timed out") from exc
            raise TransientRpcError(f"{name}: {_transport_reason(exc, self.timeout_s)}") from exc
        if resp.get("error"):
            self.stats["rpc_errors"] += 1
            err = resp["error"]
            msg = err.get("message", str(err)) if isinstance(err, dict) else str(err)
            code = err.get("code") if isinstance(err, dict) else None
            if code == 429 or _is_rate_limit(msg):
                raise TransientRpcError(f"{name}: {msg} (code {code})")
            if method == "eth_getLogs" and _is_too_large(msg):
                raise RangeTooLarge(f"{name}: {msg}")
            if code in (-32005, -32603):
                raise TransientRpcError(f"{name}: {msg} (code {code})")
            raise RpcError(f"{name}: {msg} (code {code})")
        if "result" not in resp:
            raise RpcError(f"{name}: response without result: {str(resp)[:200]}")
        return resp["result"]

    def call(self, method: str, params: list[Any]) -> Any:
        """One JSON-RPC call, retried with exponential backoff on transient failures, at most `retries` times
        and never starting a retry after `deadline_s` (an attempt in flight still has its own timeout)."""
        t0 = time.monotonic()
        try:
            for attempt in Retrying(
                retry=retry_if_exception_type(TransientRpcError),
                stop=stop_after_attempt(self.retries + 1) | stop_before_delay(self.deadline_s),
                wait=wait_exponential_jitter(multiplier=0.1, max=self.backoff_max_s),
                before_sleep=lambda state: self._log_retry(method, state),
                reraise=False,
            ):
                with attempt:
                    return self._attempt(method, params)
        except RetryError as exc:
            n = exc.last_attempt.attempt_number
            last = exc.last_attempt.exception()
            reason = str(last).removeprefix(f"{method}: ")
            err = RpcError(f"{method} failed after {n} attempt{'s' if n != 1 else ''} in "
                           f"{time.monotonic() - t0:.1f}s: {reason}")
            err.node = self.node
            raise err from last
        except RpcError as exc:  # not worth retrying: the node answered, but with an error
            exc.node = self.node
            raise
        raise AssertionError("unreachable")

    def _log_retry(self, method: str, state: RetryCallState) -> None:
        """One short progress line per retry, so a wait on a dead node is never silent."""
        exc = state.outcome.exception() if state.outcome else None
        log.warning("%s at %s: attempt %d of %d failed (%s); retrying in %.1fs (giving up after %gs)",
                    method, self.node, state.attempt_number, self.retries + 1,
                    str(exc).removeprefix(f"{method}: "), state.upcoming_sleep, self.deadline_s)

    # -- chain ---------------------------------------------------------------------------------------------
    def chain_id(self) -> int:
        return int(self.call("eth_chainId", []), 16)

    def block_number(self) -> int:
        return int(self.call("eth_blockNumber", []), 16)

    def header(self, block: int | str) -> BlockHeader:
        tag = hex(block) if isinstance(block, int) else block
        raw = self.call("eth_getBlockByNumber", [tag, False])
        if raw is None:
            raise RpcError(f"block {block} not found")
        return _header(raw)

    def headers(self, numbers: list[int]) -> dict[int, BlockHeader]:
        """Headers of many blocks; batched JSON-RPC when the provider allows, else one by one."""
        out: dict[int, BlockHeader] = {}
        todo = sorted(set(numbers))
        for i in range(0, len(todo), 200):
            chunk = todo[i : i + 200]
            self.verify_chain()
            try:
                self.stats["rpc_calls"] += 1
                results = self.provider.make_batch_request(
                    [("eth_getBlockByNumber", [hex(n), False]) for n in chunk])
                self.verify_chain()  # the batch may have gone over a new connection
                if not isinstance(results, list):
                    raise TypeError("batch answered with a single error")
                for n, r in zip(chunk, results, strict=True):
                    if r.get("error") or r.get("result") is None:
                        raise TypeError(f"batch item {n}: {r.get('error')}")
                    out[n] = _header(r["result"])
            except (TypeError, ValueError, requests.RequestException):
                for n in chunk:
                    out[n] = self.header(n)
        return out

    def safe_head(self, finality: str, confirmations: int) -> int:
        """Highest block that counts as final: head - confirmations, or the `finalized` tag."""
        if finality == "finalized":
            return self.header("finalized").number
        return max(-1, self.block_number() - confirmations)

    def get_logs(self, from_block: int, to_block: int, addresses: list[str]) -> list[dict]:
        """All logs of `addresses` in [from_block, to_block], in chain order, whatever the provider's limits."""
        logs: list[dict] = []
        for chunk_start in range(0, len(addresses), _ADDRESS_CHUNK):
            chunk = addresses[chunk_start : chunk_start + _ADDRESS_CHUNK]
            for part in self._iter_logs(from_block, to_block, chunk):
                logs.extend(part)
        if len(addresses) > _ADDRESS_CHUNK:
            logs.sort(key=lambda lg: (int(lg["blockNumber"], 16), int(lg["logIndex"], 16)))
        return logs

    def get_block_logs(self, block_hash: str, addresses: list[str]) -> list[dict]:
        """Logs of one block by hash: a reorg cannot mix two forks into one answer."""
        logs: list[dict] = []
        for i in range(0, len(addresses), _ADDRESS_CHUNK):
            chunk = addresses[i : i + _ADDRESS_CHUNK]
            logs.extend(self.call("eth_getLogs", [{"blockHash": block_hash, "address": chunk}]))
        if len(addresses) > _ADDRESS_CHUNK:
            logs.sort(key=lambda lg: int(lg["logIndex"], 16))
        return logs

    def _iter_logs(self, start: int, end: int, addresses: list[str]) -> Iterator[list[dict]]:
        cur = start
        while cur <= end:
            hi = min(end, cur + self.logs_window - 1)
            try:
                part = self.call("eth_getLogs", [{"fromBlock": hex(cur), "toBlock": hex(hi), "address": addresses}])
            except RangeTooLarge as exc:
                if hi == cur:
                    raise RpcError(f"eth_getLogs refuses even a single block ({cur}): {exc}") from exc
                self.stats["range_splits"] += 1
                self.logs_window = max(1, (hi - cur + 1) // 2)
                log.info("getLogs window shrunk to %d blocks after: %s", self.logs_window, exc)
                continue
            yield part
            cur = hi + 1
            if self.logs_window < self.max_logs_range:
                self.logs_window = min(self.max_logs_range, self.logs_window * 2)


def _header(raw: dict) -> BlockHeader:
    return BlockHeader(
        number=int(raw["number"], 16),
        hash=raw["hash"].lower(),
        parent_hash=raw["parentHash"].lower(),
        timestamp=int(raw["timestamp"], 16),
    )
