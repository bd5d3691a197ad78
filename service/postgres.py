"""The store of record at scale: PostgreSQL, through psycopg 3.

Moves keep the embedded store's shape: group commit on worker threads, one
connection each (the pool, sized by `--store-pool`). psycopg 3's blocking
calls on a dedicated thread were measured against asyncpg and psycopg's async
mode on this very transaction: batched on one writer, half the Python CPU per
move and the highest moves/s; a second writer buys nothing on a hot SKU,
whose row lock one batch holds at a time.
Instances share the database, so reads inside a move lock their row
(`FOR UPDATE`) and a lost compare-and-set reruns the move on the winner's
state; a deadlock between two batches reruns the losing batch.
"""

from __future__ import annotations

from typing import Any

import psycopg
from psycopg import errors

from service.batch import Changes, Rows, run_move
from service.store import (
    RESERVATION_COLUMNS, BudgetSpent, GroupCommitStore, Isolate, Job, JobResult, Record, Reservation, SqlTxn, Stock,
    reservation_of_row, schema,
)

SCHEMA = schema(integer="BIGINT", blob="BYTEA")
# Instances starting together must not race on CREATE TABLE.
SCHEMA_LOCK = "SELECT pg_advisory_xact_lock(hashtext('holdfast.schema'))"


class PostgresTxn(SqlTxn):
    LOCK = " FOR UPDATE"

    # PostgreSQL text cannot hold NUL, so no stored id contains one: an id that
    # does is simply not found (validation keeps NUL out of every write).
    def stock(self, sku_id: str) -> Stock | None:
        return None if "\x00" in sku_id else super().stock(sku_id)

    def reservation(self, reservation_id: str) -> Reservation | None:
        return None if "\x00" in reservation_id else super().reservation(reservation_id)


# -- a batch as set-based statements (service.batch) ----------------------------

PREFETCH_OUTCOMES = "SELECT key, fingerprint, reason, payload FROM outcome WHERE key = ANY(%s::bytea[])"
PREFETCH_RESERVATIONS = (
    f"SELECT {RESERVATION_COLUMNS} FROM reservation WHERE reservation_id = ANY(%s::text[])"
    " ORDER BY reservation_id FOR UPDATE"
)
# The SKUs named, and those of the reservations named (a Confirm knows only
# its reservation): the stock a move settles is locked with the rest.
PREFETCH_STOCK = (
    "SELECT sku_id, total, available, held, sold, version FROM stock WHERE sku_id = ANY(%s::text[])"
    " OR sku_id IN (SELECT sku_id FROM reservation WHERE reservation_id = ANY(%s::text[]))"
    " ORDER BY sku_id FOR UPDATE"
)
FLUSH_OUTCOMES = (
    "INSERT INTO outcome (key, fingerprint, reason, payload, recorded_at_ms)"
    " SELECT * FROM unnest(%s::bytea[], %s::bytea[], %s::text[], %s::bytea[], %s::bigint[])"
    " ON CONFLICT (key) DO NOTHING"
)
_RESERVATION_ARRAYS = "%s::text[], %s::text[], %s::text[], %s::bigint[], %s::int[], %s::bigint[], %s::bigint[], %s::int[], %s::text[]"
FLUSH_INSERTED = (
    f"INSERT INTO reservation ({RESERVATION_COLUMNS}) SELECT * FROM unnest({_RESERVATION_ARRAYS})"
    " ON CONFLICT (reservation_id) DO NOTHING"
)
FLUSH_UPDATED = (
    "UPDATE reservation AS r SET order_id = u.order_id, sku_id = u.sku_id, quantity = u.quantity, state = u.state,"
    " version = u.version, expires_at_ms = u.expires_at_ms, retry_count = u.retry_count,"
    " release_reason = u.release_reason"
    f" FROM unnest({_RESERVATION_ARRAYS}, %s::bigint[]) AS u({RESERVATION_COLUMNS}, stored)"
    " WHERE r.reservation_id = u.reservation_id AND r.version = u.stored"
)
FLUSH_STOCK = (
    "INSERT INTO stock (sku_id, total, available, held, sold, version)"
    " SELECT * FROM unnest(%s::text[], %s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[], %s::bigint[])"
    " ON CONFLICT (sku_id) DO UPDATE SET total = excluded.total, available = excluded.available,"
    " held = excluded.held, sold = excluded.sold, version = excluded.version"
)


def _columns(rows: list[tuple]) -> tuple[list, ...]:
    """Rows to one array per column, as unnest() takes them back."""
    return tuple(map(list, zip(*rows)))


def _reservation_row(r: Reservation) -> tuple:
    return (r.reservation_id, r.order_id, r.sku_id, r.quantity, int(r.state), r.version, r.expires_at_ms,
            r.retry_count, r.release_reason)


def _ids(names: set[str]) -> list[str]:
    # PostgreSQL text cannot hold NUL: such an id names no row (PostgresTxn).
    return sorted(name for name in names if "\x00" not in name)


class PostgresStore(GroupCommitStore):
    TXN = PostgresTxn

    # A batch rerun with a savepoint per move holds one subtransaction per
    # move; PostgreSQL caches 64 per backend before every snapshot slows down.
    def __init__(self, url: str, workers: int = 1, batch_max: int = 64, connect_timeout_s: int = 2) -> None:
        super().__init__(workers=workers, batch_max=batch_max)
        self.url = url
        self._connect_timeout_s = connect_timeout_s

    def describe(self) -> str:
        info = psycopg.conninfo.conninfo_to_dict(self.url)
        info.pop("password", None)
        host, port, name = info.get("host", "localhost"), info.get("port", "5432"), info.get("dbname", "")
        return f"postgresql://{info.get('user', '')}@{host}:{port}/{name}".replace("//@", "//")

    def _connect(self) -> psycopg.Connection:
        # A statement that waits this long is a stuck dependency, not a slow
        # move; a server that went silent is noticed by TCP, not waited on.
        return psycopg.connect(
            self.url,
            autocommit=True,
            connect_timeout=self._connect_timeout_s,
            options="-c statement_timeout=10000 -c idle_in_transaction_session_timeout=30000",
            keepalives=1,
            keepalives_idle=5,
            keepalives_interval=2,
            keepalives_count=3,
            tcp_user_timeout=10000,
        )

    def _create_schema(self, connection: psycopg.Connection) -> None:
        with connection.transaction():
            connection.execute(SCHEMA_LOCK)
            connection.execute(SCHEMA)
            self._stamp_schema(connection)

    def _is_unavailable(self, error: BaseException) -> bool:
        return isinstance(error, (psycopg.OperationalError, psycopg.InterfaceError)) and not self._is_retryable(error)

    def _is_retryable(self, error: BaseException) -> bool:
        return isinstance(error, (errors.DeadlockDetected, errors.SerializationFailure))

    # -- a batch, buffered: prefetch, moves in memory, flush, commit --

    def _fast(self, connection: psycopg.Connection, batch: list[Job]) -> list[JobResult]:
        rows = self._prefetch(connection, batch)
        db = self.TXN(connection.cursor())

        def flush(changes: Changes) -> bool:
            return self._flush(connection, changes)

        results: list[JobResult] = []
        for job in batch:
            if not self._claim(job):
                results.append((job.future, None, BudgetSpent()))
                continue
            value, error = run_move(
                rows, db, flush, job.work, self.CONTENDED_RERUNS,
                fails_batch=lambda e: self._is_unavailable(e) or self._is_retryable(e),
                aborts_transaction=lambda e: isinstance(e, psycopg.Error),
            )
            results.append((job.future, value, error))
        changes = rows.changes()
        try:
            flushed = not changes or self._flush(connection, changes)
        except psycopg.Error as error:
            if self._is_unavailable(error) or self._is_retryable(error):
                raise
            raise Isolate() from error  # a CHECK a move broke: the savepoint path finds which
        if not flushed:
            raise Isolate()
        connection.execute("COMMIT")
        return results

    def _prefetch(self, connection: psycopg.Connection, batch: list[Job]) -> Rows:
        """BEGIN and one SELECT per table, in one round trip."""
        keys: set[bytes] = set()
        rids: set[str] = set()
        skus: set[str] = set()
        for job in batch:
            if job.prefetch is not None:
                keys.update(job.prefetch.keys)
                rids.update(job.prefetch.reservations)
                skus.update(job.prefetch.skus)
        rows = Rows()
        if not (keys or rids or skus):
            connection.execute("BEGIN")
            return rows
        rid_list, sku_list = _ids(rids), _ids(skus)
        with connection.pipeline():
            connection.execute("BEGIN")
            outcomes = connection.execute(PREFETCH_OUTCOMES, (sorted(keys),))
            reservations = connection.execute(PREFETCH_RESERVATIONS, (rid_list,))
            stocks = connection.execute(PREFETCH_STOCK, (sku_list, rid_list))
        found_outcomes = {bytes(k): Record(bytes(f), reason, bytes(p)) for k, f, reason, p in outcomes.fetchall()}
        for key in keys:
            rows.loaded_outcome(key, found_outcomes.get(key))
        found_reservations = {row[0]: reservation_of_row(row) for row in reservations.fetchall()}
        for rid in rids:
            if "\x00" not in rid:
                rows.loaded_reservation(rid, found_reservations.get(rid))
        for row in stocks.fetchall():
            rows.loaded_stock(row[0], Stock(*row))
        for sku in sku_list:
            if sku not in rows.stocks:
                rows.loaded_stock(sku, None)
        return rows

    def _flush(self, connection: psycopg.Connection, changes: Changes) -> bool:
        """One multi-row statement per table, in one round trip. False when
        one of them affected fewer rows than it holds: another writer got
        there first, and the batch must run again on the savepoint path."""
        statements: list[tuple[str, tuple, int]] = []
        if changes.outcomes:
            rows = [(key, r.fingerprint, r.reason, r.payload, now_ms) for key, r, now_ms in changes.outcomes]
            statements.append((FLUSH_OUTCOMES, _columns(rows), len(rows)))
        if changes.inserted:
            statements.append((FLUSH_INSERTED, _columns([_reservation_row(r) for r in changes.inserted]), len(changes.inserted)))
        if changes.updated:
            rows = [(*_reservation_row(r), stored) for r, stored in changes.updated]
            statements.append((FLUSH_UPDATED, _columns(rows), len(rows)))
        if changes.stocks:
            for stock in changes.stocks:
                stock.check()
            rows = [(s.sku_id, s.total, s.available, s.held, s.sold, s.version) for s in changes.stocks]
            statements.append((FLUSH_STOCK, _columns(rows), len(rows)))
        with connection.pipeline():
            cursors = [(connection.execute(sql, params), expected) for sql, params, expected in statements]
        return all(cursor.rowcount == expected for cursor, expected in cursors)

    def _after_failure(self, connection: Any, error: BaseException) -> Any:
        if connection is not None and connection.closed:
            return None
        return super()._after_failure(connection, error)
