"""The snapshot: each entity's last known version, read before a move and
compared with the store's inside the move's transaction.

The store is the truth. The snapshot is what another instance (or this one,
a moment ago) last saw; when the two disagree, a move raced on the same
entity or the snapshot is stale, and the engine compensates instead of
writing blindly. A missing entry is not a disagreement: the store's
compare-and-set alone guards that move.

This module is the interface the engine (core) reads. Its backends pass one
contract suite (tests/test_snapshot.py), and `holdfast.backends.open_snapshot`
picks one by URL:

* `holdfast.memory_snapshot.MemorySnapshot` (`memory://`): a map in this
  process, for one instance.
* `holdfast.redis_snapshot.RedisSnapshot` (`redis://HOST:PORT[/DB]`,
  `redis+cluster://HOST:PORT`): shared by every instance.

A snapshot is advisory: no failure of its own fails a move. It answers None
(unknown) when it cannot tell, and drops a write it cannot make.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Collection, Mapping
from typing import Protocol

# The store's versions, page by page (holdfast.store.version_pages): the truth a
# snapshot rebuilds itself from when it comes back after losing writes.
VersionPages = Callable[[], AsyncIterator[Mapping[str, int]]]


class Snapshot(Protocol):
    async def open(self, rebuild_from: VersionPages) -> None:
        """Connects; keeps `rebuild_from` for catching up after an outage."""

    async def version(self, entity: str) -> int | None:
        """One round trip before the move; None when the entry is unknown."""

    async def advance(self, versions: Mapping[str, int]) -> None:
        """One round trip after the commit; a version only moves forward."""

    async def reset(self, entity: str, version: int) -> None:
        """Compensation: overwrite the entry with the store's version."""

    async def forget(self, entities: Collection[str]) -> None:
        """Drops the entries of entities the store pruned (holdfast.retention),
        so the snapshot stays as small as what the store holds; an entry
        left behind by an outage is harmless (the engine does not check a
        row the store does not hold)."""

    async def close(self) -> None: ...

    def describe(self) -> str: ...
