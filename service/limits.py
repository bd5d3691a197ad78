"""Limits under load: a bound on the calls a server works on at once, and on
the size of a message.

**Concurrency.** `Admission` is a server interceptor outside fault injection,
the journal and the gateway (inside authentication only). It counts the
calls of the hosted services in flight; at `max_concurrent_rpcs` a new call
is answered at once with RESOURCE_EXHAUSTED, a `google.rpc.Status` whose
ErrorInfo reason is OVERLOADED plus a `RetryInfo`, and the trailing metadata
`grpc-retry-pushback-ms` that gRPC clients' retry policies honour (when the
policy lists RESOURCE_EXHAUSTED). Nothing of the refused call ran: its
request is not even parsed, so a refusal costs little beyond gRPC's own
work for any call, and memory does not grow with the calls refused. A
queue would only hand the overload to calls whose deadlines run out while
they wait.

The pushback is `retry_pushback_ms` with ±50 % jitter, so refused clients
do not all come back in the same millisecond.

Health checks and reflection are not counted: an orchestrator must see a
busy server as alive, not restart it for being busy.

Two queues sit in front of the interceptor, and both are bounded:

* gRPC's core queues calls that arrived before the server's event loop
  took them (a burst arrives faster than one loop takes calls). From
  `pending_rpcs_max` on it sheds calls at random, and all of them at twice
  that, answering CANCELLED without details. gRPC's default, 1,000, shed a
  tenth of a 2,000-call burst from one client before holdfast could answer
  them; at 5,000, bursts of several thousand calls get OVERLOADED. Measured:
  ~11 kB of memory per queued call, so ~110 MB at the hard limit.
* grpc.aio's own `maximum_concurrent_rpcs` (`backstop`) counts every call
  the loop has taken, refused ones too, and answers RESOURCE_EXHAUSTED
  without details. It is the bound plus `REFUSING_MAX`, so it only acts
  when refusals cannot keep up; each call held there holds its request (up
  to `max_message_bytes`), which is what it bounds.

**Message size.** gRPC itself refuses a request larger than
`max_message_bytes` with RESOURCE_EXHAUSTED before any handler runs (a
plain status: no holdfast ErrorInfo can ride on it), and the server goes on.
The default, 1 MiB, is 4 times below gRPC's own 4 MiB and still above any
real request (ids are short); the fuzz suites' largest requests, strings of
~1,000,000 bytes, fit under it and keep their defined answers.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Any, Collection, cast

import grpc
from google.protobuf import duration_pb2
from google.rpc import error_details_pb2

from holdfast import metrics
from holdfast.gateway import STATUS_DETAILS, AioBehavior, Context, Continuation, Handler
from holdfast.outcome import Reason, failure

PUSHBACK = "grpc-retry-pushback-ms"
MiB = 1 << 20
# Calls grpc.aio may hold beyond the bound while they are being refused
# (the backstop's headroom). A refusal takes microseconds: in a flood of
# 8,000 calls at once, no more than 100 were ever held at a time.
REFUSING_MAX = 1_000


@dataclass(frozen=True, slots=True)
class Limits:
    max_concurrent_rpcs: int = 1000  # calls worked on at once; more are refused OVERLOADED
    max_message_bytes: int = 1 * MiB  # largest request (and reply) a server takes
    retry_pushback_ms: int = 250  # told to a refused client, ±50 % jitter
    # Calls gRPC queues before the server's loop takes them (see the module
    # docstring); beyond it gRPC sheds calls at random, up to twice as many.
    pending_rpcs_max: int = 5_000

    def __post_init__(self) -> None:
        if self.max_concurrent_rpcs < 1:
            raise ValueError(f"max_concurrent_rpcs must be at least 1, got {self.max_concurrent_rpcs}")
        if self.max_message_bytes < 1024:
            raise ValueError(f"max_message_bytes must be at least 1024, got {self.max_message_bytes}")
        if self.pending_rpcs_max < 1:
            raise ValueError(f"pending_rpcs_max must be at least 1, got {self.pending_rpcs_max}")
        if self.retry_pushback_ms < 1:
            raise ValueError(f"retry_pushback_ms must be at least 1, got {self.retry_pushback_ms}")

    @property
    def backstop(self) -> int:
        """grpc.aio's `maximum_concurrent_rpcs`: calls held at once, refused
        ones included, before gRPC refuses without asking holdfast."""
        return self.max_concurrent_rpcs + REFUSING_MAX

    def server_options(self) -> list[tuple[str, int]]:
        return [
            ("grpc.max_receive_message_length", self.max_message_bytes),
            ("grpc.max_send_message_length", self.max_message_bytes),
            ("grpc.server.max_pending_requests", self.pending_rpcs_max),
            ("grpc.server.max_pending_requests_hard_limit", 2 * self.pending_rpcs_max),
        ]


class Admission(grpc.aio.ServerInterceptor):
    """Counts the calls of `methods` (gRPC paths) in flight and refuses those
    beyond the bound. One event loop runs every call, so a plain counter is
    exact."""

    def __init__(self, limits: Limits, methods: Collection[str], rng: random.Random | None = None) -> None:
        self.limits = limits
        self.in_flight = 0
        self.refused = 0
        self._methods = frozenset(methods)
        self._random = rng or random.Random()
        # The wrapped handler of each method, made again only when the inner
        # handler changes (fault injection and the journal make one per call;
        # without them grpc hands out the same registered handler every time).
        self._wrapped: dict[str, tuple[Handler, Handler]] = {}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        method = handler_call_details.method
        if handler is None or handler.unary_unary is None or method not in self._methods:
            return handler
        cached = self._wrapped.get(method)
        if cached is not None and cached[0] is handler:
            return cached[1]
        wrapped: Handler = grpc.unary_unary_rpc_method_handler(
            self._admitting(method, handler),
            request_deserializer=None,  # parsed only once admitted
            response_serializer=handler.response_serializer,
        )
        self._wrapped[method] = (handler, wrapped)
        return wrapped

    def _admitting(self, method: str, handler: Handler) -> AioBehavior:
        behavior, deserialize = cast(AioBehavior, handler.unary_unary), handler.request_deserializer
        bound = self.limits.max_concurrent_rpcs

        async def admitting(raw: bytes, context: Context) -> Any:
            if self.in_flight >= bound:
                await self._refuse(method, context)
            self.in_flight += 1
            try:
                return await behavior(raw if deserialize is None else deserialize(raw), context)
            finally:
                self.in_flight -= 1

        return admitting

    def pushback_ms(self) -> int:
        base = self.limits.retry_pushback_ms
        return max(1, round(base * (0.5 + self._random.random())))

    async def _refuse(self, method: str, context: Context) -> None:
        self.refused += 1
        metrics.OUTCOMES.labels(method, Reason.OVERLOADED.name).inc()
        pushback_ms = self.pushback_ms()
        message = (
            f"the server is at its bound of {self.limits.max_concurrent_rpcs} concurrent calls;"
            f" nothing ran, retry after {pushback_ms} ms"
        )
        outcome = failure(Reason.OVERLOADED, message, metadata={"retry_after_ms": str(pushback_ms)})
        status = outcome.status()
        retry = error_details_pb2.RetryInfo(retry_delay=duration_pb2.Duration(
            seconds=pushback_ms // 1000, nanos=pushback_ms % 1000 * 1_000_000))
        status.details.add().Pack(retry)
        trailing = ((PUSHBACK, str(pushback_ms)), (STATUS_DETAILS, status.SerializeToString()))
        await context.abort(outcome.code, message, trailing_metadata=trailing)
        raise AssertionError("abort returns only by raising")
