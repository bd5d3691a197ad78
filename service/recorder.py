"""The journal's recorder: `holdfast serve --journal FILE` appends every call
as one JSON line (the format: holdfast.journal, which reads it back).

This is the server's half of journaling, so the server records without
depending on the testing layer: an interceptor that writes each call's
exact answer, a wrapper of every hosted service's `timeout` (the moves time
makes), and the clock pinning that makes a replay compute the same times.

Business time is pinned per call: the recorder reads the engine clock once
when the call starts, writes that value to the journal, and makes the engine
see exactly that value for the whole call (`PinnedClock`). Without pinning,
the engine would read the clock again inside its store transaction, a few
milliseconds later, and a replay at the recorded time would compute another
`expires_at_ms`. The engine reads its clock on the store's worker thread, so
the pinned value travels with the store job (`PinningStore` runs the job in
the calling task's context).

Lines are appended with one `os.write` on an `O_APPEND` descriptor, flushed
by the kernel as it returns: a crash loses at most the call in flight.
Lines follow the order in which answers were made. Replay is sequential in
that order; concurrent calls that touch the same entity may have run in
another order than they answered, so such a journal may not replay
identically (replay reports it as a difference, never hides it).

Recovery moves at start-up are not journaled: a journal replays identically
when it was recorded from an empty store.
"""

from __future__ import annotations

import asyncio
import base64
import contextvars
import json
import os
from collections.abc import Callable, Collection, Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar, cast

import grpc

from holdfast.clock import Clock
from holdfast.framework import Service
from holdfast.gateway import CONTEXT_ID, REPLAYED, STATUS_DETAILS, AioBehavior, Context, Continuation, Handler
from holdfast.outcome import Outcome, reason_key
from holdfast.store import Prefetch, Txn

if TYPE_CHECKING:
    from holdfast.engine import Engine
    from holdfast.retention import Pruned, Retention
    from holdfast.server import Config

FORMAT = 2
# Transport headers say nothing the servicer reads; everything else is kept.
_TRANSPORT = ("user-agent", "grpc-", ":")

T = TypeVar("T")
_pinned: contextvars.ContextVar[int | None] = contextvars.ContextVar("holdfast_pinned_now_ms", default=None)


def encode(data: bytes) -> str:
    """Bytes as a journal holds them: base64 text."""
    return base64.b64encode(data).decode("ascii")


def decode(text: str | None) -> bytes | None:
    """What `encode` wrote, back as bytes (None stays None: no reply, no details)."""
    return None if text is None else base64.b64decode(text)


class PinnedClock:
    """The engine's clock while journaling: the time pinned for the current
    call, else the underlying clock (the reaper's own reads, for one)."""

    def __init__(self, clock: Clock) -> None:
        self.clock = clock

    def now_ms(self) -> int:
        pinned = _pinned.get()
        return self.clock.now_ms() if pinned is None else pinned


class PinningStore:
    """A store proxy that runs each job in the context of the task that
    queued it, so `PinnedClock` sees the call's pinned time on the worker thread."""

    def __init__(self, store: Any) -> None:
        self._store = store

    def __getattr__(self, name: str) -> Any:
        return getattr(self._store, name)

    async def transact(
        self, work: Callable[[Txn], T], deadline: float | None = None, prefetch: Prefetch | None = None
    ) -> T:
        if _pinned.get() is None:
            result: T = await self._store.transact(work, deadline, prefetch)
            return result
        context = contextvars.copy_context()
        pinned: T = await self._store.transact(lambda txn: context.run(work, txn), deadline, prefetch)
        return pinned


class JournalWriter:
    """Appends lines to a journal file: one `json.dumps` and one `os.write` each."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        try:
            self._fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        except OSError as error:
            raise OSError(f"cannot open journal {self.path}: {error.strerror or error}") from None

    def write(self, entry: dict[str, Any]) -> None:
        if self._fd >= 0:
            os.write(self._fd, (json.dumps(entry, separators=(",", ":")) + "\n").encode())

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def start_line(config: Config, hosted: Iterable[str]) -> dict[str, Any]:
    """What a replay must host as the recording did: the apps (MODULE:ATTR)
    and the settings they were made with, and the full names of all hosted
    (a factory given in code has no spec to write, but its name is checked)."""
    policy = config.retention
    return {
        "kind": "start", "format": FORMAT,
        "apps": list(config.apps), "settings": dict(config.settings), "hosted": list(hosted),
        "retention": {"retention_ms": policy.retention_ms, "tombstone_ms": policy.tombstone_ms, "batch": policy.batch},
    }


def install(
    path: str | Path, engine: Engine, movers: Iterable[Service], methods: Collection[str], start: dict[str, Any],
    retention: Retention | None = None,
) -> tuple[JournalWriter, JournalRecorder]:
    """Journals every call of `methods` (every hosted method), every timed
    move of `movers` (the services whose moves run here) and every
    retention round that pruned something: pins the engine's time per
    call, writes the start line, and returns the writer (close it on stop)
    and the interceptor to serve with."""
    writer = JournalWriter(path)
    clock = PinnedClock(engine.clock)
    engine.clock = clock
    engine.store = PinningStore(engine.store)
    writer.write(start)
    for service in movers:
        _journal_timeouts(writer, service, clock.clock)
    if retention is not None:
        _journal_pruning(writer, retention, clock.clock)
    return writer, JournalRecorder(writer, clock.clock, methods)


def _journal_pruning(writer: JournalWriter, retention: Retention, clock: Clock) -> None:
    """Wraps `retention.prune` so each round runs at one pinned time and,
    when it pruned anything, lands in the journal: a replay prunes there
    too, so a key retried after its record was pruned answers the same."""
    prune = retention.prune

    async def journaled_prune(now_ms: int | None = None) -> Pruned:
        now_ms = clock.now_ms() if now_ms is None else now_ms
        token = _pinned.set(now_ms)
        try:
            pruned = await prune(now_ms)
        finally:
            _pinned.reset(token)
        if pruned:
            writer.write(prune_line(now_ms, pruned))
        return pruned

    retention.prune = journaled_prune  # type: ignore[method-assign]


def prune_line(now_ms: int, pruned: Pruned) -> dict[str, Any]:
    return {"kind": "prune", "time_ms": now_ms, "rows": pruned.rows, "records": pruned.records,
            "tombstones": pruned.tombstones}


def _journal_timeouts(writer: JournalWriter, service: Service, clock: Clock) -> None:
    """Wraps `service.timeout` (every move time makes goes through it) so
    each runs at a pinned time and lands in the journal."""
    timeout = service.timeout

    async def journaled_timeout(entity_id: str, version: int) -> Outcome:
        now_ms = clock.now_ms()
        token = _pinned.set(now_ms)
        try:
            outcome = await timeout(entity_id, version)
        finally:
            _pinned.reset(token)
        writer.write(timeout_line(service.name, entity_id, version, now_ms, outcome))
        return outcome

    service.timeout = journaled_timeout  # type: ignore[method-assign]


def timeout_line(service: str, entity_id: str, version: int, now_ms: int, outcome: Outcome) -> dict[str, Any]:
    return {
        "kind": "timeout",
        "service": service,
        "entity_id": entity_id,
        "version": version,
        "time_ms": now_ms,
        "reason": None if outcome.reason is None else reason_key(outcome.reason),
        "payload": encode(outcome.payload),
        "replayed": outcome.replayed,
    }


class JournalRecorder(grpc.aio.ServerInterceptor):
    """Records each unary call of the journaled methods, inside fault
    injection and outside the gateway, so it sees the gateway's exact answer."""

    def __init__(self, writer: JournalWriter, clock: Clock, methods: Collection[str]) -> None:
        self._writer = writer
        self._clock = clock
        self._methods = frozenset(methods)

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or method not in self._methods or handler.unary_unary is None:
            return handler
        return grpc.unary_unary_rpc_method_handler(
            self._recording(method, handler),
            request_deserializer=None,  # keep the request's bytes; parsed below
            response_serializer=handler.response_serializer,
        )

    def _recording(self, method: str, handler: Handler) -> AioBehavior:
        behavior = cast(AioBehavior, handler.unary_unary)  # an aio server's handlers are coroutines
        deserialize: Callable[[bytes], Any] = handler.request_deserializer or (lambda data: data)

        async def recording(raw: bytes, context: Context) -> Any:
            now_ms = self._clock.now_ms()
            remaining = context.time_remaining()
            token = _pinned.set(now_ms)
            reply: bytes | None = None
            answered = False
            try:
                reply = await behavior(deserialize(raw), context)
                answered = True
                return reply
            except asyncio.CancelledError:
                raise  # the client went away: its move may have run, its answer was never made
            except BaseException:
                answered = True  # an abort (the gateway's errors) or an escaped error: answered
                raise
            finally:
                _pinned.reset(token)
                self._writer.write(call_line(method, raw, now_ms, remaining, context, reply, answered))

        return recording


def call_line(
    method: str, raw: bytes, now_ms: int, remaining: float | None, context: Context, reply: bytes | None,
    answered: bool = True,
) -> dict[str, Any]:
    """The journal line of one call, its answer read back from its context.

    A call cancelled before it answered (the client's deadline passed, the
    client went away) is journaled with `answered: false`: it may have moved
    state, so replay sends it, but there is no answer to compare."""
    trailing = dict(context.trailing_metadata() or ())
    code = context.code()
    ok = answered and reply is not None and code in (None, grpc.StatusCode.OK)
    details = cast("bytes | None", trailing.get(STATUS_DETAILS))  # a `-bin` key's value is bytes
    return {
        "kind": "call",
        "method": method,
        "answered": answered,
        "time_ms": now_ms,
        "timeout_ms": None if remaining is None else max(1, round(remaining * 1000)),
        "metadata": _metadata(context.invocation_metadata() or ()),
        "request": encode(raw),
        "code": "OK" if ok else _code_name(code) if answered else "CANCELLED",
        "reply": encode(reply) if ok and reply is not None else None,
        "details": None if ok or details is None else encode(details),
        "message": None if ok else context.details(),
        "replayed": trailing.get(REPLAYED),
        "context_id": trailing.get(CONTEXT_ID),
    }


def _code_name(code: object) -> str:
    if isinstance(code, grpc.StatusCode):
        return code.name
    return "UNKNOWN"  # an exception escaped the servicer: gRPC answers UNKNOWN


def _metadata(pairs: Iterable[tuple[str, str | bytes]]) -> list[list[str]]:
    kept = []
    for key, value in pairs:
        if key.startswith(_TRANSPORT):
            continue
        kept.append([key, encode(value) if isinstance(value, bytes) else value])
    return kept
