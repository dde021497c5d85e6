"""Observability and secret hygiene shared by every process: JSON logs, trace ids, redaction, secret files.

One logging setup (structlog, with stdlib `logging` routed through the same processors) so that a line from
web3, httpx, uvicorn or our code looks the same, carries the same trace/request id, and goes through the same
redaction. Secrets reach a process only through the environment or a file named by `<VAR>_FILE`
(Docker/Kubernetes secrets style); `bootstrap()` loads those files and registers every secret value so that it
can never be printed, even inside an exception message.
"""

from __future__ import annotations

import logging
import os
import re
import sys
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any
from urllib.parse import parse_qsl, urlsplit

import structlog
from structlog.contextvars import bound_contextvars
from structlog.types import EventDict, WrappedLogger

# Variables that may carry a secret; each may instead be given as `<NAME>_FILE` (a path to read it from).
SECRET_ENV = ("DATABASE_URL", "REDIS_URL", "OBP_RPC_URL", "OBP_ADMIN_TOKEN", "DAGSTER_PG_PASSWORD", "PGPASSWORD",
              "OBP_PUSHER_SECRET", "OBP_PUSHER_AUTH_TOKEN")
REDACTED = "***"

_SECRET_KEYS = re.compile(r"(^|[_\-])(password|passwd|pwd|secret|token|api[_\-]?key|apikey|authorization|cookie|"
                          r"private[_\-]?key|credentials?)($|[_\-])", re.I)
# scheme://user:password@host  and  scheme://:password@host (Redis)
_URL_PASSWORD = re.compile(r"([a-z][a-z0-9+.\-]*://[^\s:/@]*:)([^\s@/]+)(@)", re.I)
# password=..., token: ..., api_key=... inside free text (libpq key/value DSNs, query strings, messages)
_KV_SECRET = re.compile(r"\b((?:pass(?:word|wd)?|pwd|secret|token|api[_-]?key|apikey|access[_-]?token)"
                        r"\s*[=:]\s*)(\"[^\"]*\"|'[^']*'|[^\s&,;'\"]+)", re.I)
_BEARER = re.compile(r"\b(Bearer|Basic|Token)\s+[A-Za-z0-9._~+/=\-]{4,}", re.I)

_secrets: set[str] = set()
_configured = False
_HANDLER_NAME = "obp-json"


# -- secrets ------------------------------------------------------------------------------------------------
def register_secret(value: str | None) -> None:
    """Redact this exact value wherever it appears in a log line (tokens, RPC keys in URL paths)."""
    if value and len(value) >= 6:
        _secrets.add(value)


def _register_url_secrets(url: str) -> None:
    """A URL's password, and its path segments / query values that look like API keys (Infura, Alchemy)."""
    try:
        parts = urlsplit(url)
    except ValueError:
        return
    register_secret(parts.password)
    for seg in parts.path.split("/"):
        if len(seg) >= 16 and re.fullmatch(r"[A-Za-z0-9_\-]+", seg):
            register_secret(seg)
    for _, v in parse_qsl(parts.query):
        if len(v) >= 16:
            register_secret(v)


def load_secret_files(environ: dict[str, str] | None = None) -> list[str]:
    """For each NAME in SECRET_ENV with NAME_FILE set and NAME unset: NAME = the file's content (stripped).

    Returns the names loaded. The environment wins over a file so an operator can override in an emergency.
    """
    env = os.environ if environ is None else environ
    loaded = []
    for name in SECRET_ENV:
        path = env.get(f"{name}_FILE")
        if path and not env.get(name):
            env[name] = Path(path).read_text().strip()
            loaded.append(name)
    return loaded


def register_env_secrets(environ: Mapping[str, str] | None = None) -> None:
    env = os.environ if environ is None else environ
    for name in SECRET_ENV:
        value = env.get(name)
        if not value:
            continue
        if "://" in value:
            _register_url_secrets(value)
        else:
            register_secret(value)


def redact_text(s: str) -> str:
    """Remove every secret we can recognise from a string."""
    for secret in sorted(_secrets, key=len, reverse=True):
        if secret in s:
            s = s.replace(secret, REDACTED)
    s = _URL_PASSWORD.sub(rf"\g<1>{REDACTED}\g<3>", s)
    s = _KV_SECRET.sub(rf"\g<1>{REDACTED}", s)
    return _BEARER.sub(rf"\g<1> {REDACTED}", s)


def redact(value: Any, key: str | None = None) -> Any:
    if key is not None and _SECRET_KEYS.search(key) and value not in (None, "", 0):
        return REDACTED
    if isinstance(value, str):
        return redact_text(value)
    if isinstance(value, Mapping):
        return {k: redact(v, str(k)) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [redact(v) for v in value]
    return value


def redact_processor(_: WrappedLogger, __: str, event_dict: EventDict) -> EventDict:
    """structlog processor: last before rendering, so it also sees formatted exceptions and stdlib messages."""
    return {k: (v if k in ("timestamp", "level", "logger") else redact(v, k)) for k, v in event_dict.items()}


# -- logging ------------------------------------------------------------------------------------------------
class _CurrentStderr(logging.StreamHandler):
    """Writes to `sys.stderr` as it is when a record is emitted, not as it was at configuration: whoever swaps
    stderr later (a CLI runner, a daemonising wrapper) gets the lines, and a closed earlier stream is never hit."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property
    def stream(self) -> IO[str]:
        return sys.stderr

    @stream.setter
    def stream(self, _: IO[str]) -> None:
        pass


def configure_logging(level: str | None = None, stream: IO[str] | None = None, force: bool = False) -> None:
    """JSON lines on stderr (or `stream`); idempotent unless `force` (tests capture into a buffer)."""
    global _configured
    if _configured and not force:
        return
    register_env_secrets()
    lvl = getattr(logging, (level or os.environ.get("OBP_LOG_LEVEL", "INFO")).upper(), logging.INFO)
    shared: list[Any] = [
        structlog.contextvars.merge_contextvars,
        structlog.stdlib.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    structlog.configure(
        processors=[structlog.stdlib.filter_by_level, *shared,
                    structlog.stdlib.PositionalArgumentsFormatter(),
                    structlog.stdlib.ProcessorFormatter.wrap_for_formatter],
        logger_factory=structlog.stdlib.LoggerFactory(),
        wrapper_class=structlog.stdlib.BoundLogger,
        cache_logger_on_first_use=False,
    )
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                    structlog.processors.format_exc_info, redact_processor,
                    structlog.processors.JSONRenderer(default=str)],
    )
    handler: logging.Handler = logging.StreamHandler(stream) if stream is not None else _CurrentStderr()
    handler.set_name(_HANDLER_NAME)
    handler.setFormatter(formatter)
    root = logging.getLogger()
    for h in list(root.handlers):
        if h.get_name() == _HANDLER_NAME:
            root.removeHandler(h)
    root.addHandler(handler)
    root.setLevel(lvl)
    for noisy in ("urllib3", "web3", "httpx", "httpcore", "asyncio", "websockets"):
        logging.getLogger(noisy).setLevel(max(lvl, logging.WARNING))
    _configured = True


def bootstrap() -> None:
    """Process start: secret files into the environment, then logging. Safe to call more than once."""
    load_secret_files()
    configure_logging()


class Laps:
    """Seconds spent in the named parts of one stage (write, project) for the benchmarks: each `lap(name)` adds
    the time since the previous lap (or `skip`) to `name`, so a part interleaved with other work sums its pieces."""

    def __init__(self) -> None:
        self._seconds: dict[str, float] = {}
        self._t = time.perf_counter()

    def skip(self) -> None:
        """Start timing from now: what ran since the last lap belongs to no part."""
        self._t = time.perf_counter()

    def lap(self, name: str) -> None:
        now = time.perf_counter()
        self._seconds[name] = self._seconds.get(name, 0.0) + now - self._t
        self._t = now

    @property
    def seconds(self) -> dict[str, float]:
        return {k: round(v, 4) for k, v in self._seconds.items()}


def new_id() -> str:
    return uuid.uuid4().hex[:16]


@contextmanager
def trace(**fields: Any) -> Iterator[str]:
    """Bind a trace id (and fields) to every log line of this context, including stdlib loggers underneath."""
    tid = fields.pop("trace_id", None) or new_id()
    with bound_contextvars(trace_id=tid, **fields):
        yield tid


