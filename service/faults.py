"""Fault injection files: `holdfast serve --faults FILE`, for chaos runs and tests.

A TOML file names methods and what to do to a share of their calls:

    ["holdfast.inventory.v1.InventoryService/Reserve"]
    delay_ms = 2500          # optional, slept before the call runs
    status = "UNAVAILABLE"   # optional gRPC status answered instead of running the call
    probability = 0.5        # optional, 0..1, default 1
    seed = 7                 # optional, per method: the same seed, the same faults

The linter reads the same files (a delay must stay under the method's
timeout), so the format is fixed: one table per method, these four keys.

`FaultInjector` is the outermost server interceptor, ahead of the gateway: a
delayed call reaches the gateway with part of the client's deadline already
spent, exactly as if the network had been slow, and an injected error never
touches the engine. Injected errors carry `google.rpc.Status` details built by
`holdfast.outcome.failure`, the same bytes a real failure of that status
carries, so clients exercise their real error path.
"""

from __future__ import annotations

import asyncio
import math
import random
import re
import tomllib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Collection, Mapping, NoReturn, cast, overload

import grpc

from holdfast import metrics
from holdfast.gateway import STATUS_DETAILS, AioBehavior, Context, Continuation, Handler, mark_arrival
from holdfast.outcome import Reason, failure

KEYS = frozenset({"delay_ms", "status", "probability", "seed"})
# A status is injected with the reason a real call of that status would give
# when the reason says nothing false about what happened (nothing changed).
# Statuses with several or no matching reasons go out with a plain message.
REASONS: Mapping[grpc.StatusCode, Reason] = {
    grpc.StatusCode.UNAVAILABLE: Reason.DEPENDENCY_UNAVAILABLE,
    grpc.StatusCode.DEADLINE_EXCEEDED: Reason.BUDGET_EXCEEDED,
}
_METHOD_NAME = re.compile(r"[A-Za-z_][\w]*(\.[A-Za-z_][\w]*)+/[A-Za-z_][\w]*")
_STATUSES = {code.name: code for code in grpc.StatusCode if code is not grpc.StatusCode.OK}


@dataclass(frozen=True, slots=True)
class Fault:
    """What to do to one method's calls. `method` is the gRPC path,
    `/pkg.Service/Method`, as the gateway's contracts are keyed."""

    method: str
    delay_ms: int = 0
    status: grpc.StatusCode | None = None
    probability: float = 1.0
    seed: int | None = None


@dataclass(frozen=True, slots=True)
class FaultPlan:
    """A parsed fault file: its faults by gRPC path, and where it came from."""

    source: str
    faults: Mapping[str, Fault]

    def require_known(self, methods: Collection[str]) -> None:
        """Refuses a plan naming a method the server does not host, with
        the same line as parsing against `methods` would have given: a
        server learns what it hosts only once its apps are made."""
        for method in sorted(self.faults):
            _known(f'{self.source}: ["{method.lstrip("/")}"]', method, methods)


# -- reading a file: load → parse → one table at a time ---------------------------


def load(path: str | Path, methods: Collection[str] | None = None) -> FaultPlan:
    """Reads and validates a fault file; `methods` are the gRPC paths a fault
    may name (the hosted ones). None checks each name's shape only, for a
    caller that checks the names later (`FaultPlan.require_known`)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as error:
        raise OSError(f"cannot read fault file {path}: {error.strerror or error}") from None
    return parse(text, str(path), methods)


def parse(text: str, source: str, methods: Collection[str] | None = None) -> FaultPlan:
    """Validates a fault file's text; every error names `source` and the key."""
    try:
        document = tomllib.loads(text)
    except tomllib.TOMLDecodeError as error:
        raise ValueError(f"{source}: not valid TOML: {error}") from None
    faults: dict[str, Fault] = {}
    for name, table in document.items():
        fault = _fault(source, name, table, methods)
        faults[fault.method] = fault
    return FaultPlan(source, faults)


def _known(where: str, method: str, methods: Collection[str]) -> None:
    if method not in methods:
        known = ", ".join(sorted(m.lstrip("/") for m in methods))
        raise ValueError(f"{where}: unknown method {method.lstrip('/')!r} (known: {known})")


def _fault(source: str, name: str, table: object, methods: Collection[str] | None) -> Fault:
    where = f'{source}: ["{name}"]'
    if not isinstance(table, dict):
        raise ValueError(f'{where}: expected a table of a method, e.g. ["pkg.Service/Method"], got a {_toml_type(table)}')
    method = "/" + name
    if methods is not None:
        _known(where, method, methods)
    elif not _METHOD_NAME.fullmatch(name):
        raise ValueError(f"{where}: unknown method {name!r} (expected package.Service/Method)")
    unknown = sorted(table.keys() - KEYS)
    if unknown:
        raise ValueError(f"{where}.{unknown[0]}: unknown key (expected {', '.join(sorted(KEYS))})")
    delay_ms = _integer(where, table, "delay_ms", 0)
    if delay_ms < 0:
        raise ValueError(f"{where}.delay_ms: must be 0 or more, got {delay_ms}")
    status = _status(where, table)
    if delay_ms == 0 and status is None:
        raise ValueError(f"{where}: injects nothing; set delay_ms, status or both")
    probability = table.get("probability", 1.0)
    if isinstance(probability, bool) or not isinstance(probability, (int, float)):
        raise ValueError(f"{where}.probability: expected a number from 0 to 1, got a {_toml_type(probability)}")
    if math.isnan(probability) or not 0 <= probability <= 1:
        raise ValueError(f"{where}.probability: must be from 0 to 1, got {probability}")
    seed = _integer(where, table, "seed", None)
    return Fault(method, delay_ms, status, float(probability), seed)


@overload
def _integer(where: str, table: dict[str, object], key: str, default: int) -> int: ...
@overload
def _integer(where: str, table: dict[str, object], key: str, default: None) -> int | None: ...
def _integer(where: str, table: dict[str, object], key: str, default: int | None) -> int | None:
    if key not in table:
        return default
    value = table[key]
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{where}.{key}: expected an integer, got a {_toml_type(value)}")
    return value


def _status(where: str, table: dict[str, object]) -> grpc.StatusCode | None:
    if "status" not in table:
        return None
    name = table["status"]
    if not isinstance(name, str):
        raise ValueError(f"{where}.status: expected a gRPC status code name, got a {_toml_type(name)}")
    if name not in _STATUSES:
        hint = " (OK is not a fault)" if name == "OK" else ""
        raise ValueError(f"{where}.status: unknown gRPC status code {name!r}{hint} (e.g. UNAVAILABLE, ABORTED)")
    return _STATUSES[name]


def _toml_type(value: object) -> str:
    names = {bool: "boolean", int: "integer", float: "float", str: "string", list: "array", dict: "table"}
    return names.get(type(value), type(value).__name__)


# -- running: one decision per call, then the delay, then the status ---------------


class Decider:
    """Whether each call of one method gets its fault. Seeded, the sequence
    of decisions is a function of the seed alone (every call draws once,
    whatever the probability), so a chaos run can be replayed exactly."""

    def __init__(self, fault: Fault) -> None:
        self.fault = fault
        self._random = random.Random(fault.seed)  # unseeded: fresh entropy

    def draw(self) -> bool:
        return self._random.random() < self.fault.probability


class FaultInjector(grpc.aio.ServerInterceptor):
    """Outermost interceptor: delays and fails the calls its plan names.

    Only unary-unary methods are touched, as only those carry contracts."""

    def __init__(self, plan: FaultPlan) -> None:
        self.plan = plan
        self._deciders = {method: Decider(fault) for method, fault in plan.faults.items()}

    async def intercept_service(
        self, continuation: Continuation, handler_call_details: grpc.HandlerCallDetails
    ) -> Handler | None:
        handler = await continuation(handler_call_details)
        decider = self._deciders.get(handler_call_details.method)
        if handler is None or decider is None or handler.unary_unary is None:
            return handler
        return grpc.unary_unary_rpc_method_handler(
            _faulty(decider, cast(AioBehavior, handler.unary_unary)),
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )


def _faulty(decider: Decider, behavior: AioBehavior) -> AioBehavior:
    fault = decider.fault

    async def faulty(request: Any, context: Context) -> Any:
        mark_arrival()  # an injected delay is server time: it spends the call's budget
        # Decided before sleeping, so the sequence follows arrival order.
        if not decider.draw():
            return await behavior(request, context)
        metrics.FAULTS_INJECTED.labels(fault.method).inc()
        if fault.delay_ms:
            await asyncio.sleep(fault.delay_ms / 1000)
        if fault.status is None:
            return await behavior(request, context)
        await _abort(context, fault)

    return faulty


async def _abort(context: Context, fault: Fault) -> NoReturn:
    status = fault.status
    assert status is not None, "only a fault with a status aborts its calls"
    message = f"fault injected on {fault.method}: {status.name}"
    reason = REASONS.get(status)
    if reason is None:
        await context.abort(status, message)
    else:
        outcome = failure(reason, message, metadata={"fault": "injected"})
        await context.abort(outcome.code, message, trailing_metadata=((STATUS_DETAILS, outcome.payload),))
    raise AssertionError("abort returns only by raising")
