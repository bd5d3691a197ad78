"""The snapshot: each reservation's last known version, read before a move
and compared with the store's inside the move's transaction.

The store is the truth. The snapshot is what another instance (or this one,
a moment ago) last saw; when the two disagree, a move raced on the same
reservation or the snapshot is stale, and the engine compensates instead of
writing blindly. A missing entry is not a disagreement: the store's
compare-and-set alone guards that move.
"""

from __future__ import annotations

from typing import AsyncIterator, Callable, Mapping, Protocol

# The store's versions, page by page (service.store.version_pages): the truth a
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

    async def close(self) -> None: ...

    def describe(self) -> str: ...


class MemorySnapshot:
    """The embedded snapshot: a map in this process, good for one instance."""

    def __init__(self) -> None:
        self._versions: dict[str, int] = {}

    def describe(self) -> str:
        return "memory://"

    async def open(self, rebuild_from: VersionPages) -> None:
        """Nothing to connect to; it lives and dies with the process, so an
        empty map after a restart is unknown, not stale."""

    async def version(self, entity: str) -> int | None:
        return self._versions.get(entity)

    async def advance(self, versions: Mapping[str, int]) -> None:
        for entity, version in versions.items():
            assert version > 0
            if version > self._versions.get(entity, 0):
                self._versions[entity] = version

    async def reset(self, entity: str, version: int) -> None:
        self._versions[entity] = version

    async def close(self) -> None:
        self._versions.clear()


def open_snapshot(url: str) -> Snapshot:
    if url in ("memory://", "memory:"):
        return MemorySnapshot()
    raise ValueError(f"unsupported snapshot URL {url!r} (expected memory://)")
