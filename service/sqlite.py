"""The embedded store of record: SQLite in WAL mode.

`synchronous=FULL`: a reply is sent only after its transaction is durable,
so a crash never loses an acknowledged move. One worker thread: SQLite has a
single writer, and group commit already amortises each fsync over the batch.
"""

from __future__ import annotations

import sqlite3
from typing import ClassVar

from service.store import GroupCommitStore, SqlTxn, schema

SCHEMA = schema(integer="INTEGER", blob="BLOB")


# SQLite's primary result codes that mean the database, not the move, failed.
_UNAVAILABLE = ("SQLITE_BUSY", "SQLITE_LOCKED", "SQLITE_IOERR", "SQLITE_FULL", "SQLITE_CANTOPEN", "SQLITE_CORRUPT",
                "SQLITE_NOTADB", "SQLITE_READONLY", "SQLITE_PROTOCOL", "SQLITE_NOMEM", "SQLITE_PERM")


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
        connection.execute("BEGIN IMMEDIATE")
        self._stamp_schema(connection)
        connection.execute("COMMIT")

    def _is_unavailable(self, error: BaseException) -> bool:
        """The file cannot be used (busy past the timeout, I/O, full, read-only,
        corrupt), as opposed to one move's own failure (a broken CHECK, bad
        SQL), which its savepoint undoes alone."""
        if not isinstance(error, sqlite3.Error):
            return False
        name = getattr(error, "sqlite_errorname", "")
        return name.startswith(_UNAVAILABLE) or not isinstance(error, (sqlite3.IntegrityError, sqlite3.OperationalError))
