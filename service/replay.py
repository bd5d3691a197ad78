"""`holdfast replay FILE [--target HOST:PORT]`: replays a journal and compares
every answer byte for byte.

By default the journal is replayed against a fresh embedded instance (a
SQLite store in a temporary folder, the in-process snapshot) whose engine
clock is a `ReplayClock`, set to each line's recorded time before the line
is sent. Lines run one at a time, in journal order.

The fresh instance hosts what the journal's start line says the recording
hosted: the apps given as `MODULE:ATTR` (imported from the current folder,
as `holdfast serve --app` does), or the apps given with `--app` instead. A
journal of format 1 names none: it was recorded hosting holdfast's
built-in apps, which `holdfast replay` (the CLI, which knows them) hands
down as `default_apps`. A journal whose services the replaying instance
does not host is refused, naming them, before anything is sent.

Time's moves: the replaying instance runs with its reaper stopped, and each
journaled `timeout` line (a move the recording's reaper made: a hold's
expiry, an entity's timeout event) is made again as the same move of the
same service, at its recorded time and at its place in the sequence. So the
reaper can never race the replay, and time moves exactly where it did.

With `--target` the journal goes to a running instance: its clock cannot be
set and its reaper cannot be stopped, so recorded times are not injected and
`timeout` lines are skipped (the summary says so). Answers that depend on
time may then differ.

A journal with no call in it proves nothing: replay refuses it (exit 2)
rather than report it identical.

Compared for each call: status code, reply bytes, `grpc-status-details-bin`
bytes, `holdfast-replayed` and `holdfast-context-id`; for each expiry, its
outcome. Exit 0 only when everything is identical, 1 on a difference, 2 on a
usage or I/O error.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Sequence, TextIO

from holdfast.framework import Service
from holdfast.journal import REQUIRED, Entry, JournalError, decode, legacy_kinds, read_journal, read_legacy
from holdfast.outcome import reason_key

if TYPE_CHECKING:
    from holdfast.server import ServiceFactory

# The reader is holdfast.journal's; its names are replay's too, as they always were.
__all__ = ["DEFAULT_TIMEOUT_S", "Difference", "Entry", "JournalError", "ReplayClock", "Report", "main", "read_journal",
           "replay", "replay_async"]

REPLAY_STOP_GRACE_S = 1.0
DEFAULT_TIMEOUT_S = 60.0  # above every contract's timeout: the server's budget is what it was


class ReplayClock:
    """The replaying engine's clock: it says whatever time the journal says."""

    def __init__(self, now_ms: int = 0) -> None:
        self._now_ms = now_ms

    def now_ms(self) -> int:
        return self._now_ms

    def set(self, now_ms: int) -> None:
        self._now_ms = now_ms


@dataclass(frozen=True, slots=True)
class Difference:
    """One line whose answer came back otherwise than recorded."""

    line: int
    method: str
    recorded: dict
    replayed: dict

    def describe(self) -> str:
        fields = [name for name in self.recorded if self.recorded.get(name) != self.replayed.get(name)]
        verb = "differs" if len(fields) == 1 else "differ"
        rows = [f"line {self.line}: {self.method}: {', '.join(fields)} {verb}"]
        for name in fields:
            rows.append(f"    {name}: recorded {_shown(self.recorded.get(name))}")
            rows.append(f"    {' ' * len(name)}  replayed {_shown(self.replayed.get(name))}")
        return "\n".join(rows)


@dataclass(slots=True)
class Report:
    """What a replay found; `identical` is the verdict."""

    path: str
    target: str | None
    calls: int = 0
    timeouts: int = 0
    skipped_timeouts: int = 0
    prunes: int = 0
    skipped_prunes: int = 0
    unanswered: int = 0
    differences: list[Difference] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not self.differences

    def summary(self) -> str:
        where = f"running instance {self.target}" if self.target else "a fresh embedded instance"
        lines = [
            f"replayed {self.calls} calls and {self.timeouts} timeouts from {self.path} against {where}:"
            f" {'identical' if self.identical else f'{len(self.differences)} differ'}"
        ]
        if self.target:
            lines.append("note: recorded times were not injected (a running instance keeps its own clock)")
        if self.unanswered:
            lines.append(f"note: {self.unanswered} calls were cancelled before they answered; sent, not compared")
        if self.skipped_timeouts:
            lines.append(f"note: {self.skipped_timeouts} journaled timeouts were left to the target's own reaper")
        if self.prunes:
            lines.append(f"note: {self.prunes} retention rounds were made again at their recorded times")
        if self.skipped_prunes:
            lines.append(f"note: {self.skipped_prunes} journaled retention rounds were left to the target's own")
        return "\n".join(lines)


# -- replaying ------------------------------------------------------------------------


def replay(
    path: str | Path, target: str | None = None, progress: TextIO | None = None,
    apps: Sequence[str] | None = None, services: Sequence[ServiceFactory] = (), default_apps: Sequence[str] = (),
) -> Report:
    """Replays a journal and reports every difference. `apps` (MODULE:ATTR)
    replace the apps the journal names; `services` are factories to host
    beside them (what the pytest plugin's `holdfast_services` gave the
    recording); `default_apps` are what a journal that names no apps
    (format 1) was recorded hosting. Callable from a thread that runs an
    event loop too (a test's): the replay then runs on its own thread and
    loop, which this call waits for."""
    replaying = functools.partial(replay_async, path, target, progress, apps, services, default_apps)
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(replaying())
    result: list = []

    def run() -> None:
        try:
            result.append(asyncio.run(replaying()))
        except BaseException as error:  # handed to the caller's thread
            result.append(error)

    thread = threading.Thread(target=run, name="holdfast-replay")
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


async def replay_async(
    path: str | Path, target: str | None = None, progress: TextIO | None = None,
    apps: Sequence[str] | None = None, services: Sequence[ServiceFactory] = (), default_apps: Sequence[str] = (),
) -> Report:
    """The replay itself; see the module docstring."""
    start, entries = read_journal(path)
    report = Report(str(path), target)
    hosted = _apps_to_host(start, apps, default_apps)
    if target is not None:
        entries = read_legacy(path, entries, legacy_kinds(_named_services(entries, hosted, services)))
        await _replay_entries(entries, report, target, None, progress)
        return report
    with tempfile.TemporaryDirectory(prefix="holdfast-replay-") as folder:
        running, clock = await _fresh_instance(start, Path(folder), hosted, services)
        try:
            entries = read_legacy(path, entries, legacy_kinds(type(s) for s in running.services.values()))
            await _replay_entries(entries, report, f"127.0.0.1:{running.port}", (running, clock), progress)
        finally:
            # A graceful stop: its GOAWAY says NO_ERROR. Without a grace
            # (error 2, "Cancelling all calls"), gRPC's C core may print an
            # INFO line to stderr when the replay's channel, closed a moment
            # before, still hears it. Every call has answered, so nothing waits.
            await running.stop(REPLAY_STOP_GRACE_S)
    return report


def _apps_to_host(start: dict, apps: Sequence[str] | None, default_apps: Sequence[str]) -> tuple[str, ...]:
    """`--app`'s apps when given, else the start line's; a start line of
    format 1 names none, and was recorded hosting `default_apps`."""
    if apps is not None:
        return tuple(apps)
    return tuple(start["apps"]) if "apps" in start else tuple(default_apps)


def _named_services(entries: list[Entry], apps: Sequence[str], services: Sequence[ServiceFactory]) -> list[type[Service]]:
    """The Service classes the journal's apps name (and those of `services`
    that are classes), for reading an older format's lines against a
    running instance, where nothing is hosted here; loaded only when the
    journal has such lines."""
    if all(entry.record.get("kind") in REQUIRED for entry in entries):
        return []
    from holdfast.server import load_attribute

    found = []
    for candidate in [*apps, *services]:
        try:
            loaded = load_attribute(candidate) if isinstance(candidate, str) else candidate
        except ValueError as error:
            raise JournalError(f"cannot read the journal's lines of an older format: {error}") from None
        if isinstance(loaded, type) and issubclass(loaded, Service):
            found.append(loaded)
    return found


async def _fresh_instance(start: dict, folder: Path, apps: tuple[str, ...], services: Sequence[ServiceFactory]):
    """An embedded instance hosting `apps` and `services` with the
    recording's settings, a settable clock and its reaper stopped (the
    journal says when time moved things)."""
    from holdfast.retention import Policy
    from holdfast.server import Config
    from holdfast.server import start as start_server

    if not apps and not services and "apps" not in start:
        raise JournalError("the journal names no apps (format 1 named none): give them with --app MODULE:ATTR")
    settings = dict(start.get("settings", {}))
    if "hold_default_ms" in start:  # format 1 named the hold durations alone
        settings["hold_default_ms"] = start["hold_default_ms"]
    config = Config(
        listen="127.0.0.1:0", store=f"sqlite:///{folder}/replay.db", snapshot="memory://", apps=apps, settings=settings,
        retention=Policy(**start.get("retention", {})),
    )
    clock = ReplayClock()
    try:
        running = await start_server(config, clock=clock, services=services)
    except ValueError as error:  # an app that does not load, or nothing to host
        raise JournalError(f"cannot host what the journal was recorded with: {error}") from None
    running.reaper_task.cancel()  # before it ever runs: this task has not yielded since
    missing = sorted(set(start.get("hosted", ())) - set(running.services))
    if missing:
        await running.stop(0)
        raise JournalError(
            f"the journal was recorded hosting {', '.join(missing)}, which the replaying instance does not host;"
            " give its app with --app MODULE:ATTR"
        )
    return running, clock


async def _replay_entries(entries: list[Entry], report: Report, target: str, local, progress: TextIO | None) -> None:
    import grpc

    bar = _Progress(progress, len(entries))
    async with grpc.aio.insecure_channel(target) as channel:
        for done, entry in enumerate(entries, 1):
            if entry.record["kind"] == "timeout":
                await _replay_timeout(entry, report, local)
            elif entry.record["kind"] == "prune":
                await _replay_prune(entry, report, local)
            else:
                await _replay_call(channel, entry, report, local)
            bar.update(done)
    bar.finish()


async def _replay_call(channel, entry: Entry, report: Report, local) -> None:
    import grpc

    record = entry.record
    if local is not None:
        local[1].set(record["time_ms"])
    rpc = channel.unary_unary(record["method"], request_serializer=None, response_deserializer=None)
    timeout = DEFAULT_TIMEOUT_S if record.get("timeout_ms") is None else record["timeout_ms"] / 1000
    call = rpc(decode(record["request"]), timeout=timeout, metadata=_metadata(record.get("metadata") or []))
    try:
        reply = await call
        answer = {"code": "OK", "reply": reply, "details": None}
    except grpc.aio.AioRpcError as error:
        details = dict(error.trailing_metadata() or ()).get("grpc-status-details-bin")
        answer = {"code": error.code().name, "reply": None, "details": details}
    trailing = dict(await call.trailing_metadata() or ())
    answer["replayed"] = trailing.get("holdfast-replayed")
    answer["context_id"] = trailing.get("holdfast-context-id")
    recorded = {
        "code": record["code"],
        "reply": decode(record.get("reply")),
        "details": decode(record.get("details")),
        "replayed": record.get("replayed"),
        "context_id": record.get("context_id"),
    }
    report.calls += 1
    if record.get("answered") is False:
        report.unanswered += 1  # sent for its effects; there is no recorded answer to compare
        return
    if recorded != answer:
        report.differences.append(Difference(entry.line, record["method"].rsplit("/", 1)[-1], recorded, answer))


async def _replay_timeout(entry: Entry, report: Report, local) -> None:
    """A move the recording's reaper made, made again by the same service at
    its recorded time; compared by its outcome."""
    record = entry.record
    if local is None:
        report.skipped_timeouts += 1
        return
    running, clock = local
    service_name, entity_id, version = record["service"], record["entity_id"], record["version"]
    recorded = {"reason": record.get("reason"), "payload": decode(record.get("payload")), "replayed": record.get("replayed")}
    report.timeouts += 1
    service = running.services.get(service_name)
    if service is None:
        answer = {"reason": f"(no {service_name} on the replaying instance)", "payload": None, "replayed": None}
    else:
        clock.set(record["time_ms"])
        outcome = await service.timeout(entity_id, version)
        reason = None if outcome.reason is None else reason_key(outcome.reason)
        answer = {"reason": reason, "payload": outcome.payload, "replayed": outcome.replayed}
    if recorded != answer:
        report.differences.append(Difference(entry.line, f"timeout of {entity_id}", recorded, answer))


async def _replay_prune(entry: Entry, report: Report, local) -> None:
    """A retention round of the recording, made again at its recorded time
    with the recording's retention; compared by what it pruned."""
    record = entry.record
    if local is None:
        report.skipped_prunes += 1
        return
    running, clock = local
    report.prunes += 1
    clock.set(record["time_ms"])
    pruned = await running.retention.prune(record["time_ms"])
    recorded = {name: record[name] for name in ("rows", "records", "tombstones")}
    answer = {"rows": pruned.rows, "records": pruned.records, "tombstones": pruned.tombstones}
    if recorded != answer:
        report.differences.append(Difference(entry.line, "retention round", recorded, answer))


def _metadata(pairs: list[list[str]]) -> tuple[tuple[str, str | bytes], ...]:
    return tuple((key, decode(value) if key.endswith("-bin") else value) for key, value in pairs)


def _shown(value: object) -> str:
    if isinstance(value, bytes):
        return f"{len(value)} bytes {value.hex()}"
    return repr(value)


class _Progress:
    """A progress bar on a terminal; nothing when output is redirected."""

    WIDTH = 40

    def __init__(self, stream: TextIO | None, total: int) -> None:
        self.stream = stream if stream is not None and stream.isatty() else None
        self.total = max(total, 1)
        self._shown = -1

    def update(self, done: int) -> None:
        if self.stream is None:
            return
        filled = done * self.WIDTH // self.total
        if filled == self._shown and done != self.total:
            return
        self._shown = filled
        self.stream.write(f"\r[{'#' * filled}{'.' * (self.WIDTH - filled)}] {done}/{self.total}")
        self.stream.flush()

    def finish(self) -> None:
        if self.stream is not None:
            self.stream.write("\n")
            self.stream.flush()


# -- the command ------------------------------------------------------------------------


def main(argv: list[str] | None = None, default_apps: Sequence[str] = ()) -> int:
    """`holdfast replay FILE [--target HOST:PORT] [--app MODULE:ATTR ...]`;
    exit 0 only when identical, 1 on a difference, 2 when nothing could be
    compared (an unreadable or empty journal, an app that does not load).
    `default_apps` are what a journal naming none was recorded hosting:
    the CLI hands down holdfast's built-in apps, which this layer does not name."""
    parser = argparse.ArgumentParser(prog="holdfast replay", description="Replay a journal and compare every answer byte for byte.")
    parser.add_argument("journal", help="a JSON-lines journal written by `holdfast serve --journal`")
    parser.add_argument("--target", default=None, help="HOST:PORT of a running instance (default: a fresh embedded one)")
    parser.add_argument(
        "--app", action="append", default=None, metavar="MODULE:ATTR", dest="apps",
        help="host this app instead of those the journal names (repeatable); imported from the current folder",
    )
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    from holdfast.server import importable_from_here

    importable_from_here()  # the journal's apps, as `holdfast serve --app` imports them
    try:
        report = replay(args.journal, args.target, progress=sys.stdout, apps=args.apps, default_apps=default_apps)
    except (JournalError, OSError) as error:
        print(f"holdfast replay: {error}", file=sys.stderr)
        return 2
    for difference in report.differences:
        print(difference.describe())
    print(report.summary())
    return 0 if report.identical else 1
