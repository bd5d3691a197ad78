"""The gateway: contract work around every method handler, and nothing else.

It wraps each of a service's method handlers once, at start-up, with the
method's contract (read once from the compiled descriptors), so a call pays
no handler construction, contract look-up or interceptor chain. For every
call it sets the budget to `min(client deadline, timeout_ms)`, derives
the idempotency key from the declared fields, the request fingerprint and the
context id, and hands one `Call` to the servicer. It turns the servicer's
`Outcome` into the wire answer: the exact reply bytes, or the status with its
`google.rpc.Status` details, plus trailing metadata `holdfast-context-id` and
`holdfast-replayed`. This is the one place outcomes become gRPC statuses.
"""

from __future__ import annotations

import contextvars
import hashlib
import time
from dataclasses import dataclass
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeAlias, cast

import grpc
from google.protobuf.message import DecodeError, Message

from holdfast import metrics, spans
from holdfast.call import Call, idempotency_key, serving
from holdfast.contracts.contract import Contract
from holdfast.outcome import Outcome, Reason, failure

CONTEXT_ID = "holdfast-context-id"
REPLAYED = "holdfast-replayed"
STATUS_DETAILS = "grpc-status-details-bin"


# When the call reached this server, if an outer interceptor saw it first
# (holdfast.faults): the contract's budget is the server's time from arrival,
# so time an outer layer spent is spent from the budget too.
_arrived: contextvars.ContextVar[float] = contextvars.ContextVar("holdfast_arrived")


def mark_arrival() -> None:
    """Called by an interceptor outside the gateway as the call arrives."""
    _arrived.set(time.monotonic())


@dataclass(frozen=True, slots=True)
class _Malformed:
    """A request body that did not parse; answered, never raised."""

    error: str


# grpcio's stubs type a method handler's behavior as the sync server's; the
# servicers here are grpc.aio's, coroutine functions over an aio context.
# Interceptors (holdfast.limits, holdfast.security, holdfast.faults) read
# and wrap them through these names.
# (Strings: grpcio's classes are generic in its stubs alone.)
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"
Context: TypeAlias = "grpc.aio.ServicerContext[Any, Any]"
Continuation: TypeAlias = "Callable[[grpc.HandlerCallDetails], Awaitable[Handler | None]]"
AioBehavior: TypeAlias = "Callable[[Any, Context], Awaitable[Any]]"
Behavior: TypeAlias = "Callable[[Message, Context], Awaitable[Outcome]]"
Guarded: TypeAlias = "Callable[[Message | _Malformed, Context], Awaitable[bytes]]"


class Gateway:
    def __init__(self, contracts: Mapping[str, Contract]) -> None:
        self._contracts = dict(contracts)

    def guard(self, service: str, handlers: Mapping[str, Handler]) -> dict[str, Handler]:
        """`service`'s method handlers by name, each wrapped with its contract;
        register them with `add_registered_method_handlers`. Every method
        must have a contract: the linter sees to that, this asserts it."""
        guarded: dict[str, Handler] = {}
        for name, handler in handlers.items():
            contract = self._contracts.get(f"/{service}/{name}")
            assert contract is not None, f"{service}/{name} has no contract"
            assert handler.unary_unary is not None, f"{service}/{name} is not unary"
            assert handler.request_deserializer is not None, f"{service}/{name} parses no request"
            guarded[name] = grpc.unary_unary_rpc_method_handler(
                self._guard(contract, cast(Behavior, handler.unary_unary)),
                request_deserializer=_tolerant(handler.request_deserializer),
                response_serializer=handler.response_serializer,
            )
        return guarded

    def _guard(self, contract: Contract, behavior: Behavior) -> Guarded:
        latency = metrics.LATENCY.labels(contract.method)  # a labelled child, looked up once
        # Every method's answer and fallback counters exist from the start, at
        # 0: rate() sees a series' first increment only after a sample without it.
        metrics.TIMEOUT_FALLBACKS.labels(contract.method)
        _outcome_counters[contract.method, "OK"] = metrics.OUTCOMES.labels(contract.method, "OK")

        async def guarded(request: Message | _Malformed, context: Context) -> bytes:
            started = time.monotonic()
            call, rejected = _admit(contract, request, context, _arrived.get(started), started)
            if rejected is not None:
                outcome = rejected
            else:
                assert call is not None and not isinstance(request, _Malformed), "_admit admits a parsed call"
                with serving(call):
                    outcome = await behavior(request, context)
            latency.observe(time.monotonic() - started)
            if spans.tracer is not None:  # the call's span: its context id, method and reason
                spans.tracer.answered(contract.method, call, outcome)
            return await _answer(context, contract, outcome, call)

        return guarded


def _admit(
    contract: Contract, request: Message | _Malformed, context: Context, arrived: float, now: float
) -> tuple[Call | None, Outcome | None]:
    """The call's `Call`, or the outcome that refuses it before any servicer runs."""
    if isinstance(request, _Malformed):
        return None, failure(Reason.INVALID_REQUEST, f"the request could not be decoded: {request.error}")
    fingerprint = hashlib.sha256(request.SerializeToString(deterministic=True)).digest()
    values = tuple(getattr(request, name) for name in contract.idempotency_key)
    key = idempotency_key(contract.method, values) if contract.idempotency_key else fingerprint
    remaining = context.time_remaining()
    deadline = arrived + contract.timeout_s
    if remaining is not None:
        deadline = min(deadline, now + remaining)
    context_id = hashlib.sha256(b"context:" + key).hexdigest()[:32]
    call = Call(contract, key, fingerprint, context_id, deadline)
    # proto3 cannot tell an unset scalar from its zero, so a key field at its
    # zero value is missing: two callers leaving it unset would share a key.
    missing = [name for name, value in zip(contract.idempotency_key, values) if value in ("", 0)]
    if not missing:
        return call, None
    metrics.CONTRACT_VIOLATIONS.labels(contract.method).inc()
    violations = [(name, "idempotency key field must be set") for name in missing]
    message = f"{contract.method} needs its idempotency key fields set: {', '.join(missing)}"
    return call, failure(Reason.CONTRACT_VIOLATION, message, violations)


async def _answer(context: Context, contract: Contract, outcome: Outcome, call: Call | None) -> bytes:
    reason = "OK" if outcome.reason is None else outcome.reason.name
    counter = _outcome_counters.get((contract.method, reason))
    if counter is None:
        counter = _outcome_counters[contract.method, reason] = metrics.OUTCOMES.labels(contract.method, reason)
    counter.inc()
    if outcome.reason is Reason.BUDGET_EXCEEDED:  # moves and reads alike: every timeout fallback answered
        metrics.TIMEOUT_FALLBACKS.labels(contract.method).inc()
    trailing: list[tuple[str, str | bytes]] = [(REPLAYED, "true" if outcome.replayed else "false")]
    if call is not None:
        trailing.append((CONTEXT_ID, call.context_id))
    if outcome.ok:
        context.set_trailing_metadata(tuple(trailing))
        return outcome.payload
    trailing.append((STATUS_DETAILS, outcome.payload))
    await context.abort(outcome.code, outcome.status().message, trailing_metadata=tuple(trailing))
    raise AssertionError("abort returns only by raising")


# Labelled children of holdfast_outcomes_total, looked up once per (method, reason).
_outcome_counters: dict[tuple[str, str], Any] = {}


def _tolerant(deserializer: Callable[[bytes], Message]) -> Callable[[bytes], Message | _Malformed]:
    def deserialize(data: bytes) -> Message | _Malformed:
        try:
            return deserializer(data)
        except (DecodeError, ValueError, UnicodeDecodeError) as error:
            return _Malformed(str(error) or type(error).__name__)

    return deserialize
