"""Call journals, read back: what `holdfast serve --journal FILE` wrote
(holdfast.recorder, the server's half) as `holdfast replay`
(service/replay.py) feeds it to a fresh instance to check that the same
calls give the same bytes back. Four kinds of line, each one JSON object
with a `kind`:

* `start`  — written when a server starts: the format version and what the
  replaying instance must host the same way: the apps (`MODULE:ATTR`) and
  the settings they were made with (a hold's `expires_at_ms` depends on the
  default hold, a dispatch's answer on the simulated carrier's settings).
* `call`   — one gRPC call: method, request bytes, the metadata that reaches
  the servicer, the client's deadline, the business time the engine used,
  and the answer: status code, reply bytes or `grpc-status-details-bin`
  bytes, message, and the `holdfast-replayed` / `holdfast-context-id`
  trailers.
* `timeout` — one move made by time (`Service.timeout`: a hold's expiry, a
  framework entity's timeout event), with its service, entity, version and
  time. The reaper runs on its own timer, so a replay cannot re-derive when
  it fired; it is journaled like a call and replayed at its place in the
  sequence instead.
* `prune` — one retention round that pruned something (holdfast.retention):
  its time and how many rows, records and tombstones it pruned; replayed at
  its place with the recording's retention (from the start line).

Journals of format 1 named no apps (the built-in ones were hosted) and
wrote an app's timed moves under a kind of its own; the app that wrote
them says how to read them (`Service.legacy_timeouts`), so this reader
names no app.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from holdfast.framework import Service
from holdfast.recorder import FORMAT, decode, encode

__all__ = ["FORMAT", "REQUIRED", "Entry", "JournalError", "decode", "encode", "legacy_kinds", "read_journal",
           "read_legacy"]

# The fields each kind of line this format writes must have.
REQUIRED = {
    "call": ("method", "time_ms", "request", "code"),
    "timeout": ("service", "entity_id", "version", "time_ms"),
    "prune": ("time_ms", "rows", "records", "tombstones"),
}


@dataclass(frozen=True, slots=True)
class Entry:
    line: int
    record: dict[str, Any]


class JournalError(ValueError):
    """The journal cannot be read as one."""


def read_journal(path: str | Path) -> tuple[dict[str, Any], list[Entry]]:
    """The first start line (what was hosted) and every other line in order:
    call and timeout lines checked for their fields, lines of another kind
    kept as they are for `read_legacy` (only the hosted apps know whether
    an older format's kind is theirs). Refuses a journal that holds no call."""
    start: dict[str, Any] = {}
    entries: list[Entry] = []
    for number, record in _lines(Path(path)):
        kind = record.get("kind")
        if kind == "start":
            start = start or record
            continue
        if kind in REQUIRED:
            _require(path, number, record, REQUIRED[kind])
        entries.append(Entry(number, record))
    if not any(entry.record["kind"] == "call" for entry in entries):
        raise JournalError(f"{path} holds no calls: nothing to replay, so nothing was compared")
    return start, entries


def legacy_kinds(services: Iterable[type[Service]]) -> dict[str, tuple[str, str]]:
    """Each older-format kind of line the services wrote their timed moves
    under, as (the service's full name, the field naming the entity)."""
    return {
        kind: (service.DESCRIPTOR.full_name, field)
        for service in services
        for kind, field in service.legacy_timeouts.items()
    }


def read_legacy(path: str | Path, entries: list[Entry], kinds: Mapping[str, tuple[str, str]]) -> list[Entry]:
    """`entries` with each line of an older format's kind (`legacy_kinds`)
    as the `timeout` line it means; such a line carried no version unless
    it says one (0: whichever the entity has). A kind neither this format
    nor any hosted service knows is refused."""
    read = []
    for entry in entries:
        kind = entry.record.get("kind")
        if kind in REQUIRED:
            read.append(entry)
            continue
        if kind not in kinds:
            raise JournalError(f"{path}:{entry.line}: unknown line kind {kind!r}")
        service, field = kinds[kind]
        _require(path, entry.line, entry.record, (field, "time_ms"))
        timeout = {**entry.record, "kind": "timeout", "service": service, "entity_id": entry.record[field],
                   "version": entry.record.get("version", 0)}
        read.append(Entry(entry.line, timeout))
    return read


def _require(path: str | Path, number: int, record: Mapping[str, Any], fields: Iterable[str]) -> None:
    missing = [name for name in fields if name not in record]
    if missing:
        raise JournalError(f"{path}:{number}: a {record.get('kind')} line without {', '.join(missing)}")


def _lines(path: Path) -> Iterator[tuple[int, dict[str, Any]]]:
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise JournalError(f"cannot read journal {path}: {error.strerror or error}") from None
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            # A crash can cut the last line short; anything else is corruption.
            if number == len(text.splitlines()) and not text.endswith("\n"):
                return
            raise JournalError(f"{path}:{number}: not JSON: {error}") from None
        if not isinstance(record, dict):
            raise JournalError(f"{path}:{number}: expected a JSON object")
        yield number, record
