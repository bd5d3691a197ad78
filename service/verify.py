"""`holdfast verify`: the books of a running store and snapshot, checked
read-only and in bounded pages; `--repair-snapshot` brings the snapshot
back to the store (the store is the truth).

What is checked, and by whom:

* the framework's checks (here), for every table declared `snapshot=True`
  (the framework's `entity` rows and each hosted app's): no snapshot entry
  ahead of the store's version, nor naming a row the store does not hold
  (`snapshot_ahead`); framework entities (holdfast.framework) resting in
  one of their machine's intents (`intent_stuck`); and the outcome records
  of calls that created an entity whose entity is gone (`outcome_orphaned`);
* each hosted app's own checks, which it names in `Service.verifier`
  (`"MODULE:ATTR"`, a class made with no arguments): `check(books)` reads
  through the `Books` handed to it and reports with `books.found`, and
  `owner(key, reason, payload)` says which of its rows an outcome record
  belongs to, where it can tell. The inventory's are in
  holdfast.apps.inventory_verify.

Outcome records hold no entity id: the key is a sha256 of the method and
the key fields, and the table keeps no method either (its schema is not
changed for this). What can be known without a schema change is what a
record's own bytes prove: an entity id derived from the creating call's key
(`holdfast.derive_id`) is the key's first 12 bytes in hex, so a recorded
success whose reply carries the id derived from its own key is the record
of the call that created that entity, and the entity must exist; an app
that can recompute the keys of its other calls from a reply (inventory's
Confirm and Release) names their owner too. Other records (refusals, and
calls whose key fields are not in the reply) cannot be tied to an entity
and are not checked.

Intents. The rows hold no time of their own write, so an intent's age is
observed: every intent seen is read again once `intent_age_ms` has passed
since it was first seen (the run waits only when it saw one), and one that
has not moved is reported. A move's intent lives inside one store
transaction, under its call's budget; recovery drives on what a crash left
at start-up. The default bound, 10 s, is five times the longest built-in
`timeout_ms` (2 s).

Every read is an ordinary transaction of the store (`Store.transact`), at
most `page` rows each, keyed after the last row of the page before, so a
live store keeps serving; a finding one race could explain (a move
committing between two reads) is read again before it is reported.
Opening the store is what `holdfast serve` does (CREATE TABLE IF NOT
EXISTS: a no-op on a holdfast store); a SQLite file that does not exist is
refused rather than created. Opening the snapshot rebuilds nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
import time
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any, Protocol, TypeVar

from holdfast import metrics
from holdfast.framework import Service, derive_id
from holdfast.redaction import redact_url
from holdfast.snapshot import Snapshot
from holdfast.store import ENTITIES, Store, StoreUnavailable, Txn, tables_of
from holdfast.table import Table

T = TypeVar("T")
K = TypeVar("K")

PAGE_DEFAULT = 500
INTENT_AGE_MS_DEFAULT = 10_000

# The framework's kinds of finding; an app names its own (holdfast.apps.inventory_verify).
SNAPSHOT_AHEAD = "snapshot_ahead"
INTENT_STUCK = "intent_stuck"
OUTCOME_ORPHANED = "outcome_orphaned"


@dataclass(frozen=True, slots=True)
class Finding:
    """One inconsistency: its kind, the row it is about (table and key),
    what the books should hold there and what they do hold."""

    kind: str
    table: str
    key: str
    expected: Any
    found: Any
    message: str = ""

    def line(self) -> str:
        said = f" ({self.message})" if self.message else ""
        return f"{self.kind} {self.table} {self.key}: expected {self.expected}, found {self.found}{said}"


@dataclass(frozen=True, slots=True)
class Recorded:
    """An outcome record as stored: `reason` None is a success."""

    key: bytes
    reason: str | None
    payload: bytes
    recorded_at_ms: int


class Verifier(Protocol):
    """What `Service.verifier` names (both methods optional)."""

    async def check(self, books: Books) -> None: ...
    def owner(self, key: bytes, reason: str | None, payload: bytes) -> tuple[str, str] | None: ...


def sql(txn: Txn, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """A read in SQL (`%s` placeholders), as the SQL stores' Txn offers it to
    tools that inspect the database (holdfast.batch's `_execute`)."""
    execute = getattr(txn, "_execute", None)
    assert execute is not None, "holdfast verify reads SQL stores (sqlite://, postgresql://)"
    return [tuple(row) for row in execute(statement, params).fetchall()]


def marks(count: int) -> str:
    return ", ".join(["%s"] * count)


@dataclass
class Books:
    """What a check reads the store through and reports to."""

    store: Store
    page: int
    intent_age_ms: int
    now_ms: int = field(default_factory=lambda: time.time_ns() // 1_000_000)
    findings: list[Finding] = field(default_factory=list)
    checked: dict[str, int] = field(default_factory=dict)
    # (table, key) -> (version, state name, first seen, monotonic s)
    _intents: dict[tuple[str, str], tuple[Table[Any], int, str, float]] = field(default_factory=dict)

    # A read in SQL inside a transaction of `read` or `pages`: sql(txn, statement, params).
    sql = staticmethod(sql)

    async def read(self, work: Callable[[Txn], T]) -> T:
        """One read-only transaction."""
        return await self.store.transact(work)

    async def pages(self, read: Callable[[Txn, K, int], list[T]], key: Callable[[T], K], first: K) -> AsyncIterator[list[T]]:
        """Rows in key order, `page` at a time, each page one transaction:
        `read(txn, after, limit)` answers the rows whose key is above `after`."""
        after = first
        while rows := await self.store.transact(lambda txn: read(txn, after, self.page)):
            yield rows
            if len(rows) < self.page:
                return
            after = key(rows[-1])

    async def outcomes(self) -> AsyncIterator[list[Recorded]]:
        """Every outcome record, in key order, a page at a time; not the
        tombstones pruned records left (holdfast.retention), which name nothing."""

        def read(txn: Txn, after: bytes, limit: int) -> list[Recorded]:
            rows = sql(txn, "SELECT key, reason, payload, recorded_at_ms FROM outcome WHERE key > %s AND fingerprint <> %s"
                       " ORDER BY key LIMIT %s", (after, b"", limit))
            return [Recorded(bytes(k), reason, bytes(payload), at) for k, reason, payload, at in rows]

        async for page in self.pages(read, lambda r: r.key, b""):
            yield page

    def found(self, kind: str, table: str, key: str, expected: Any, found: Any, message: str = "") -> None:
        self.findings.append(Finding(kind, table, key, expected, found, message))

    def count(self, what: str, n: int) -> None:
        self.checked[what] = self.checked.get(what, 0) + n

    def intent(self, table: Table[Any], key: str, version: int, state: str) -> None:
        """A row seen resting in an intent: reported unless it has moved
        once `intent_age_ms` has passed since it was first seen."""
        self._intents.setdefault((table.name, key), (table, version, state, time.monotonic()))

    async def second_look(self) -> None:
        """Reads every intent seen again, once its bound has passed."""
        if not self._intents:
            return
        latest = max(seen for _, _, _, seen in self._intents.values())
        await asyncio.sleep(max(0.0, latest + self.intent_age_ms / 1000 - time.monotonic()))
        entries = sorted(self._intents.items(), key=lambda item: item[0])
        for start in range(0, len(entries), self.page):
            chunk = entries[start : start + self.page]
            now = await self.store.transact(lambda txn: _versions_of(txn, [(t, k) for (_, k), (t, *_) in chunk]))
            for (name, key), (_, version, state, _) in chunk:
                if now.get((name, key)) == version:
                    self.found(INTENT_STUCK, name, key, f"moved on within {self.intent_age_ms} ms",
                               f"{state} at version {version}", "an intent no move or recovery has driven on")
        self._intents.clear()


def _versions_of(txn: Txn, rows: Sequence[tuple[Table[Any], str]]) -> dict[tuple[str, str], int]:
    """The store's versions of `rows` now (missing: no row)."""
    found: dict[tuple[str, str], int] = {}
    by_table: dict[str, tuple[Table[Any], list[str]]] = {}
    for table, key in rows:
        by_table.setdefault(table.name, (table, []))[1].append(key)
    for name, (table, keys) in by_table.items():
        statement = f"SELECT {table.key_column}, version FROM {name} WHERE {table.key_column} IN ({marks(len(keys))})"
        found.update({(name, k): v for k, v in sql(txn, statement, tuple(keys))})
    return found


# -- the snapshot against the store ------------------------------------------------------


@dataclass
class SnapshotCheck:
    """Snapshot entries ahead of the store: found in pages of the store's
    versions, read again before they are reported; repaired to the store's."""

    books: Books
    snapshot: Snapshot
    tables: tuple[Table[Any], ...]
    repair: bool
    repaired: list[Finding] = field(default_factory=list)

    async def run(self) -> None:
        async for page in self.books.pages(lambda txn, after, limit: txn.versions(after, limit), lambda row: row[0], ""):
            self.books.count("snapshot rows", len(page))
            await self._compare(dict(page))
        await self._orphans()

    async def _compare(self, stored: dict[str, int]) -> None:
        keys = list(stored)
        # Concurrent reads: the Redis snapshot sends them as one MGET (or one pipeline on Cluster).
        held = dict(zip(keys, await asyncio.gather(*(self.snapshot.version(k) for k in keys))))
        ahead = [k for k in keys if (held[k] or 0) > stored[k]]
        if ahead:
            # A move may have committed (and advanced the snapshot) since the
            # page was read: only what is still ahead of the store now is.
            await self._confirm({k: held[k] or 0 for k in ahead})

    async def _confirm(self, held: dict[str, int]) -> None:
        tables = [t for t in self.tables if t.snapshot]
        now = await self.books.read(lambda txn: _versions_of(txn, [(t, k) for t in tables for k in held]))
        for key, version in sorted(held.items()):
            table, stored = next(((t.name, now[(t.name, key)]) for t in tables if (t.name, key) in now), ("-", 0))
            if version <= stored:
                continue
            finding = Finding(SNAPSHOT_AHEAD, table, key, stored, version,
                              "the snapshot's version is ahead of the store's" if stored else
                              "the snapshot holds a version of a row the store does not hold")
            self.books.findings.append(finding)
            if self.repair:
                await self._reset(key, stored)
                self.repaired.append(finding)

    async def _reset(self, key: str, stored: int) -> None:
        """Back to the store's version; a move that committed meanwhile is
        advanced to again (a version only moves forward), so a live service
        is left at most one compensation behind."""
        await self.snapshot.reset(key, stored)
        tables = [t for t in self.tables if t.snapshot]
        now = await self.books.read(lambda txn: _versions_of(txn, [(t, key) for t in tables]))
        latest = max(now.values(), default=0)
        if latest > stored:
            await self.snapshot.advance({key: latest})

    async def _orphans(self) -> None:
        """Entries naming no row of the store: only a snapshot that can list
        its entries (Redis: SCAN, a page at a time) can tell."""
        listed = _entries(self.snapshot, self.books.page)
        if listed is None:
            return
        batch: list[str] = []
        async for key in listed:
            batch.append(key)
            if len(batch) >= self.books.page:
                await self._orphan_page(batch)
                batch = []
        if batch:
            await self._orphan_page(batch)

    async def _orphan_page(self, keys: list[str]) -> None:
        self.books.count("snapshot entries", len(keys))
        tables = [t for t in self.tables if t.snapshot]
        stored = await self.books.read(lambda txn: _versions_of(txn, [(t, k) for t in tables for k in keys]))
        missing = [k for k in keys if not any((t.name, k) in stored for t in tables)]
        if missing:
            held = await asyncio.gather(*(self.snapshot.version(k) for k in missing))
            orphans = {k: v for k, v in zip(missing, held) if v}
            if orphans:
                await self._confirm(orphans)


def _entries(snapshot: Snapshot, page: int) -> AsyncIterator[str] | None:
    """The ids a Redis snapshot holds entries for; None for other snapshots."""
    from holdfast.redis_snapshot import RedisSnapshot, snapshot_key

    if not isinstance(snapshot, RedisSnapshot):
        return None
    prefix, suffix = snapshot_key("\x00").split("\x00")

    async def scan() -> AsyncIterator[str]:
        async for raw in snapshot.client.scan_iter(match=f"{prefix}*", count=page):
            name = raw.decode() if isinstance(raw, bytes) else raw
            if name.startswith(prefix) and name.endswith(suffix):
                yield name[len(prefix) : len(name) - len(suffix)]

    return scan()


# -- framework entities ------------------------------------------------------------------


async def check_entities(books: Books, services: Sequence[type[Service]]) -> None:
    """Framework entities resting in an intent of their machine."""
    for service in services:
        machine = getattr(service, "MACHINE", None)
        if machine is None or not machine.intents:
            continue
        names = {int(s): s.name for s in machine.intents}
        states = tuple(sorted(names))

        def read(txn: Txn, after: str, limit: int, kind: str = machine.name) -> list[tuple[Any, ...]]:
            return sql(txn, f"SELECT entity_id, state, version FROM entity WHERE kind = %s AND state IN ({marks(len(states))})"
                            " AND entity_id > %s ORDER BY entity_id LIMIT %s", (kind, *states, after, limit))

        async for page in books.pages(read, lambda row: row[0], ""):
            for entity_id, state, version in page:
                books.intent(ENTITIES, entity_id, version, names[state])


def framework_owner(service: type[Service]) -> Callable[[bytes, str | None, bytes], tuple[str, str] | None] | None:
    """A framework service deriving its entities' ids from the creating
    call's key: the record whose reply names that id is the creation's."""
    prefix = service.ID_PREFIX
    if not prefix or not getattr(service, "MACHINE", None):
        return None

    def owner(key: bytes, reason: str | None, payload: bytes) -> tuple[str, str] | None:
        entity_id = derive_id(prefix, key)
        return (ENTITIES.name, entity_id) if reason is None and entity_id.encode() in payload else None

    return owner


async def check_outcomes(books: Books, owners: Sequence[Callable[[bytes, str | None, bytes], tuple[str, str] | None]],
                         tables: Sequence[Table[Any]]) -> None:
    """Records whose entity (as an owner can tell) is missing from the store."""
    if not owners:
        return
    by_name = {t.name: t for t in tables}
    async for page in books.outcomes():
        books.count("outcome records", len(page))
        named: list[tuple[str, str, bytes]] = []
        for record in page:
            for owner in owners:
                found = owner(record.key, record.reason, record.payload)
                if found is not None:
                    named.append((*found, record.key))
                    break
        if not named:
            continue
        stored = await books.read(lambda txn: _versions_of(txn, [(by_name[t], k) for t, k, _ in named]))
        for table, entity, key in named:
            if (table, entity) not in stored:
                books.found(OUTCOME_ORPHANED, "outcome", key.hex(), f"{table} {entity}", "no such row",
                            "a recorded success whose entity is gone")


# -- a run ------------------------------------------------------------------------------


@dataclass
class Report:
    store: str
    snapshot: str
    findings: list[Finding]
    repaired: list[Finding]
    checked: dict[str, int]
    notes: list[str]

    def as_json(self) -> dict[str, Any]:
        return {"clean": not self.findings, "store": self.store, "snapshot": self.snapshot, "checked": self.checked,
                "findings": [asdict(f) for f in self.findings], "repaired": [asdict(f) for f in self.repaired],
                "notes": self.notes}


async def verify(store: Store, snapshot: Snapshot, services: Sequence[type[Service]], *, page: int = PAGE_DEFAULT,
                 intent_age_ms: int = INTENT_AGE_MS_DEFAULT, repair_snapshot: bool = False,
                 snapshot_checked: bool = True) -> Report:
    """Every check over an open store and snapshot."""
    assert page > 0 and intent_age_ms >= 0
    books = Books(store, page, intent_age_ms)
    tables = tables_of([t for s in services for t in s.tables])
    notes: list[str] = []
    repaired: list[Finding] = []
    if snapshot_checked:
        check = SnapshotCheck(books, snapshot, tables, repair_snapshot)
        await check.run()
        repaired = check.repaired
    else:
        notes.append(f"{snapshot.describe()} lives inside the server's process: not compared from here")
    await check_entities(books, services)
    owners = [owner for s in services if (owner := framework_owner(s)) is not None]
    for service in services:
        verifier = load_verifier(service)
        if verifier is None:
            continue
        if hasattr(verifier, "owner"):
            owners.append(verifier.owner)
        if hasattr(verifier, "check"):
            await verifier.check(books)
    await check_outcomes(books, owners, tables)
    await books.second_look()
    for finding in books.findings:
        metrics.VERIFY_FINDINGS.labels(finding.kind).inc()
    return Report(store.describe(), snapshot.describe(), books.findings, repaired, books.checked, notes)


def load_verifier(service: type[Service]) -> Verifier | None:
    spec = getattr(service, "verifier", None)
    if not spec:
        return None
    from holdfast.server import load_attribute

    made = load_attribute(spec)
    return made() if isinstance(made, type) else made  # type: ignore[return-value]


# -- the command ------------------------------------------------------------------------


class UsageError(Exception):
    """A flag, a URL or an app that cannot be used (exit 2)."""


def add_arguments(parser: argparse.ArgumentParser, built_in: dict[str, str]) -> None:
    env = os.environ.get
    parser.add_argument("--store", default=env("HOLDFAST_STORE", "sqlite:///./holdfast.db"),
                        help="the store of record, as `holdfast serve --store` takes it")
    parser.add_argument("--snapshot", default=env("HOLDFAST_SNAPSHOT", "memory://"),
                        help="the snapshot, as `holdfast serve --snapshot` takes it (memory:// is not compared)")
    parser.add_argument("--app", action="append", default=[], metavar="MODULE:ATTR", dest="apps",
                        help=f"a hosted service whose tables and checks apply: {', '.join(built_in)} or MODULE:ATTR"
                        f" (repeatable; default: {', '.join(built_in)})")
    parser.add_argument("--page", type=int, default=PAGE_DEFAULT, help=f"rows per read (default {PAGE_DEFAULT})")
    parser.add_argument("--intent-age-ms", type=int, default=INTENT_AGE_MS_DEFAULT,
                        help=f"an intent not moved on after this long is reported (default {INTENT_AGE_MS_DEFAULT})")
    parser.add_argument("--json", action="store_true", help="print the report as one JSON object")
    parser.add_argument("--repair-snapshot", action="store_true",
                        help="reset each snapshot entry found ahead of the store to the store's version")
    parser.add_argument("--metrics-file", default="", metavar="FILE",
                        help="write holdfast_verify_findings_total in Prometheus text format (textfile collector)")


def services_of(apps: Sequence[str], built_in: dict[str, str]) -> list[type[Service]]:
    from holdfast.server import importable_from_here, load_attribute

    specs = [built_in.get(app, app) for app in apps] or list(built_in.values())
    if any(app not in built_in for app in apps):
        importable_from_here()
    found: list[type[Service]] = []
    for spec in specs:
        try:
            made = load_attribute(spec)
        except ValueError as error:
            raise UsageError(str(error)) from None
        if not (isinstance(made, type) and issubclass(made, Service)):
            raise UsageError(f"--app {spec}: holdfast verify needs a holdfast.Service class, to know its tables")
        found.append(made)
    return found


def command(args: argparse.Namespace, built_in: dict[str, str]) -> int:
    """`holdfast verify`: 0 clean, 1 findings, 2 usage or connection error."""
    try:
        if args.page <= 0 or args.intent_age_ms < 0:
            raise UsageError("--page must be positive and --intent-age-ms zero or more")
        services = services_of(args.apps, built_in)
        report = asyncio.run(_run(args, services))
    except UsageError as error:
        print(f"holdfast verify: {error}", file=sys.stderr)
        return 2
    _print(report, args.json)
    if args.metrics_file:
        from prometheus_client import CollectorRegistry, Counter, write_to_textfile

        registry = CollectorRegistry()
        counter = Counter(metrics.VERIFY_FINDINGS._name, metrics.VERIFY_FINDINGS._documentation, ["kind"], registry=registry)
        for finding in report.findings:
            counter.labels(finding.kind).inc()
        write_to_textfile(args.metrics_file, registry)
    return 1 if report.findings else 0


async def _run(args: argparse.Namespace, services: list[type[Service]]) -> Report:
    from holdfast.backends import open_snapshot, open_store
    from holdfast.store import SchemaTooNew

    if args.store.startswith("sqlite://"):
        path = args.store.removeprefix("sqlite://")
        path = path[1:] if path.startswith("/") else path
        if not path or not os.path.exists(path):
            raise UsageError(f"store {args.store}: no such file (verify reads an existing store, it creates none)")
    try:
        store = open_store(args.store, tables=[t for s in services for t in s.tables])
        snapshot = open_snapshot(args.snapshot)
    except ValueError as error:
        raise UsageError(str(error)) from None
    try:
        await store.open()
    except (StoreUnavailable, SchemaTooNew, OSError) as error:
        raise UsageError(f"cannot open the store {redact_url(args.store)}: {error}") from None
    try:
        await snapshot.open(_rebuilds_nothing)
        try:
            if getattr(snapshot, "degraded", False):
                raise UsageError(f"the snapshot {snapshot.describe()} does not answer")
            in_process = args.snapshot in ("memory://", "memory:")
            return await verify(store, snapshot, services, page=args.page, intent_age_ms=args.intent_age_ms,
                                repair_snapshot=args.repair_snapshot, snapshot_checked=not in_process)
        finally:
            await snapshot.close()
    except StoreUnavailable as error:
        raise UsageError(f"the store failed: {error}") from None
    finally:
        await store.close()


async def _rebuilds_nothing() -> AsyncIterator[dict[str, int]]:
    """What the snapshot is opened with: verify writes nothing to it unasked."""
    nothing: tuple[dict[str, int], ...] = ()
    for page in nothing:
        yield page


def _print(report: Report, as_json: bool) -> None:
    if as_json:
        print(json.dumps(report.as_json(), sort_keys=True, default=str))
        return
    for finding in report.findings:
        print(finding.line())
    for finding in report.repaired:
        print(f"repaired {finding.table} {finding.key}: snapshot reset from version {finding.found} to the store's {finding.expected}")
    for note in report.notes:
        print(f"note: {note}")
    checked = ", ".join(f"{n} {what}" for what, n in sorted(report.checked.items())) or "nothing"
    verdict = f"{len(report.findings)} finding(s)" if report.findings else "clean"
    print(f"holdfast verify {report.store} {report.snapshot}: {verdict} ({checked} checked)")
