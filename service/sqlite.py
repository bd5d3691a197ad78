"""The embedded store of record: SQLite in WAL mode.

`synchronous=FULL`: a reply is sent only after its transaction is durable,
so a crash never loses an acknowledged move. One worker thread: SQLite has a
single writer, and group commit already amortises each fsync over the batch.
"""

from __future__ import annotations

import sqlite3
from typing import ClassVar

from service.store import GroupCommitStore, SqlTxn

SCHEMA = """
CREATE TABLE IF NOT EXISTS stock (
    sku_id TEXT PRIMARY KEY,
    total INTEGER NOT NULL CHECK (total >= 0),
    available INTEGER NOT NULL CHECK (available >= 0),
    held INTEGER NOT NULL CHECK (held >= 0),
    sold INTEGER NOT NULL CHECK (sold >= 0),
    version INTEGER NOT NULL,
    CHECK (available + held + sold = total)
);
CREATE TABLE IF NOT EXISTS reservation (
    reservation_id TEXT PRIMARY KEY,
    order_id TEXT NOT NULL,
    sku_id TEXT NOT NULL,
    quantity INTEGER NOT NULL CHECK (quantity > 0),
    state INTEGER NOT NULL,
    version INTEGER NOT NULL,
    expires_at_ms INTEGER NOT NULL,
    retry_count INTEGER NOT NULL DEFAULT 0,
    release_reason TEXT NOT NULL DEFAULT ''
);
CREATE INDEX IF NOT EXISTS reservation_due ON reservation (state, expires_at_ms);
CREATE TABLE IF NOT EXISTS outcome (
    key BLOB PRIMARY KEY,
    fingerprint BLOB NOT NULL,
    reason TEXT,
    payload BLOB NOT NULL,
    recorded_at_ms INTEGER NOT NULL
);
"""


class SqliteTxn(SqlTxn):
    PLACEHOLDER = "?"


class SqliteStore(GroupCommitStore):
    TXN = SqliteTxn
    BEGIN: ClassVar[str] = "BEGIN IMMEDIATE"

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

    def _is_unavailable(self, error: BaseException) -> bool:
        return isinstance(error, sqlite3.Error)
