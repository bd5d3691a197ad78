"""The embedded store of record: SQLite in WAL mode.

`synchronous=FULL`: a reply is sent only after its transaction is durable,
so a crash never loses an acknowledged move. One worker thread: SQLite has a
single writer, and group commit already amortises each fsync over the batch.

Batches run buffered (holdfast.batch): a Reserve is five statements, and each
statement releases the GIL and takes it back from the busy event loop, so
one SELECT per table for the batch and one `executemany` per table to write
it keep the worker thread off the loop's back. `BEGIN IMMEDIATE` takes the
file's write lock, so every row read stays what the batch read.
"""

from __future__ import annotations

import sqlite3
from typing import Any, ClassVar

from holdfast.batch import BufferedStore, Changes, Named, Rows
from holdfast.store import (
    ENTITY_COLUMNS,
    RESERVATION_COLUMNS,
    Record,
    Row,
    SqlTxn,
    Stock,
    entity_of_row,
    reservation_of_row,
    schema,
)

SCHEMA = schema(integer="INTEGER", blob="BLOB")


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
    "INSERT INTO outcome (key, fingerprint, reason, payload, recorded_at_ms) VALUES {values}"
    " ON CONFLICT (key) DO NOTHING"
)
INSERT_RESERVATIONS = f"INSERT INTO reservation ({RESERVATION_COLUMNS}) VALUES {{values}} ON CONFLICT (reservation_id) DO NOTHING"
UPDATE_RESERVATIONS = (
    f"WITH u ({RESERVATION_COLUMNS}, stored) AS (VALUES {{values}})"
    " UPDATE reservation SET order_id = u.order_id, sku_id = u.sku_id, quantity = u.quantity, state = u.state,"
    " version = u.version, expires_at_ms = u.expires_at_ms, retry_count = u.retry_count,"
    " release_reason = u.release_reason"
    " FROM u WHERE reservation.reservation_id = u.reservation_id AND reservation.version = u.stored"
)
INSERT_ENTITIES = f"INSERT INTO entity ({ENTITY_COLUMNS}) VALUES {{values}} ON CONFLICT (entity_id) DO NOTHING"
# The kind is left as inserted: a machine never turns into another.
UPDATE_ENTITIES = (
    f"WITH u ({ENTITY_COLUMNS}, stored) AS (VALUES {{values}})"
    " UPDATE entity SET state = u.state, version = u.version, data = u.data, lease_owner = u.lease_owner,"
    " lease_until_ms = u.lease_until_ms, due_at_ms = u.due_at_ms"
    " FROM u WHERE entity.entity_id = u.entity_id AND entity.version = u.stored"
)
UPSERT_STOCKS = (
    "INSERT INTO stock (sku_id, total, available, held, sold, version) VALUES {values}"
    " ON CONFLICT (sku_id) DO UPDATE SET total = excluded.total, available = excluded.available,"
    " held = excluded.held, sold = excluded.sold, version = excluded.version"
)


WRITE = {
    "outcomes": INSERT_OUTCOMES,
    "inserted": INSERT_RESERVATIONS,
    "updated": UPDATE_RESERVATIONS,
    "inserted_entities": INSERT_ENTITIES,
    "updated_entities": UPDATE_ENTITIES,
    "stocks": UPSERT_STOCKS,
}


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

    def __init__(self, path: str, batch_max: int = 256) -> None:
        super().__init__(workers=1, batch_max=batch_max)
        self.path = path

    @classmethod
    def from_url(cls, url: str) -> SqliteStore:
        path = url.removeprefix("sqlite://")
        path = path[1:] if path.startswith("/") else path
        if not path:
            raise ValueError(f"store URL {url!r} names no file")
        return cls(path)

    def describe(self) -> str:
        return f"sqlite:///{self.path}"  # the URL that opens this file again

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA journal_mode = WAL")
        db.execute("PRAGMA synchronous = FULL")
        db.execute("PRAGMA busy_timeout = 5000")
        return db

    def _create_schema(self, connection: sqlite3.Connection) -> None:
        connection.executescript(SCHEMA)
        connection.execute("BEGIN IMMEDIATE")
        self._stamp_schema(connection)
        connection.execute("COMMIT")

    # -- a batch, buffered --

    def _load(self, connection: sqlite3.Connection, named: Named) -> Rows:
        """BEGIN, then every named row in one statement (one step per row
        found): the outcomes, the reservations, the entities, and the stock
        of the SKUs named and of the reservations' SKUs, told apart by a
        first column."""
        connection.execute(self.BEGIN)
        rows = Rows()
        if not named:
            return rows
        keys, key_params = _in(named.keys)
        rids, rid_params = _in(named.reservations)
        eids, eid_params = _in(named.entities)
        skus, sku_params = _in(named.skus)
        sql = (
            f"SELECT 'o', key, fingerprint, reason, payload, NULL, NULL, NULL, NULL, NULL FROM outcome WHERE key IN {keys}"
            f" UNION ALL SELECT 'r', {RESERVATION_COLUMNS} FROM reservation WHERE reservation_id IN {rids}"
            f" UNION ALL SELECT 'e', {ENTITY_COLUMNS}, NULL FROM entity WHERE entity_id IN {eids}"
            " UNION ALL SELECT 's', sku_id, total, available, held, sold, version, NULL, NULL, NULL FROM stock"
            f" WHERE sku_id IN {skus} OR sku_id IN (SELECT sku_id FROM reservation WHERE reservation_id IN {rids})"
        )
        found: dict[str, dict[Any, list[Any]]] = {"o": {}, "r": {}, "e": {}, "s": {}}
        params = (*key_params, *rid_params, *eid_params, *sku_params, *rid_params)
        for kind, *row in connection.execute(sql, params):
            found[kind][row[0]] = row
        for key in key_params:
            row = found["o"].get(key)
            rows.loaded_outcome(key, None if row is None else Record(row[1], row[2], row[3]))
        for rid in rid_params:
            row = found["r"].get(rid)
            rows.loaded_reservation(rid, None if row is None else reservation_of_row(tuple(row)))
        for eid in eid_params:
            row = found["e"].get(eid)
            rows.loaded_entity(eid, None if row is None else entity_of_row(row))
        for sku in {*sku_params, *found["s"]}:
            row = found["s"].get(sku)
            rows.loaded_stock(sku, None if row is None else Stock(*row[:6]))
        return rows

    def _write(self, connection: sqlite3.Connection, changes: Changes) -> bool:
        """One multi-row statement per table; False when one affected fewer
        rows than it holds (another process wrote the row after our read)."""
        return all(_wrote(connection, *_many(WRITE[kind], rows)) == len(rows) for kind, rows in changes.row_sets())

    def _is_unavailable(self, error: BaseException) -> bool:
        """The file cannot be used (busy past the timeout, I/O, full, read-only,
        corrupt), as opposed to one move's own failure (a broken CHECK, bad
        SQL), which its savepoint undoes alone."""
        if not isinstance(error, sqlite3.Error):
            return False
        name = getattr(error, "sqlite_errorname", "")
        return name.startswith(_UNAVAILABLE) or not isinstance(error, (sqlite3.IntegrityError, sqlite3.OperationalError))

