"""Workloads: what an app ships so that `holdfast simulate` can run it.

A workload is the app's half of a simulation; the world (holdfast.simulate)
is the other half, the same for every app: one seeded random source, a
business clock, the in-memory store with its injected faults, crashes and
restarts, a client that loses, repeats and reorders what it sends, and the
reaper. The workload says

* which services a process hosts (`host`), made again after every crash,
  reporting the moves time makes (the reaper's) through `seen`;
* which calls a client makes (`request`), drawn from the world's random
  source only, so a seed replays exactly;
* how to make a request on the hosted services (`call`);
* what its books must satisfy: its `auditor` (holdfast.auditor) judges
  every answer as it comes, the touched rows after every step, and every
  row every few hundred steps and at the end.

`AppWorkload` does the parts every framework service shares (calls through
the gateway's own `Call`, timeouts made again by the service), so an app's
workload is its services, its client's draws and its auditor. Run one with
`holdfast simulate --app MODULE:ATTR`, ATTR being the workload class.

This module is what a team's workload imports (examples/tables/workload.py):
besides its own names it offers the auditor's (`EntityAuditor`, `Request`,
`require`, ...), so one import serves, as `import holdfast` serves a service.
"""

from __future__ import annotations

import hashlib
import random
from typing import Callable, Iterable, Protocol, Sequence, TypeVar, runtime_checkable

from google.protobuf.message import Message

from holdfast.auditor import TRANSIENT, Auditor, Books, EntityAuditor, Kind, Request, Violation, require
from holdfast.clock import ManualClock
from holdfast.contracts.contract import Contract, of_service
from holdfast.engine import Engine
from holdfast.framework import Service
from holdfast.call import Call, idempotency_key, serving
from holdfast.memory import Changes, Rows
from holdfast.outcome import Outcome

__all__ = [
    "AppWorkload", "Auditor", "Books", "Client", "EntityAuditor", "Kind", "Request", "Seen", "TRANSIENT", "Violation",
    "Workload", "WorkloadFactory", "call_of", "contracts_of", "observed", "request_of", "require", "timeout_method",
]

# A move made by time (or recovery), reported with its answer, as if a request
# nobody sent had been answered.
Seen = Callable[[Request, Outcome], None]
S = TypeVar("S", bound=Service)


class Client(Protocol):
    """What a workload draws its calls from, shared with the world so that one
    seed decides everything: the random source, the business clock, and the
    requests sent lately (a late delivery, or a key to reuse, picks one)."""

    rng: random.Random
    clock: ManualClock
    sent: Sequence[Request]


@runtime_checkable
class Workload(Protocol):
    """An app's workload; made once per simulation as `Workload(client)`."""

    auditor: Auditor

    def host(self, engine: Engine, seen: Seen) -> Sequence[Service]:
        """The services of a fresh process over `engine`."""
        ...

    def request(self) -> Request:
        """One new call of the client's."""
        ...

    async def call(self, request: Request) -> Outcome:
        """Makes `request` on the services last hosted: a call, or a move made
        by time made again (its first attempt's answer was not seen)."""
        ...

    def tear(self, rows: Rows) -> Changes:
        """A crash that leaves a half-done write in `rows` (a writer that
        persists an intent before its effect), or nothing; what it changed."""
        ...


WorkloadFactory = Callable[[Client], Workload]


# -- requests as a client builds them ---------------------------------------------------


def contracts_of(service: type[Service]) -> dict[str, Contract]:
    """A service's contracts by method name (`Book`), read from its compiled `.proto`."""
    return {c.method.rsplit("/", 1)[1]: c for c in of_service(service.DESCRIPTOR).values()}


def call_of(contract: Contract, message: Message) -> Call:
    """The `Call` the gateway would hand the servicer: its key and fingerprint
    from the same public derivation (`idempotency_key`, sha256 of the
    deterministic encoding). No deadline: budgets are wall-clock time, which a
    simulation never reads, and the simulated store ignores them."""
    fingerprint = hashlib.sha256(message.SerializeToString(deterministic=True)).digest()
    values = tuple(getattr(message, name) for name in contract.idempotency_key)
    assert all(value not in ("", 0) for value in values), "the simulated client always sets its key fields"
    key = idempotency_key(contract.method, values)
    return Call(contract, key, fingerprint, hashlib.sha256(b"context:" + key).hexdigest()[:32], float("inf"))


def request_of(call: Call, message: Message, touches: Iterable[str] = ()) -> Request:
    """The request of `call`, which may change the rows `touches` names."""
    return Request(call.contract.method.rsplit("/", 1)[1], message, call.key, call.fingerprint, tuple(touches), call=call)


# -- moves made by time ---------------------------------------------------------------------


def timeout_method(service: type[Service]) -> str:
    """The method name of a framework service's timeout moves (its
    `Service.timeout`), which a workload's auditor names them by."""
    return f"holdfast.timeout/{service.MACHINE.name}"


def observed(service: type[S], seen: Seen) -> type[S]:
    """`service` with each timeout move it makes reported to `seen`, as a
    request `(timeout_method, entity)` answered: the reaper's moves change
    entities as much as a client's do, and the auditor must hear of them."""
    method = timeout_method(service)

    async def timeout(self: Service, entity_id: str, version: int) -> Outcome:
        outcome = await service.timeout(self, entity_id, version)
        key = idempotency_key(method, (entity_id, version))
        seen(Request(method, None, key, key, (entity_id,), (entity_id, version)), outcome)
        return outcome

    return type(f"Observed{service.__name__}", (service,), {"timeout": timeout, "__doc__": observed.__doc__})


class AppWorkload:
    """A workload's common parts for services built on the framework: the
    client's random source and clock, the hosted services, and `call`.
    Subclasses set `auditor` and define `host` (remembering what it made in
    `self.services`) and `request`."""

    auditor: Auditor

    def __init__(self, client: Client) -> None:
        self.client = client
        self.rng = client.rng
        self.clock = client.clock
        self.services: Sequence[Service] = ()
        self._once: dict[object, Request] = {}

    def host(self, engine: Engine, seen: Seen) -> Sequence[Service]:
        raise NotImplementedError

    def request(self) -> Request:
        raise NotImplementedError

    async def call(self, request: Request) -> Outcome:
        if request.call is None:  # a timeout move made again: its subject is (entity_id, version)
            service = self._hosted(lambda s: timeout_method(type(s)) == request.method, request.method)
            return await service.timeout(*request.subject)
        name = request.call.contract.method.split("/")[1]
        service = self._hosted(lambda s: s.name == name, name)
        with serving(request.call):
            return await getattr(service, request.method)(request.message, None)

    def tear(self, rows: Rows) -> Changes:
        """Nothing: a framework entity is written whole, in one transaction."""
        return Changes()

    def once(self, what: object, build: Callable[[], Request]) -> Request:
        """The one request the client sends for `what` (a key), built the first
        time and sent again as it is: two payloads under one unresolved key
        could never be told apart."""
        request = self._once.get(what)
        if request is None:
            request = self._once[what] = build()
        return request

    def _hosted(self, serves: Callable[[Service], bool], what: str) -> Service:
        for service in self.services:
            if serves(service):
                return service
        raise LookupError(f"no hosted service makes {what} (does host() keep what it made in self.services?)")
