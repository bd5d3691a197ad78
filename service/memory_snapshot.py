"""The embedded snapshot (`memory://`): a map in this process, for one instance.

It lives and dies with the process, so after a restart it knows nothing,
which the engine reads as unknown, never as stale (holdfast.snapshot).
"""

from __future__ import annotations

from collections.abc import Collection, Mapping

from holdfast.snapshot import VersionPages


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

    async def forget(self, entities: Collection[str]) -> None:
        for entity in entities:
            self._versions.pop(entity, None)

    async def close(self) -> None:
        self._versions.clear()
