"""Database plumbing: engines, migrations (yoyo, SQL files in sql/), and database creation."""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path
from typing import Any

import psycopg
from sqlalchemy import Connection, Engine, create_engine
from sqlalchemy.engine import make_url
from sqlalchemy.exc import DBAPIError

from orderbook_pipelines.config import PROJECT_ROOT

SQL_DIR = PROJECT_ROOT / "sql"


def sqlalchemy_url(url: str) -> str:
    """Make the psycopg 3 driver explicit: SQLAlchemy would otherwise pick psycopg2 for postgresql://."""
    for prefix in ("postgresql://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql+psycopg://" + url[len(prefix) :]
    return url


def libpq_url(url: str) -> str:
    """The same URL for psycopg/libpq (no SQLAlchemy driver suffix)."""
    return make_url(sqlalchemy_url(url)).set(drivername="postgresql").render_as_string(hide_password=False)


@contextmanager
def local_setting(conn: Connection, name: str, value: str) -> Iterator[None]:
    """A server setting for the statements inside only, then the one the transaction had before (a caller's own
    SET LOCAL included, which resetting to DEFAULT would lose). Not restored after an error: the transaction is
    failed then, and a failed statement's error is the one to see."""
    before = conn.exec_driver_sql("SELECT current_setting(%(n)s)", {"n": name}).scalar_one()
    conn.exec_driver_sql("SELECT set_config(%(n)s, %(v)s, true)", {"n": name, "v": value})
    yield
    conn.exec_driver_sql("SELECT set_config(%(n)s, %(v)s, true)", {"n": name, "v": before})


_cursor_ids = itertools.count()


def stream_rows(conn: Connection, sql: str, params: dict[str, Any], batch: int = 5000) -> Iterator[tuple]:
    """Positional rows of a driver-level query (psycopg `%(name)s` parameters) through a server-side cursor,
    `batch` per round trip, inside `conn`'s transaction: millions of rows without holding them, and Python
    works on one batch while the server produces the next (a small `batch` for a few large rows)."""
    raw = conn.connection.driver_connection  # psycopg 3, the project's one driver (sqlalchemy_url)
    assert isinstance(raw, psycopg.Connection), type(raw)
    with raw.cursor(name=f"obp_stream_{next(_cursor_ids)}") as cur:
        cur.execute(sql, params)
        while rows := cur.fetchmany(batch):
            yield from rows


@lru_cache(maxsize=16)
def engine_for(url: str) -> Engine:
    return create_engine(sqlalchemy_url(url), pool_pre_ping=True, pool_size=5, max_overflow=5)


# A forked child (ingestion's worker processes) must never check out a connection its parent pooled: two processes
# on one socket interleave their protocol messages. So its engines start anew; the parent's pooled connections are
# left alone (psycopg does not close, on garbage collection, a connection another process opened).
os.register_at_fork(after_in_child=engine_for.cache_clear)


def migrate(url: str, sql_dir: Path = SQL_DIR) -> list[str]:
    """Apply pending migrations; returns the ids applied. Safe to call on every start (locked, idempotent)."""
    if {p.stem for p in sql_dir.glob("*.sql")} <= _applied(url):
        return []  # what every start finds: one query instead of importing yoyo and its lock (~45 ms of start-up)
    from yoyo import get_backend, read_migrations

    backend = get_backend(sqlalchemy_url(url))  # yoyo knows the postgresql+psycopg scheme
    migrations = read_migrations(str(sql_dir))
    with backend.lock():
        pending = backend.to_apply(migrations)
        backend.apply_migrations(pending)
    return [m.id for m in pending]


def _applied(url: str) -> set[str]:
    """Ids of the migrations yoyo recorded as applied; none if it cannot tell (a new database: yoyo then runs, and
    says what is wrong if the database cannot be reached)."""
    try:
        with engine_for(url).connect() as conn:
            return set(conn.exec_driver_sql("SELECT migration_id FROM _yoyo_migration").scalars())
    except DBAPIError:
        return set()


def ensure_database(url: str) -> bool:
    """Create the database named in `url` if missing (connecting to the maintenance db). True if created."""
    u = make_url(sqlalchemy_url(url))
    name = u.database
    admin = u.set(database="postgres", drivername="postgresql").render_as_string(hide_password=False)
    with psycopg.connect(admin, autocommit=True) as conn:
        exists = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone()
        if exists:
            return False
        conn.execute(f'CREATE DATABASE "{name}"')
        return True


def drop_database(url: str) -> None:
    u = make_url(sqlalchemy_url(url))
    admin = u.set(database="postgres", drivername="postgresql").render_as_string(hide_password=False)
    engine_for.cache_clear()
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'DROP DATABASE IF EXISTS "{u.database}" WITH (FORCE)')
