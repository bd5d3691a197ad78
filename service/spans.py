"""Tracing's hook in the core: where a move's phases and a call's answer are
reported, when someone listens.

OpenTelemetry is optional (`pip install 'holdfast[otel]'`), so the core never
imports it. `tracer` is None unless the server was started with tracing on
(`holdfast serve --otlp-endpoint HOST:PORT`; holdfast.tracing, server layer,
builds the exporter and sets it). The engine reads it once per phase:

    seen = await (work if spans.tracer is None else spans.tracer.phase(SNAPSHOT_READ, work))

so with tracing off a phase costs one global read and nothing else. With it
on, each phase is a span under the call's span (the gRPC server span the
instrumentation opens for the call, its parent the client's W3C context), and
the gateway names the call's context id, method and reason on that span.
"""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol, TypeVar

from holdfast.call import Call
from holdfast.outcome import Outcome

T = TypeVar("T")

# The phases of a move (holdfast.engine, Engine._move), one span each.
SNAPSHOT_READ = "holdfast.snapshot.read"  # the entity's version, before the transaction
STORE_TRANSACT = "holdfast.store.transact"  # the store transaction (its batch), steps 1-4
SNAPSHOT_ADVANCE = "holdfast.snapshot.advance"  # the versions written, after the commit

# The attributes the call's span carries.
CONTEXT_ID = "holdfast.context_id"  # the `holdfast-context-id` trailer the client got
METHOD = "holdfast.method"  # the contract's method, /package.Service/Method
REASON = "holdfast.reason"  # the outcome's reason, or OK
REPLAYED = "holdfast.replayed"  # whether the answer was a recorded outcome's replay


class Tracer(Protocol):
    """What the core and the gateway report to; holdfast.tracing's is OpenTelemetry's."""

    def phase(self, name: str, work: Awaitable[T]) -> Awaitable[T]:
        """`work`, awaited inside a span `name` under the current call's span."""
        ...

    def answered(self, method: str, call: Call | None, outcome: Outcome) -> None:
        """Names the call's context id (no `call`: the request did not
        parse, so it has none), method and outcome on the current call's span."""
        ...


# Set by holdfast.tracing.install, reset by holdfast.tracing.shutdown.
tracer: Tracer | None = None
