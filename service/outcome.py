"""Outcomes: every answer a move can give, one enum, mapped to gRPC in one place.

A failure is a value, not an exception: the engine records some outcomes under
the idempotency key and replays them byte for byte, so an outcome carries its
encoded payload (the reply, or the `google.rpc.Status` of the error) from the
moment it is made.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, replace
from typing import ClassVar, Iterable, Mapping

import grpc
from google.protobuf import any_pb2
from google.protobuf.message import Message
from google.rpc import error_details_pb2, status_pb2

DOMAIN = "holdfast"


class Reason(enum.Enum):
    """The framework's error reasons of DESIGN.md, in the order they are
    checked: the first that applies wins (the gateway's checks, then
    validation, then the engine's, then the move's own). The built-in apps'
    reasons (INSUFFICIENT_STOCK, CARRIER_REFUSED, …) are in the same domain
    `holdfast` but declared by their apps, as `AppReason`s.

    Each value is (rank, gRPC status, recorded under the idempotency key); the
    rank keeps reasons that share a status distinct members. Recorded
    reasons depend on state, so a retry must see the same answer even after the
    state changes (an INSUFFICIENT_STOCK stays one after a restock); the others
    say nothing happened, so a retry may well succeed.
    """

    CONTRACT_VIOLATION = (1, grpc.StatusCode.INVALID_ARGUMENT, False)
    INVALID_REQUEST = (2, grpc.StatusCode.INVALID_ARGUMENT, False)
    REQUEST_IN_FLIGHT = (3, grpc.StatusCode.ABORTED, False)
    BUDGET_EXCEEDED = (4, grpc.StatusCode.DEADLINE_EXCEEDED, False)
    DEPENDENCY_UNAVAILABLE = (5, grpc.StatusCode.UNAVAILABLE, False)
    IDEMPOTENCY_KEY_REUSED = (6, grpc.StatusCode.ALREADY_EXISTS, False)
    VERSION_CONFLICT = (7, grpc.StatusCode.ABORTED, False)
    # The gaps in the ranks (8, 9, 12, 13, 15, 19-21) are the built-in apps'
    # reasons, declared in their apps now; no member's value changed.
    HOLD_EXPIRED = (10, grpc.StatusCode.FAILED_PRECONDITION, True)
    INVALID_TRANSITION = (11, grpc.StatusCode.FAILED_PRECONDITION, True)
    # Services built on the framework (holdfast.framework).
    ENTITY_NOT_FOUND = (14, grpc.StatusCode.NOT_FOUND, False)
    # Another holder's lease on the entity has not run out: retry after it.
    LEASE_HELD = (16, grpc.StatusCode.ABORTED, False)
    # This caller's lease ran out and another move took the entity over.
    LEASE_LOST = (17, grpc.StatusCode.ABORTED, True)
    # The contract's fixed delay since the previous attempt has not passed.
    RETRY_TOO_SOON = (18, grpc.StatusCode.FAILED_PRECONDITION, False)
    # Refused before the call reaches the gateway (service/security.py,
    # service/limits.py), so checked before every reason above, in this
    # order; nothing ran, so nothing is recorded. Ranked after the others
    # only so that no existing member's value changes.
    # No bearer token, a malformed one, or one the token file does not hold.
    UNAUTHENTICATED = (22, grpc.StatusCode.UNAUTHENTICATED, False)
    # A known token whose roles do not include the one the method needs.
    PERMISSION_DENIED = (23, grpc.StatusCode.PERMISSION_DENIED, False)
    # The server's bound on concurrent calls is reached: retry after the
    # pushback the answer carries (trailing `grpc-retry-pushback-ms`).
    OVERLOADED = (24, grpc.StatusCode.RESOURCE_EXHAUSTED, False)
    # The call's idempotency key was used before, longer ago than the
    # server's retention (holdfast.retention): its outcome was pruned, so it
    # is neither replayed nor run again. A new request takes a new key.
    IDEMPOTENCY_KEY_EXPIRED = (25, grpc.StatusCode.FAILED_PRECONDITION, False)

    @property
    def code(self) -> grpc.StatusCode:
        return self.value[1]

    @property
    def recorded(self) -> bool:
        return self.value[2]

    @property
    def domain(self) -> str:
        return DOMAIN


class AppReason(enum.Enum):
    """Base of an app's own failure reasons, in the app's own ErrorInfo
    domain. Each member is `(gRPC status, recorded under the key)`, and the
    members rank in the order they are declared:

        class SpotReason(holdfast.AppReason, domain="spots.parking.example.com"):
            SPOT_HELD = (grpc.StatusCode.FAILED_PRECONDITION, True)
            DRIVER_UNKNOWN = (grpc.StatusCode.NOT_FOUND, False)

    A recorded one is stored under the call's key by (domain, name), and a
    replay finds it again by the same pair (`reason_named`), so two apps may
    each have a reason of one name.

    The domain `holdfast` is holdfast's own: only a class declared in a module
    of holdfast's own apps package (`holdfast.apps.…`, as
    `InventoryReason` in holdfast.apps.inventory) may take it, so a team's app,
    even one copied from a built-in app, is told so rather than answering in
    holdfast's name. Several such classes share the domain, so a name of
    theirs is unique across `Reason` and all of them, and they are stored by
    bare name, as they were when `Reason` held them.
    """

    code: grpc.StatusCode
    recorded: bool
    _domain_: ClassVar[str]

    def __new__(cls, code: grpc.StatusCode, recorded: bool) -> AppReason:
        if not isinstance(code, grpc.StatusCode) or code is grpc.StatusCode.OK:
            raise TypeError(f"{cls.__name__}: a reason's status is a gRPC error status, got {code!r}")
        if not isinstance(recorded, bool):
            raise TypeError(f"{cls.__name__}: `recorded` is True or False, got {recorded!r}")
        member = object.__new__(cls)
        member._value_ = len(cls._member_names_) + 1  # declaration order is the rank, and keeps members apart
        member.code = code
        member.recorded = recorded
        return member

    def __init_subclass__(cls, *, domain: str = "", **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        if not _DOMAIN_SHAPE.fullmatch(domain):
            raise TypeError(f"{cls.__name__}: declare the reasons' ErrorInfo domain, as `domain=\"your.service\"`"
                            f" (a DNS-like name), got {domain!r}")
        if domain == DOMAIN:
            _declare_holdfasts_own(cls)
        else:
            claimed = _APP_DOMAINS.get(domain)
            if claimed is not None and claimed.__qualname__ != cls.__qualname__:
                raise TypeError(f"{cls.__name__}: the domain {domain!r} is {claimed.__qualname__}'s")
            _APP_DOMAINS[domain] = cls
        cls._domain_ = domain

    @property
    def domain(self) -> str:
        return type(self)._domain_


_DOMAIN_SHAPE = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")
_APP_DOMAINS: dict[str, type[AppReason]] = {}
# Where holdfast's own apps live: the one place a class may take the domain
# `holdfast`. A module's name is not something an app sets by accident.
_OWN_APPS_PACKAGE = "holdfast.apps."
# The reasons of holdfast's own apps by name: their domain is `holdfast`, so
# they are stored, and found again, by name alone.
_OWN_REASONS: dict[str, AppReason] = {}
AnyReason = Reason | AppReason


def _declaration(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def _declare_holdfasts_own(cls: type[AppReason]) -> None:
    """Registers the reasons of one of holdfast's own apps in the domain
    `holdfast`, whose names must not collide: a stored bare name has to mean
    one reason. Declaring the same class again (a module imported anew)
    replaces its reasons."""
    if not cls.__module__.startswith(_OWN_APPS_PACKAGE):
        raise TypeError(f"{cls.__name__}: the domain {DOMAIN!r} is holdfast's own")
    here = _declaration(cls)
    for name in cls._member_names_:
        if name in Reason.__members__:
            raise TypeError(f"{cls.__name__}: the reason {name} of the domain {DOMAIN!r} is Reason.{name}")
        taken = _OWN_REASONS.get(name)
        if taken is not None and _declaration(type(taken)) != here:
            raise TypeError(f"{cls.__name__}: the reason {name} of the domain {DOMAIN!r} is"
                            f" {_declaration(type(taken))}.{name}")
    for name in [name for name, member in _OWN_REASONS.items() if _declaration(type(member)) == here]:
        del _OWN_REASONS[name]
    for name in cls._member_names_:
        _OWN_REASONS[name] = cls[name]


def reason_key(reason: AnyReason) -> str:
    """How a recorded reason is stored under its key: one of the domain
    `holdfast` by name (as every store written so far holds them), an app's
    as `domain/NAME`."""
    return reason.name if reason.domain == DOMAIN else f"{reason.domain}/{reason.name}"


def reason_named(key: str) -> AnyReason:
    """The reason `reason_key` stored; KeyError when no loaded app declares it
    (the app that recorded it is not hosted)."""
    domain, slash, name = key.rpartition("/")
    if not slash:
        found: AnyReason | None = Reason.__members__.get(name)
        if found is None:
            found = _OWN_REASONS.get(name)
        if found is None:
            loaded = sorted({type(member).__module__ for member in _OWN_REASONS.values()})
            raise KeyError(f"no hosted app declares the reason {name!r} in the domain {DOMAIN!r}: the one of holdfast's"
                           f" own apps ({_OWN_APPS_PACKAGE}…) that does is not loaded (loaded: {', '.join(loaded) or 'none'})")
        return found
    declared = _APP_DOMAINS.get(domain)
    if declared is None:
        raise KeyError(f"no hosted app declares reasons in the domain {domain!r} (recorded {key!r})")
    return declared[name]


@dataclass(frozen=True, slots=True)
class Outcome:
    """A finished call: `reason` None is success.

    `payload` holds the serialized reply on success and the serialized
    `google.rpc.Status` on failure; these exact bytes go on the wire, and a
    replay sends them again.
    """

    reason: AnyReason | None
    payload: bytes
    replayed: bool = False

    @property
    def ok(self) -> bool:
        return self.reason is None

    @property
    def recorded(self) -> bool:
        return self.reason is None or self.reason.recorded

    @property
    def code(self) -> grpc.StatusCode:
        return grpc.StatusCode.OK if self.reason is None else self.reason.code

    def status(self) -> status_pb2.Status:
        assert self.reason is not None, "a success has no error status"
        return status_pb2.Status.FromString(self.payload)

    def as_replay(self) -> Outcome:
        return replace(self, replayed=True)


def success(reply: bytes) -> Outcome:
    return Outcome(None, reply)


def failure(
    reason: AnyReason,
    message: str,
    violations: Iterable[tuple[str, str]] = (),
    metadata: Mapping[str, str] | None = None,
) -> Outcome:
    """An error outcome whose payload is the `google.rpc.Status` a client reads
    with `grpc_status.rpc_status.from_call`."""
    status = status_pb2.Status(code=reason.code.value[0], message=message)
    info = error_details_pb2.ErrorInfo(reason=reason.name, domain=reason.domain, metadata=metadata or {})
    status.details.append(_pack(info))
    violations = tuple(violations)
    if violations:
        bad = error_details_pb2.BadRequest(
            field_violations=[
                error_details_pb2.BadRequest.FieldViolation(field=field, description=why)
                for field, why in violations
            ]
        )
        status.details.append(_pack(bad))
    return Outcome(reason, status.SerializeToString(deterministic=True))


def _pack(message: Message) -> any_pb2.Any:
    packed = any_pb2.Any()
    packed.Pack(message, deterministic=True)
    return packed
