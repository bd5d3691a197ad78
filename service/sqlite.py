"""The embedded store of record: SQLite in WAL mode.

`synchronous=FULL`: a reply is sent only after its transaction is durable,
so a crash never loses an acknowledged move. One worker thread: SQLite has a
single writer, and group commit already amortises each fsync over the batch.

Batches run buffered (holdfast.batch): a Reserve is five statements, and each
statement releases the GIL and takes it back from the busy event loop, so
one SELECT for the batch and one multi-row statement per table to write it
keep the worker thread off the loop's back. `BEGIN IMMEDIATE` takes the
file's write lock, so every row read stays what the batch read.
"""

from __future__ import annotations

import functools
import sqlite3
from collections.abc import Sequence
from typing import Any, ClassVar

from holdfast.batch import BufferedStore, Changes, Named, Rows
from holdfast.store import Budget, Record, Row, SqlTxn, added_columns, schema
from holdfast.table import Table

# SQLite's primary result codes that mean the database, not the move, failed.
_UNAVAILABLE = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_IOERR", "SQLITE_FULL", "SQLITE_CANTOPEN", "SQLITE_CORRUPT",
                "SQLITE_NOTADB", "SQLITE_READONLY", "SQLITE_PROTOCOL", "SQLITE_NOMEM", "SQLITE_PERM")


class SqliteTxn(SqlTxn):
    PLACEHOLDER = "?"


def _in(names: frozenset[Any]) -> tuple[str, Row]:
    """`IN (?, ?, ...)` for `names`, and its parameters."""
    return "(" + ", ".join("?" * len(names)) + ")", tuple(names)


# Multi-row statements: one step, so one GIL hand-off, per table and batch.
# `{values}` is "(?, ...), (?, ...)", a group per row.
INSERT_OUTCOMES = (
    "INSERT INTO outcome (key, fingerprint, reason, payload, recorded_at_ms, entity) VALUES {values}"
    " ON CONFLICT (key) DO NOTHING"
)


@functools.cache
def _statement(kind: str, table: Table[Any] | None) -> str:
    """A table's multi-row insert, compare-and-set update or upsert."""
    if table is None:
        return INSERT_OUTCOMES
    names, key = ", ".join(table.names), table.key_column
    if kind == "insert":
        return f"INSERT INTO {table.name} ({names}) VALUES {{values}} ON CONFLICT ({key}) DO NOTHING"
    if kind == "update":
        sets = ", ".join(f"{name} = u.{name}" for name in table.updated)
        return (f"WITH u ({names}, stored) AS (VALUES {{values}}) UPDATE {table.name} SET {sets}"
                f" FROM u WHERE {table.name}.{key} = u.{key} AND {table.name}.version = u.stored")
    assert kind == "upsert", kind
    sets = ", ".join(f"{name} = excluded.{name}" for name in table.updated)
    return f"INSERT INTO {table.name} ({names}) VALUES {{values}} ON CONFLICT ({key}) DO UPDATE SET {sets}"


def _many(sql: str, rows: list[Row]) -> tuple[str, Row]:
    """`sql` with a `(?, ...)` group per row, and the rows' values in order."""
    group = "(" + ", ".join("?" * len(rows[0])) + ")"
    return sql.format(values=", ".join([group] * len(rows))), tuple(value for row in rows for value in row)


def _wrote(connection: sqlite3.Connection, sql: str, params: Row) -> int:
    """The rows `sql` inserted or updated. Not `cursor.rowcount`: Python
    before 3.12 reports -1 for a statement that starts with WITH (the
    updates do), which would send every batch that updates a row to the
    savepoint path."""
    before = connection.total_changes
    connection.execute(sql, params)
    return connection.total_changes - before


class SqliteStore(BufferedStore):
    TXN = SqliteTxn
    BEGIN: ClassVar[str] = "BEGIN IMMEDIATE"
    DATABASE_ERROR = sqlite3.Error

    def __init__(self, path: str, batch_max: int = 256, tables: Sequence[Table[Any]] = ()) -> None:
        super().__init__(workers=1, batch_max=batch_max, tables=tables)
        self.path = path
        # Every table's rows come back from one UNION ALL, each padded to
        # the widest: column 0 says which table (or outcome) a row is of.
        self._width = max([4, *(len(table.columns) for table in self.tables)])
        self._selects = [
            f"SELECT {n}, {', '.join(t.names)}{', NULL' * (self._width - len(t.columns))} FROM {t.name} WHERE "
            for n, t in enumerate(self.tables)
        ]
        self._keys = {table.name: table.key_column for table in self.tables}

    @classmethod
    def from_url(cls, url: str, tables: Sequence[Table[Any]] = ()) -> SqliteStore:
        path = url.removeprefix("sqlite://")
        path = path[1:] if path.startswith("/") else path
        if not path:
            raise ValueError(f"store URL {url!r} names no file")
        return cls(path, tables=tables)

    def describe(self) -> str:
        return f"sqlite:///{self.path}"  # the URL that opens this file again

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        db.execute("PRAGMA busy_timeout = 5000")
        return db

    def _create_schema(self, connection: sqlite3.Connection) -> None:
        connection.executescript(schema(self.tables, integer="INTEGER", blob="BLOB"))
        connection.execute("BEGIN IMMEDIATE")
        try:
            # Read under the write lock: two processes opening one older
            # file add each column once.
            def columns_of(name: str) -> set[str]:
                return {row[1] for row in connection.execute("SELECT * FROM pragma_table_info(?)", (name,))}

            for statement in added_columns(self.tables, columns_of, integer="INTEGER", blob="BLOB"):
                connection.execute(statement)
            self._stamp_schema(connection)
        except BaseException:
            connection.execute("ROLLBACK")
            raise
        connection.execute("COMMIT")

    # -- a batch, buffered --

    def _load(self, connection: sqlite3.Connection, named: Named, budget: Budget) -> Rows:
        """BEGIN, then every named row in one statement (one step per row
        found): the outcomes, each table's rows named, and those a table is
        `locked_with` (the stock of the reservations named), told apart by
        a first column. The write lock is the file's, taken at BEGIN
        IMMEDIATE: no row is ever busy, and the budget bounds nothing."""
        connection.execute(self.BEGIN)
        rows = Rows(self.tables)
        if not named:
            return rows
        keys, key_params = _in(named.keys)
        pad = ", NULL" * (self._width - 4)
        selects = [f"SELECT -1, key, fingerprint, reason, payload{pad} FROM outcome WHERE key IN {keys}"]
        params: list[Any] = [*key_params]
        wanted: list[tuple[int, Table[Any], Row]] = []
        for n, table in enumerate(self.tables):
            where, table_params = self._where(table, named)
            if where is None:
                continue
            selects.append(self._selects[n] + where)
            params += table_params
            wanted.append((n, table, tuple(named.rows.get(table.name, ()))))
        found: dict[int, dict[Any, Sequence[Any]]] = {}
        for n, *row in connection.execute(" UNION ALL ".join(selects), params):
            found.setdefault(n, {})[row[0]] = row
        outcomes = found.get(-1, {})
        for key in key_params:
            row = outcomes.get(key)
            rows.loaded_outcome(key, None if row is None else Record(row[1], row[2], row[3]))
        for n, table, names in wanted:
            of_table = found.get(n, {})
            width = len(table.columns)
            for key in {*names, *of_table}:
                row = of_table.get(key)
                rows.loaded(table, key, None if row is None else table.row(row[:width]))
        return rows

    def _where(self, table: Table[Any], named: Named) -> tuple[str | None, Row]:
        """The condition that picks `table`'s rows of the batch: those named,
        and those its `locked_with` tables' named rows point at."""
        clauses: list[str] = []
        params: list[Any] = []
        names = named.rows.get(table.name)
        if names:
            marks, values = _in(names)
            clauses.append(f"{table.key_column} IN {marks}")
            params += values
        for other, column in table.locked_with:
            others = named.rows.get(other)
            if others:
                marks, values = _in(others)
                clauses.append(f"{table.key_column} IN (SELECT {column} FROM {other} WHERE {self._keys[other]} IN {marks})")
                params += values
        return (" OR ".join(clauses) if clauses else None), tuple(params)

    def _write(self, connection: sqlite3.Connection, changes: Changes) -> bool:
        """One multi-row statement per table; False when one affected fewer
        rows than it holds (another process wrote the row after our read).
        An upsert may write fewer rows than it holds only if one held a row
        twice, which `Rows` never does."""
        return all(
            _wrote(connection, *_many(_statement(kind, table), rows)) == len(rows)
            for kind, table, rows in changes.row_sets()
        )

    def _is_unavailable(self, error: BaseException) -> bool:
        """The file cannot be used (busy past the timeout, I/O, full, read-only,
        corrupt), as opposed to one move's own failure (a broken CHECK, bad
        SQL), which its savepoint undoes alone."""
        if not isinstance(error, sqlite3.Error):
            return False
        name = getattr(error, "sqlite_errorname", "")
        return name.startswith(_UNAVAILABLE) or not isinstance(error, (sqlite3.IntegrityError, sqlite3.OperationalError))
