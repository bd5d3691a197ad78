"""`holdfast replay FILE [--target HOST:PORT]`: replays a journal and compares
every answer byte for byte.

By default the journal is replayed against a fresh embedded instance (a
SQLite store in a temporary folder, the in-process snapshot) whose engine
clock is a `ReplayClock`, set to each line's recorded time before the line
is sent. Lines run one at a time, in journal order.

Hold expiry: the replaying instance runs with its reaper stopped, and each
journaled `expire` line (a move the recording's reaper made) is applied as
the same move, at its recorded time and at its place in the sequence. So the
reaper can never race the replay, and holds expire exactly where they did.

With `--target` the journal goes to a running instance: its clock cannot be
set and its reaper cannot be stopped, so recorded times are not injected and
`expire` lines are skipped (the summary says so). Answers that depend on
time may then differ.

Compared for each call: status code, reply bytes, `grpc-status-details-bin`
bytes, `holdfast-replayed` and `holdfast-context-id`; for each expiry, its
outcome. Exit 0 only when everything is identical, 1 on a difference, 2 on a
usage or I/O error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, TextIO

from holdfast.journal import decode

DEFAULT_TIMEOUT_S = 60.0  # above every contract's timeout: the server's budget is what it was
REQUIRED = {
    "call": ("method", "time_ms", "request", "code"),
    "expire": ("reservation_id", "time_ms"),
}


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
    expiries: int = 0
    skipped_expiries: int = 0
    unanswered: int = 0
    differences: list[Difference] = field(default_factory=list)

    @property
    def identical(self) -> bool:
        return not self.differences

    def summary(self) -> str:
        where = f"running instance {self.target}" if self.target else "a fresh embedded instance"
        lines = [
            f"replayed {self.calls} calls and {self.expiries} hold expiries from {self.path} against {where}:"
            f" {'identical' if self.identical else f'{len(self.differences)} differ'}"
        ]
        if self.target:
            lines.append("note: recorded times were not injected (a running instance keeps its own clock)")
        if self.unanswered:
            lines.append(f"note: {self.unanswered} calls were cancelled before they answered; sent, not compared")
        if self.skipped_expiries:
            lines.append(f"note: {self.skipped_expiries} journaled hold expiries were left to the target's own reaper")
        return "\n".join(lines)


@dataclass(frozen=True, slots=True)
class Entry:
    line: int
    record: dict


class JournalError(ValueError):
    """The journal cannot be read as one."""


def read_journal(path: str | Path) -> tuple[dict, list[Entry]]:
    """The first start line (hold settings) and every call or expire line."""
    start: dict = {}
    entries: list[Entry] = []
    for number, record in _lines(Path(path)):
        kind = record.get("kind")
        if kind == "start":
            start = start or record
        elif kind in REQUIRED:
            missing = [name for name in REQUIRED[kind] if name not in record]
            if missing:
                raise JournalError(f"{path}:{number}: a {kind} line without {', '.join(missing)}")
            entries.append(Entry(number, record))
        else:
            raise JournalError(f"{path}:{number}: unknown line kind {kind!r}")
    return start, entries


def _lines(path: Path) -> Iterator[tuple[int, dict]]:
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


# -- replaying ------------------------------------------------------------------------


def replay(path: str | Path, target: str | None = None, progress: TextIO | None = None) -> Report:
    """Replays a journal and reports every difference. Callable from a thread
    that runs an event loop too (a test's): the replay then runs on its own
    thread and loop, which this call waits for."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(replay_async(path, target, progress))
    result: list = []

    def run() -> None:
        try:
            result.append(asyncio.run(replay_async(path, target, progress)))
        except BaseException as error:  # handed to the caller's thread
            result.append(error)

    thread = threading.Thread(target=run, name="holdfast-replay")
    thread.start()
    thread.join()
    if isinstance(result[0], BaseException):
        raise result[0]
    return result[0]


async def replay_async(path: str | Path, target: str | None = None, progress: TextIO | None = None) -> Report:
    """The replay itself; see the module docstring."""
    start, entries = read_journal(path)
    report = Report(str(path), target)
    if target is not None:
        await _replay_entries(entries, report, target, None, progress)
        return report
    with tempfile.TemporaryDirectory(prefix="holdfast-replay-") as folder:
        running, clock = await _fresh_instance(start, Path(folder))
        try:
            await _replay_entries(entries, report, f"127.0.0.1:{running.port}", (running, clock), progress)
        finally:
            await running.stop(0)
    return report


async def _fresh_instance(start: dict, folder: Path):
    """An embedded instance with the recording's holds, a settable clock and
    its reaper stopped (the journal says when holds expired)."""
    from holdfast.apps.inventory import Holds
    from holdfast.server import Config
    from holdfast.server import start as start_server

    holds = Holds()
    if "hold_default_ms" in start:
        holds = Holds(default_ms=start["hold_default_ms"], max_ms=start["hold_max_ms"])
    config = Config(listen="127.0.0.1:0", store=f"sqlite:///{folder}/replay.db", snapshot="memory://", holds=holds)
    clock = ReplayClock()
    running = await start_server(config, clock=clock)
    running.reaper_task.cancel()  # before it ever runs: this task has not yielded since
    return running, clock


async def _replay_entries(entries: list[Entry], report: Report, target: str, local, progress: TextIO | None) -> None:
    import grpc

    bar = _Progress(progress, len(entries))
    async with grpc.aio.insecure_channel(target) as channel:
        for done, entry in enumerate(entries, 1):
            if entry.record["kind"] == "expire":
                await _replay_expiry(entry, report, local)
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


async def _replay_expiry(entry: Entry, report: Report, local) -> None:
    record = entry.record
    if local is None:
        report.skipped_expiries += 1
        return
    running, clock = local
    rid = record["reservation_id"]
    hold = await running.engine.store.transact(lambda txn: txn.reservation(rid))
    recorded = {"reason": record.get("reason"), "payload": decode(record.get("payload")), "replayed": record.get("replayed")}
    report.expiries += 1
    if hold is None:
        answer = {"reason": "RESERVATION_NOT_FOUND (no such hold on the replaying instance)", "payload": None, "replayed": None}
    else:
        clock.set(record["time_ms"])
        outcome = await running.inventory.expire(hold)
        reason = None if outcome.reason is None else outcome.reason.name
        answer = {"reason": reason, "payload": outcome.payload, "replayed": outcome.replayed}
    if recorded != answer:
        report.differences.append(Difference(entry.line, f"hold expiry of {rid}", recorded, answer))


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


def main(argv: list[str] | None = None) -> int:
    """`holdfast replay FILE [--target HOST:PORT]`; exit 0 only when identical."""
    parser = argparse.ArgumentParser(prog="holdfast replay", description="Replay a journal and compare every answer byte for byte.")
    parser.add_argument("journal", help="a JSON-lines journal written by `holdfast serve --journal`")
    parser.add_argument("--target", default=None, help="HOST:PORT of a running instance (default: a fresh embedded one)")
    args = parser.parse_args(sys.argv[1:] if argv is None else argv)
    try:
        report = replay(args.journal, args.target, progress=sys.stdout)
    except (JournalError, OSError) as error:
        print(f"holdfast replay: {error}", file=sys.stderr)
        return 2
    for difference in report.differences:
        print(difference.describe())
    print(report.summary())
    return 0 if report.identical else 1
