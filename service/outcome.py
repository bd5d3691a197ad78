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
    """Error reasons of DESIGN.md, in the order they are checked: the first that
    applies wins (the gateway's checks, then validation, then the engine's,
    then the move's own).

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
    SKU_NOT_FOUND = (8, grpc.StatusCode.NOT_FOUND, False)
    RESERVATION_NOT_FOUND = (9, grpc.StatusCode.NOT_FOUND, False)
    HOLD_EXPIRED = (10, grpc.StatusCode.FAILED_PRECONDITION, True)
    INVALID_TRANSITION = (11, grpc.StatusCode.FAILED_PRECONDITION, True)
    INSUFFICIENT_STOCK = (12, grpc.StatusCode.FAILED_PRECONDITION, True)
    STOCK_BELOW_COMMITTED = (13, grpc.StatusCode.FAILED_PRECONDITION, True)
    # Services built on the framework (holdfast.framework), fulfillment first.
    ENTITY_NOT_FOUND = (14, grpc.StatusCode.NOT_FOUND, False)
    WAYBILL_NOT_FOUND = (15, grpc.StatusCode.NOT_FOUND, False)
    # Another holder's lease on the entity has not run out: retry after it.
    LEASE_HELD = (16, grpc.StatusCode.ABORTED, False)
    # This caller's lease ran out and another move took the entity over.
    LEASE_LOST = (17, grpc.StatusCode.ABORTED, True)
    # The contract's fixed delay since the previous attempt has not passed.
    RETRY_TOO_SOON = (18, grpc.StatusCode.FAILED_PRECONDITION, False)
    # It may be confirmed later, so the answer is not recorded.
    RESERVATION_NOT_CONFIRMED = (19, grpc.StatusCode.FAILED_PRECONDITION, False)
    # A carrier refused the attempt (or did not answer within the lease);
    # the next attempt, with the next number, may succeed.
    CARRIER_REFUSED = (20, grpc.StatusCode.ABORTED, True)
    # An acknowledgement that came before its dispatch had committed (a
    # carrier's callback racing the settlement): not recorded, so the same
    # call succeeds once the waybill is DISPATCHED.
    WAYBILL_NOT_DISPATCHED = (21, grpc.StatusCode.FAILED_PRECONDITION, False)
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
    each have a reason of one name. The domain `holdfast` is holdfast's own.
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
            raise TypeError(f"{cls.__name__}: the domain {DOMAIN!r} is holdfast's own")
        claimed = _APP_DOMAINS.get(domain)
        if claimed is not None and claimed.__qualname__ != cls.__qualname__:
            raise TypeError(f"{cls.__name__}: the domain {domain!r} is {claimed.__qualname__}'s")
        cls._domain_ = domain
        _APP_DOMAINS[domain] = cls

    @property
    def domain(self) -> str:
        return type(self)._domain_


_DOMAIN_SHAPE = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*")
_APP_DOMAINS: dict[str, type[AppReason]] = {}
AnyReason = Reason | AppReason


def reason_key(reason: AnyReason) -> str:
    """How a recorded reason is stored under its key: holdfast's by name (as
    every store written so far holds them), an app's as `domain/NAME`."""
    return reason.name if isinstance(reason, Reason) else f"{reason.domain}/{reason.name}"


def reason_named(key: str) -> AnyReason:
    """The reason `reason_key` stored; KeyError when no loaded app declares it
    (the app that recorded it is not hosted)."""
    domain, slash, name = key.rpartition("/")
    if not slash:
        return Reason[name]
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
