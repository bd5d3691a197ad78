"""A service built on holdfast: the `Service` base class and the `Change` a
move decides, with the helpers a service's moves use (ids derived from keys,
leases, entity data). Exported by `holdfast` (service/__init__.py), which is
where a team imports them from.
"""

from __future__ import annotations

import asyncio
import enum
import functools
import json
import re
from dataclasses import dataclass, field
from typing import Any, Callable, ClassVar, Iterable, Mapping, TypeGuard, TypeVar, overload

import grpc
from google.protobuf import descriptor as _descriptor
from google.protobuf import message_factory as _message_factory
from google.protobuf.message import Message

from holdfast.contracts.contract import Contract, OnDuplicate, of_service
from holdfast.engine import Engine, Move
from holdfast.call import Call, current_call, idempotency_key
from holdfast.machine import Machine
from holdfast.outcome import Outcome, Reason, failure, success
from holdfast.store import ENTITIES, Entity, Txn
from holdfast.table import Query, Table

ID_LENGTH_MAX = 128
M = TypeVar("M", bound=Message)


@dataclass(frozen=True, slots=True)
class Change:
    """What a move decided: walk `events` from the entity's state (the table
    must allow every step), store `data` as its new fields, and answer.

    The answer is `reply(entity)` (the reply message, built from the entity
    as stored), or `refusal` when the change is itself the end of a failed
    attempt (it must be a recorded reason: the change is written and the
    same refusal replayed). `lease_owner` holds the entity's lease for the
    method's contract `lock_ttl_ms` from now; "" releases it. `due_at_ms`
    schedules the entity's timeout event; 0 clears it.
    """

    events: tuple[str, ...]
    data: bytes | Message  # the app's proto message, or bytes from encode_data
    reply: Callable[[Entity], Message] | None = None
    refusal: Outcome | None = None
    lease_owner: str = ""
    due_at_ms: int = 0

    def __post_init__(self) -> None:
        assert self.events, "a change walks at least one event"
        assert (self.reply is None) != (self.refusal is None), "a change answers with a reply or a refusal"
        assert self.refusal is None or (not self.refusal.ok and self.refusal.recorded), (
            "a change that refuses writes, so its refusal must be recorded to replay the same"
        )


Decide = Callable[[Entity | None, int], "Change | Outcome"]


def derive_id(prefix: str, key: bytes) -> str:
    """An entity id derived from the idempotency key of the call that creates
    it, so a retry, a replay or another instance names the same entity."""
    return f"{prefix}_{key.hex()[:24]}"


def shown_id(value: str) -> str:
    """An id as quoted in an error: a hostile length must not push the status
    details past gRPC's metadata limit and cost the client its answer."""
    return value if len(value) <= ID_LENGTH_MAX else value[:ID_LENGTH_MAX] + "…"


def lease_held(entity: Entity | None, now_ms: int) -> TypeGuard[Entity]:
    """True while someone's lease on `entity` has not run out (so there is
    an entity: a type checker knows it after a check)."""
    return entity is not None and bool(entity.lease_owner) and now_ms < entity.lease_until_ms


def encode_data(fields: Mapping[str, Any] | Message) -> bytes:
    """An entity's data as bytes that are the same on every instance, so
    stored rows and replies stay deterministic: the app's own proto message
    (serialized deterministically; what a team should use: typed, and
    readable by its other-language tools), or a mapping as canonical JSON."""
    if isinstance(fields, Message):
        return fields.SerializeToString(deterministic=True)
    return json.dumps(fields, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


@overload
def decode_data(data: bytes) -> dict[str, Any]: ...
@overload
def decode_data(data: bytes, message: type[M]) -> M: ...
def decode_data(data: bytes, message: type[M] | None = None) -> dict[str, Any] | M:
    """An entity's data as `encode_data` made it: the app's proto `message`
    when one is given, else the JSON mapping."""
    if message is not None:
        return message.FromString(data)
    fields: dict[str, Any] = json.loads(data)
    return fields


def states_of(enum_type: Any, name: str | None = None) -> type[enum.IntEnum]:
    """A machine's states from the proto enum its replies carry, so the
    numbers are the wire's by construction. buf-style names lose their
    prefix and the zero value is left out (no entity is ever in it):
    `BookingState { BOOKING_STATE_UNSPECIFIED = 0; BOOKING_STATE_NEW = 1; …}`
    gives `NEW = 1, …`. `enum_type` is the generated enum (`pb.BookingState`)
    or its descriptor."""
    descriptor = getattr(enum_type, "DESCRIPTOR", enum_type)
    if not isinstance(descriptor, _descriptor.EnumDescriptor):
        raise TypeError(f"states_of needs a generated proto enum, got {enum_type!r}")
    prefix = _SNAKE.sub("_", descriptor.name).upper() + "_"
    members = {value.name.removeprefix(prefix): value.number for value in descriptor.values if value.number != 0}
    if not members:
        raise ValueError(f"{descriptor.full_name} has no value but 0: a machine needs states")
    return enum.IntEnum(name or descriptor.name, members)  # type: ignore[return-value]


_SNAKE = re.compile(r"(?<=[a-z0-9])(?=[A-Z])")


def text_violations(
    request: Message, required: Iterable[str] = (), optional: Iterable[str] = (), length_max: int = ID_LENGTH_MAX
) -> list[tuple[str, str]]:
    """BadRequest field violations of a request's text fields, in the order
    named: each required one set, every one at most `length_max` characters
    and free of control characters. The field names are the proto's, as a
    client reads them back."""
    required = tuple(required)
    violations = []
    for name in (*required, *optional):
        value = getattr(request, name)
        if name in required and not value:
            violations.append((name, f"{name} must be set"))
        elif len(value) > length_max:
            violations.append((name, f"{name} is longer than {length_max} characters"))
        elif _CONTROL.search(value):
            violations.append((name, f"{name} must not contain control characters"))
    return violations


_CONTROL = re.compile("[\x00-\x1f\x7f]")


def invalid(violations: Iterable[tuple[str, str]]) -> Outcome:
    """INVALID_REQUEST with its BadRequest field violations; the message
    joins their descriptions. Nothing is recorded: a corrected retry runs."""
    violations = list(violations)
    assert violations, "an invalid request names what is wrong with it"
    return failure(Reason.INVALID_REQUEST, "; ".join(why for _, why in violations), violations)


@dataclass(slots=True)
class _Bound:
    """A service's contracts and request classes, read from its descriptor when it is made."""

    contracts: dict[str, Contract]
    requests: dict[str, type[Message]] = field(default_factory=dict)


class Service:
    """Base of a servicer built on the framework.

    Subclasses set `DESCRIPTOR` (the `.proto`'s ServiceDescriptor) and
    `MACHINE`, and define one `async def Method(self, request, context) ->
    Outcome` per RPC. The gateway (holdfast.gateway) turns outcomes into
    replies and statuses and sets `current_call()` for every call.
    """

    DESCRIPTOR: ClassVar[_descriptor.ServiceDescriptor]
    MACHINE: ClassVar[Machine[Any]]
    # Entity ids this service creates start with this and "_".
    ID_PREFIX: ClassVar[str] = ""
    # Tables of its own (holdfast.table), beside the framework's entity rows
    # that `move` works on: the server creates them in the store it opens.
    tables: ClassVar[tuple[Table[Any], ...]] = ()
    # RPC names (`PutStock`) only the `admin` role may call when the server
    # checks tokens (holdfast.security); every other RPC needs `client`. The
    # server collects them from what it hosts, so no layer below names them.
    admin_methods: ClassVar[tuple[str, ...]] = ()
    # The workload `holdfast simulate --app` runs for this service
    # (holdfast.workload), as "MODULE:ATTR"; named, not imported, so that
    # serving never imports the simulation. None: the app ships none.
    workload: ClassVar[str | None] = None
    # The checks `holdfast verify --app` runs over this service's own rows
    # (holdfast.verify), as "MODULE:ATTR": a class made with no arguments,
    # with `async check(books)` and `owner(key, reason, payload)`. None: the
    # framework's checks alone.
    verifier: ClassVar[str | None] = None
    # How `holdfast replay` reads the timed moves this service journaled
    # under a kind of line of their own in an older journal format: kind ->
    # the field naming the entity (inventory's format-1 `expire` lines).
    legacy_timeouts: ClassVar[Mapping[str, str]] = {}

    def __init__(self, engine: Engine) -> None:
        self.engine = engine
        self._bound = _bind(self.DESCRIPTOR)

    @classmethod
    def from_settings(cls, engine: Engine, settings: Mapping[str, Any]) -> Service:
        """How `holdfast serve --app MODULE:ATTR` makes the service: with the
        engine (the store and the snapshot, open) and the server's settings
        (`--setting NAME=VALUE`, and the built-in apps' own flags), which a
        service reads what it needs from and ignores the rest of. The
        journal records the settings, so a replay makes it the same way. By
        default `cls(engine)`."""
        return cls(engine)

    @property
    def name(self) -> str:
        """The service's full proto name, e.g. `holdfast.fulfillment.v1.DispatchService`."""
        return self.DESCRIPTOR.full_name

    @property
    def contracts(self) -> dict[str, Contract]:
        """Every RPC's contract, by gRPC path, read from the compiled `.proto`."""
        return self._bound.contracts

    def contract(self, method: str) -> Contract:
        """The contract of RPC `method` (its name, e.g. `Dispatch`)."""
        return self._bound.contracts[f"/{self.name}/{method}"]

    def method_handlers(self) -> dict[str, grpc.RpcMethodHandler[Any, Any]]:
        """Method handlers by name; the servicer's replies are already bytes."""
        handlers: dict[str, grpc.RpcMethodHandler[Any, Any]] = {}
        for method in self.DESCRIPTOR.methods:
            handler = getattr(self, method.name, None)
            assert handler is not None, f"{type(self).__name__} does not implement {self.name}/{method.name}"
            handlers[method.name] = grpc.unary_unary_rpc_method_handler(
                handler, request_deserializer=self._bound.requests[method.name].FromString
            )
        return handlers

    # -- moves -----------------------------------------------------------------

    async def move(
        self, entity_id: str, decide: Decide, *, owner: str = "", call: Call | None = None
    ) -> Outcome:
        """Runs the current call's move on `entity_id`.

        `owner` is who asks: a move on an entity whose lease another owner
        holds is refused (LEASE_HELD) before `decide` runs. `call` defaults to
        the call being served; a call made of several moves passes its own
        (another key) for the steps that are not its answer.
        """
        call = call or current_call()
        return await self._run(
            call.contract.method, call.key, call.fingerprint, entity_id, decide, owner, call.contract.lock_ttl_ms,
            call.deadline, call.contract.on_duplicate,
        )

    # -- timeout events --------------------------------------------------------

    # Events fired by time: an entity in one of these states whose `due_at_ms`
    # (set by `Change.due_at_ms`) has passed gets the event, as an ordinary
    # move, from the server's reaper.
    TIMEOUTS: ClassVar[Mapping[Any, str]] = {}

    def render(self, entity: Entity) -> Message:
        """The reply message for `entity`: what a timeout move records."""
        raise NotImplementedError(f"{type(self).__name__} declares TIMEOUTS but no render()")

    def on_timeout(self, entity: Entity, event: str, now_ms: int) -> Change | Outcome:
        """The change a timeout event makes; by default the event alone, with
        the entity's data unchanged and its timer cleared."""
        return Change((event,), entity.data, reply=self.render)

    async def reap(self, now_ms: int, batch: int) -> int:
        """The moves time has made due by `now_ms` (at most `batch`), made by
        the server's reaper; returns how many moved. By default the TIMEOUTS
        of entities whose `due_at_ms` has passed; an app with other timed
        work (inventory's hold expiry) overrides it, and makes each move
        through `timeout`, so the journal records it."""
        if not self.TIMEOUTS:
            return 0
        kind = self.MACHINE.name
        due = await self.engine.store.transact(lambda txn: txn.due_entities(kind, now_ms, batch))
        outcomes = await asyncio.gather(*(self.timeout(entity.entity_id, entity.version) for entity in due))
        return sum(1 for outcome in outcomes if outcome.ok)

    async def recover(self, batch: int) -> int:
        """Resolves what a crashed writer left half-done, at start-up, before
        any call is served; returns how many moves that took. Framework
        entities are written whole in one transaction, so by default none."""
        return 0

    def prune(self, txn: Txn, now_ms: int, before_ms: int, limit: int) -> list[tuple[Table[Any], str]]:
        """Deletes about `limit` of this service's rows that no move will
        change again and that settled before `before_ms` (the server's
        retention before `now_ms`); returns what it deleted, so the snapshot
        forgets it. A record made after its entity settled (a timed move's)
        is buried with it (`txn.bury_outcome`) by an app that knows its key. Run by holdfast.retention inside its own transaction, on the
        store's thread. By default the service's entities in a terminal
        state of its machine that last moved before `before_ms`; an app with
        tables of its own (inventory's reservations) overrides it."""
        machine = self.MACHINE
        if not machine.terminal:
            return []
        settled = txn.select(ENTITIES, _settled_entities(len(machine.terminal)),
                             (machine.name, *sorted(int(state) for state in machine.terminal), before_ms), limit)
        return [(ENTITIES, entity.entity_id) for entity in settled if txn.delete(ENTITIES, entity.entity_id)]

    async def timeout(self, entity_id: str, version: int) -> Outcome:
        """One move made by time, not by a call: the entity's timeout event,
        keyed by (machine, entity, version), so it happens once however many
        reapers see it and not at all once the entity has moved on (answered
        VERSION_CONFLICT, nothing written). Every timed move goes through
        here: `holdfast serve --journal` records each call of it, and
        `holdfast replay` makes it again at its place in the journal."""
        key = idempotency_key(f"holdfast.timeout/{self.MACHINE.name}", (entity_id, version))
        timeouts, machine = self.TIMEOUTS, self.MACHINE

        def decide(entity: Entity | None, now_ms: int) -> Change | Outcome:
            event = None if entity is None else timeouts.get(machine.states(entity.state))
            if entity is None or entity.version != version or event is None or not 0 < entity.due_at_ms <= now_ms:
                return failure(Reason.VERSION_CONFLICT, f"{shown_id(entity_id)} moved on before its timeout fired")
            return self.on_timeout(entity, event, now_ms)

        return await self._run(f"holdfast.timeout/{machine.name}", key, key, entity_id, decide, "", 0, None,
                               OnDuplicate.REFUSE)

    async def _run(
        self, method: str, key: bytes, fingerprint: bytes, entity_id: str, decide: Decide, owner: str, ttl_ms: int,
        deadline: float | None, on_duplicate: OnDuplicate,
    ) -> Outcome:
        machine = self.MACHINE

        def apply(txn: Txn, now_ms: int) -> Outcome:
            return _apply(txn, machine, entity_id, decide, now_ms, owner, ttl_ms)

        move = Move(method, key, fingerprint, entity_id, apply, on_duplicate=on_duplicate)
        return await self.engine.move(move, deadline)

    async def read(self, entity_id: str, render: Callable[[Entity], Message], not_found: Outcome) -> Outcome:
        """A read-only answer: `render(entity)`, or `not_found`."""

        def read(txn: Txn, now_ms: int) -> Outcome:
            found = txn.entity(entity_id)
            if found is None or found.kind != self.MACHINE.name:
                return not_found
            return success(render(found).SerializeToString(deterministic=True))

        return await self.engine.read(read, current_call().deadline)

    async def recorded(self, call: Call | None = None) -> Outcome | None:
        """The outcome recorded under the call's key, if any: a call made of
        several moves checks this first, so a retry redoes none of them."""
        call = call or current_call()
        return await self.engine.recorded(call.key, call.fingerprint, call.deadline)


def _apply(
    txn: Txn, machine: Machine[Any], entity_id: str, decide: Decide, now_ms: int, owner: str, ttl_ms: int
) -> Outcome:
    """One move on a generic entity, inside its store transaction."""
    current = txn.entity(entity_id)
    if current is not None and current.kind != machine.name:
        return failure(Reason.ENTITY_NOT_FOUND, f"{shown_id(entity_id)} is not a {machine.name} entity")
    if lease_held(current, now_ms) and current.lease_owner != owner:
        return failure(
            Reason.LEASE_HELD,
            f"{shown_id(entity_id)} is leased to {current.lease_owner} until {current.lease_until_ms}; retry after it",
            metadata={"lease_owner": current.lease_owner, "lease_until_ms": str(current.lease_until_ms)},
        )
    decided = decide(current, now_ms)
    if isinstance(decided, Outcome):
        return decided
    state = machine.initial if current is None else machine.states(current.state)
    after = machine.walk(state, decided.events)
    if after is None:
        return failure(
            Reason.INVALID_TRANSITION,
            f"{shown_id(entity_id)} is {state.name}: {' then '.join(decided.events)} is not allowed from there",
            metadata={"entity_id": shown_id(entity_id), "state": state.name},
        )
    version = 0 if current is None else current.version
    lease_until = now_ms + ttl_ms if decided.lease_owner else 0
    assert not decided.lease_owner or ttl_ms > 0, "a lease needs the contract's lock_ttl_ms"
    data = decided.data if isinstance(decided.data, bytes) else encode_data(decided.data)
    saved = Entity(entity_id, machine.name, int(after), version + 1, data,
                   decided.lease_owner, lease_until, decided.due_at_ms, now_ms)
    txn.save_entity(saved, version)
    if decided.refusal is not None:
        return decided.refusal
    assert decided.reply is not None
    return success(decided.reply(saved).SerializeToString(deterministic=True))


@functools.cache
def _settled_entities(terminal: int) -> Query[Entity]:
    """A machine's entities in one of its `terminal` states (that many of
    them, as parameters after the kind) that last moved before a time."""
    marks = ", ".join(["%s"] * terminal)
    return Query(
        where=f"kind = %s AND state IN ({marks}) AND updated_at_ms < %s",
        order_by="updated_at_ms, entity_id",
        matches=lambda e, params: e.kind == params[0] and e.state in params[1:-1] and e.updated_at_ms < params[-1],
        order=lambda e: (e.updated_at_ms, e.entity_id),
    )


def _bind(service: _descriptor.ServiceDescriptor) -> _Bound:
    bound = _Bound(of_service(service))
    for method in service.methods:
        bound.requests[method.name] = _message_factory.GetMessageClass(method.input_type)
    return bound
