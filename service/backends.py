"""Which backend serves a URL: the store of record and the snapshot a server
opens (`holdfast serve --store URL --snapshot URL`, `holdfast doctor`).

The interfaces are core (holdfast.store, holdfast.snapshot); the classes
behind them are backends, each imported only when its URL is asked for, so
opening SQLite loads no PostgreSQL driver and `memory://` loads no Redis
client.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from holdfast.redaction import redact_url
from holdfast.snapshot import Snapshot
from holdfast.store import Store
from holdfast.table import Table

SNAPSHOT_URLS = "expected memory://, redis://HOST:PORT[/DB] or redis+cluster://HOST:PORT"


def open_store(url: str, pool_size: int = 1, tables: Sequence[Table[Any]] = ()) -> Store:
    """A store for `url`: `sqlite:///relative.db`, `sqlite:////absolute.db`,
    or `postgresql://user@host:port/database` with `pool_size` connections;
    with the framework's tables and `tables` (the hosted apps')."""
    if url.startswith("sqlite://"):
        from holdfast.sqlite import SqliteStore

        return SqliteStore.from_url(url, tables=tables)
    if url.startswith(("postgresql://", "postgres://")):
        from holdfast.postgres import PostgresStore

        return PostgresStore(url, workers=pool_size, tables=tables)
    raise ValueError(f"unsupported store URL {redact_url(url)!r} (expected sqlite:///PATH or postgresql://...)")


def open_snapshot(url: str) -> Snapshot:
    """A snapshot for `url`: `memory://`, `redis://HOST:PORT[/DB]` or
    `redis+cluster://HOST:PORT` (any node of the cluster). Connects nothing
    yet: `open()` does. Socket options may ride in the query string
    (`?socket_timeout=0.5`)."""
    if url in ("memory://", "memory:"):
        from holdfast.memory_snapshot import MemorySnapshot

        return MemorySnapshot()
    from holdfast.redis_snapshot import RedisSnapshot

    return RedisSnapshot.from_url(url, expected=SNAPSHOT_URLS)
