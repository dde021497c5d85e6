"""One sink interface, two engines: DuckDB (a local file, the default) and ClickHouse (clickhouse-connect).

Every load replaces one market's rows (delete-then-insert), all of them or those from a key on (`since`: what an
incremental load rewrote), so re-materializing a partition is idempotent. `analytics_loads` records how far each
market's tables are loaded (analytics/incremental.py).
ClickHouse tables are additionally ReplacingMergeTree on their natural key, so even an interrupted
delete/insert pair converges once parts merge. Schemas are declared once here with portable logical types.
"""

from __future__ import annotations

import dataclasses
import os
import tempfile
import time
import uuid
from abc import ABC, abstractmethod
from dataclasses import dataclass
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, urlparse

import polars as pl

# logical type -> (DuckDB, ClickHouse, polars)
_TYPES: dict[str, tuple[str, str, pl.DataType]] = {
    "i32": ("INTEGER", "Int32", pl.Int32()),
    "i64": ("BIGINT", "Int64", pl.Int64()),
    "str": ("VARCHAR", "String", pl.String()),
    "dec": ("DECIMAL(38,18)", "Decimal(38,18)", pl.Decimal(38, 18)),
    "f64": ("DOUBLE", "Float64", pl.Float64()),
    "f64n": ("DOUBLE", "Nullable(Float64)", pl.Float64()),  # null where undefined (no mid with one side empty)
    "ts": ("TIMESTAMP", "DateTime", pl.Datetime("us")),
    "date": ("DATE", "Date", pl.Date()),
}


@dataclass(frozen=True)
class Table:
    """An analytics table: columns (name, logical type), ClickHouse sort key and month partition column."""

    name: str
    columns: tuple[tuple[str, str], ...]
    order_by: tuple[str, ...]
    time_column: str

    @property
    def names(self) -> list[str]:
        return [c for c, _ in self.columns]

    def polars_schema(self) -> dict[str, pl.DataType]:
        return {c: _TYPES[t][2] for c, t in self.columns}


TRADES = Table(
    "trades_fact",
    (("market_id", "i32"), ("metric_id", "str"), ("chain_id", "i64"), ("block_number", "i64"), ("log_index", "i32"),
     ("block_time", "ts"), ("ts", "i64"), ("day", "date"), ("tx_hash", "str"),
     ("decimals", "i32"), ("price_raw", "str"), ("quantity_raw", "str"),  # exact uint256 as decimal digits
     ("price", "dec"), ("quantity", "dec"), ("notional", "f64"),
     ("buyer", "str"), ("seller", "str")),
    ("market_id", "block_time", "block_number", "log_index"), "block_time",
)
CANDLES = Table(
    "candles",
    (("market_id", "i32"), ("grain", "str"), ("bucket_start", "ts"), ("ts", "i64"),
     ("open", "dec"), ("high", "dec"), ("low", "dec"), ("close", "dec"), ("volume", "dec"),
     ("notional", "f64"), ("trades", "i64"), ("vwap", "f64"), ("twap", "f64")),
    ("market_id", "grain", "bucket_start"), "bucket_start",
)
LIQUIDITY = Table(
    "liquidity",
    (("market_id", "i32"), ("snapshot_time", "ts"), ("ts", "i64"), ("block_number", "i64"), ("source", "str"),
     ("best_bid", "f64n"), ("best_ask", "f64n"), ("mid", "f64n"), ("spread", "f64n"), ("spread_bps", "f64n"),
     ("bid_depth_0_5", "f64n"), ("ask_depth_0_5", "f64n"), ("bid_depth_1", "f64n"), ("ask_depth_1", "f64n"),
     ("bid_depth_2", "f64n"), ("ask_depth_2", "f64n"), ("imbalance_1", "f64n"),
     ("bid_notional", "f64"), ("ask_notional", "f64"), ("bid_levels", "i64"), ("ask_levels", "i64")),
    ("market_id", "snapshot_time", "block_number"), "snapshot_time",
)
MARKET_DAILY = Table(
    "market_daily",
    (("market_id", "i32"), ("day", "date"), ("trades", "i64"), ("volume", "dec"), ("notional", "f64"),
     ("traders", "i64"), ("buyers", "i64"), ("sellers", "i64")),
    ("market_id", "day"), "day",
)
# One row per (market, loaded table): the trades block it covers, and for trades the Postgres snapshot it read.
LOADS = Table(
    "analytics_loads",
    (("market_id", "i32"), ("name", "str"), ("block", "i64"), ("snapshot", "str"), ("ranges", "i64"),
     ("loaded_at", "ts")),
    ("market_id", "name"), "loaded_at",
)
TABLES = {t.name: t for t in (TRADES, CANDLES, LIQUIDITY, MARKET_DAILY, LOADS)}

Since = tuple[str, int | date]  # (column, lowest value kept for replacement): rows with column >= value


def where_market(market_id: int, since: Since | None = None, name: str | None = None) -> str:
    """The WHERE text of a market's rows (from `since` on; of one load `name`), from validated values only."""
    out = f"market_id = {int(market_id)}"
    if since is not None:
        col, v = since
        if not col.isidentifier():
            raise ValueError(f"bad column {col!r}")
        if isinstance(v, date):
            out += f" AND {col} >= CAST('{v.isoformat()}' AS DATE)"
        else:
            out += f" AND {col} >= {int(v)}"
    if name is not None:
        if not name.replace("_", "").isalnum():
            raise ValueError(f"bad load name {name!r}")
        out += f" AND name = '{name}'"
    return out


class AnalyticsSink(ABC):
    """What assets, checks and analyst queries need from an engine; nothing engine-specific leaks past it."""

    dialect: str

    @abstractmethod
    def ensure_schema(self) -> None: ...

    def replace_market(self, table: Table, market_id: int, df: pl.DataFrame, since: Since | None = None) -> int:
        """Delete the market's rows (those from `since` on), insert `df`; returns rows inserted."""
        return self.replace_where(table, where_market(market_id, since), df)

    @abstractmethod
    def replace_where(self, table: Table, where: str, df: pl.DataFrame) -> int:
        """Delete the rows matching `where` (built by where_market), insert `df`; returns rows inserted."""

    @abstractmethod
    def query(self, sql: str) -> pl.DataFrame: ...

    @abstractmethod
    def command(self, sql: str) -> None: ...

    def close(self) -> None:  # noqa: B027 - optional
        """Release connections (no-op where there is nothing to release)."""

    def __enter__(self) -> AnalyticsSink:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _frame(df: pl.DataFrame, table: Table) -> pl.DataFrame:
    missing = set(table.names) - set(df.columns)
    if missing:
        raise ValueError(f"{table.name}: frame lacks columns {sorted(missing)}")
    return df.select(table.names).cast(table.polars_schema())  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------------ DuckDB --
class DuckDBSink(AnalyticsSink):
    """An embedded DuckDB file. One writer process at a time: opening retries while another run holds the lock."""

    dialect = "duckdb"

    def __init__(self, path: str | Path, lock_timeout_s: float = 120.0) -> None:
        import duckdb

        self.path = str(path)
        if self.path != ":memory:":
            Path(self.path).parent.mkdir(parents=True, exist_ok=True)
        deadline = time.monotonic() + lock_timeout_s
        while True:
            try:
                self.con = duckdb.connect(self.path)
                break
            except duckdb.IOException as exc:  # another Dagster run process holds the file lock
                if "lock" not in str(exc).lower() or time.monotonic() > deadline:
                    raise
                time.sleep(0.5)
        self._tmp = Path(tempfile.mkdtemp(prefix="obp-duckdb-"))

    def ensure_schema(self) -> None:
        for t in TABLES.values():
            cols = ", ".join(f'"{c}" {_TYPES[ty][0]}' for c, ty in t.columns)
            self.con.execute(f"CREATE TABLE IF NOT EXISTS {t.name} ({cols})")

    def replace_where(self, table: Table, where: str, df: pl.DataFrame) -> int:
        df = _frame(df, table)
        path = self._tmp / f"{uuid.uuid4().hex}.parquet"
        df.write_parquet(path)  # polars -> Parquet -> DuckDB: columnar and exact (DECIMAL stays DECIMAL)
        cols = ", ".join(f'"{c}"' for c in table.names)
        try:
            self.con.execute("BEGIN")
            self.con.execute(f"DELETE FROM {table.name} WHERE {where}")
            if df.height:
                self.con.execute(f"INSERT INTO {table.name} ({cols}) SELECT {cols} FROM read_parquet(?)", [str(path)])
            self.con.execute("COMMIT")
        except Exception:
            self.con.execute("ROLLBACK")
            raise
        finally:
            path.unlink(missing_ok=True)
        return df.height

    def query(self, sql: str) -> pl.DataFrame:
        path = self._tmp / f"{uuid.uuid4().hex}.parquet"
        try:
            self.con.execute(f"COPY ({sql}) TO '{path}' (FORMAT parquet)")
            return pl.read_parquet(path)
        finally:
            path.unlink(missing_ok=True)

    def command(self, sql: str) -> None:
        self.con.execute(sql)

    def close(self) -> None:
        self.con.close()
        for p in self._tmp.glob("*"):
            p.unlink(missing_ok=True)
        self._tmp.rmdir()


# -------------------------------------------------------------------------------------------- ClickHouse --
def _clickhouse_client(url: str) -> Any:
    """clickhouse-connect HTTP client for `http://user:pass@host:8123/db`.

    Servers before 20.x (Debian 12 ships 18.16) have no `readonly` column in system.settings, which
    clickhouse-connect reads while connecting; the subclass retries that one query without it. Everything
    else goes through the library unchanged (compression off: old servers lack lz4/zstd HTTP encodings).
    """
    from clickhouse_connect.driver._backend.operations import QueryOp
    from clickhouse_connect.driver.exceptions import DatabaseError
    from clickhouse_connect.driver.httpclient import HttpClient

    class _Client(HttpClient):
        def _execute_operation(self, operation: Any) -> object:
            if isinstance(operation, QueryOp) and operation.text.startswith("SELECT name, value, readonly FROM"):
                try:
                    return super()._execute_operation(operation)
                except DatabaseError as exc:
                    if "readonly" not in str(exc):
                        raise
                    operation = dataclasses.replace(
                        operation, text="SELECT name, value, toUInt8(0) AS readonly FROM system.settings")
            return super()._execute_operation(operation)

    u = urlparse(url)
    return _Client(interface=u.scheme or "http", host=u.hostname or "127.0.0.1", port=u.port or 8123,
                   username=u.username or "default", password=u.password or "", database="default",
                   compress=False, autogenerate_session_id=False)


class ClickHouseSink(AnalyticsSink):
    """ClickHouse over HTTP: MergeTree tables ORDER BY (market, time), PARTITION BY toYYYYMM(time)."""

    dialect = "clickhouse"

    def __init__(self, url: str, database: str | None = None, mutation_timeout_s: float = 120.0) -> None:
        u = urlparse(url)
        self.database = database or (u.path.strip("/") or parse_qs(u.query).get("database", ["default"])[0])
        if not self.database.replace("_", "").isalnum():
            raise ValueError(f"invalid ClickHouse database name {self.database!r}")
        self.client = _clickhouse_client(url)
        self.client.command(f"CREATE DATABASE IF NOT EXISTS {self.database}")
        self.client.database = self.database  # unqualified names in analyst queries resolve here
        self.mutation_timeout_s = mutation_timeout_s

    def ensure_schema(self) -> None:
        for t in TABLES.values():
            cols = ", ".join(f"`{c}` {_TYPES[ty][1]}" for c, ty in t.columns)
            self.client.command(
                f"CREATE TABLE IF NOT EXISTS {self.database}.{t.name} ({cols}) ENGINE = ReplacingMergeTree() "
                f"PARTITION BY toYYYYMM({t.time_column}) ORDER BY ({', '.join(t.order_by)})")

    def _wait_mutations(self, table: str) -> None:
        """ALTER ... DELETE is asynchronous everywhere (mutations_sync is newer than some servers): poll."""
        deadline = time.monotonic() + self.mutation_timeout_s
        while True:
            pending = self.client.query(
                f"SELECT count() FROM system.mutations WHERE database = '{self.database}' AND table = '{table}' "
                "AND is_done = 0").result_rows[0][0]
            if not pending:
                return
            if time.monotonic() > deadline:
                raise TimeoutError(f"ClickHouse mutation on {self.database}.{table} not done in "
                                   f"{self.mutation_timeout_s:.0f}s")
            time.sleep(0.1)

    def replace_where(self, table: Table, where: str, df: pl.DataFrame) -> int:
        df = _frame(df, table)
        self.client.command(f"ALTER TABLE {self.database}.{table.name} DELETE WHERE {where}")
        self._wait_mutations(table.name)
        if df.height:
            # DateTime as epoch seconds: naive datetimes would otherwise be read in the client's local zone
            ts_cols = [c for c, ty in table.columns if ty == "ts"]
            out = df.with_columns([pl.col(c).dt.replace_time_zone("UTC").dt.epoch("s") for c in ts_cols])
            self.client.insert(f"{self.database}.{table.name}", out.rows(), column_names=table.names,
                               column_type_names=[_TYPES[ty][1] for _, ty in table.columns])
        return df.height

    def query(self, sql: str) -> pl.DataFrame:
        res = self.client.query(sql, settings={"join_use_nulls": 1})
        names = list(res.column_names)
        rows = [[_py(v) for v in r] for r in res.result_rows]
        if not rows:
            return pl.DataFrame(schema=names)
        return pl.DataFrame(rows, schema=names, orient="row", infer_schema_length=None)

    def command(self, sql: str) -> None:
        self.client.command(sql)

    def drop_database(self) -> None:
        self.client.command(f"DROP DATABASE IF EXISTS {self.database}")

    def close(self) -> None:
        self.client.close()


def _py(v: object) -> object:
    if isinstance(v, datetime) and v.tzinfo is not None:
        return v.astimezone(UTC).replace(tzinfo=None)
    return v


def open_sink(backend: str, duckdb_path: str = "", clickhouse_url: str = "",
              clickhouse_database: str = "") -> AnalyticsSink:
    """Backend by name; unknown names fail loudly rather than silently falling back to DuckDB."""
    if backend == "duckdb":
        return DuckDBSink(duckdb_path or os.environ.get("OBP_ANALYTICS_DUCKDB", ".run/analytics.duckdb"))
    if backend == "clickhouse":
        url = clickhouse_url or os.environ.get("CLICKHOUSE_URL", "")
        if not url:
            raise ValueError("OBP_ANALYTICS=clickhouse needs CLICKHOUSE_URL (e.g. http://127.0.0.1:8123/analytics)")
        return ClickHouseSink(url, clickhouse_database or None)
    raise ValueError(f"unknown analytics backend {backend!r}: use 'duckdb' or 'clickhouse'")
