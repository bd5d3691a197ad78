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

from service.store import GroupCommitStore, Reservation, SqlTxn, Stock, schema

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

    def _after_failure(self, connection: Any, error: BaseException) -> Any:
        if connection is not None and connection.closed:
            return None
        return super()._after_failure(connection, error)
