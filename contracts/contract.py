"""Contracts as data, read from compiled descriptors and nowhere else.

A second hand-written copy of a timeout or a key would drift from the proto;
reading the `(holdfast.contract.v1.contract)` method option at start-up means
the gateway enforces exactly what the linter checked.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from typing import Any

from google.protobuf import descriptor, descriptor_pb2

from holdfast.contract.v1 import contract_pb2

_SCALARS = frozenset(
    t for name, t in descriptor.FieldDescriptor.__dict__.items()
    if name.startswith("TYPE_") and name not in ("TYPE_MESSAGE", "TYPE_GROUP")
)


@dataclass(frozen=True, slots=True)
class Retry:
    max_attempts: int
    fixed_delay_ms: int
    retryable_codes: tuple[str, ...]


class OnDuplicate(enum.Enum):
    """What a call does while a call with its idempotency key runs (the
    contract's `on_duplicate`; the proto enum's numbers are the values)."""

    REFUSE = contract_pb2.ON_DUPLICATE_REFUSE  # REQUEST_IN_FLIGHT at once: today's answer, the default
    WAIT = contract_pb2.ON_DUPLICATE_WAIT  # the running call's recorded outcome, replayed, within its own budget


@dataclass(frozen=True, slots=True)
class Contract:
    """One RPC's contract. `method` is the gRPC path, `/pkg.Service/Method`."""

    method: str
    timeout_ms: int
    idempotency_key: tuple[str, ...]
    retry: Retry
    lock_ttl_ms: int
    sla: str
    mutating: bool
    on_duplicate: OnDuplicate = OnDuplicate.REFUSE

    @property
    def timeout_s(self) -> float:
        return self.timeout_ms / 1000


# protoc's .pyi types the extension as a plain FieldDescriptor, where
# types-protobuf wants its own extension descriptor type: read through Any.
_OPTION: Any = contract_pb2.contract


def method_path(method: descriptor.MethodDescriptor) -> str:
    return f"/{method.containing_service.full_name}/{method.name}"


def of_method(method: descriptor.MethodDescriptor) -> Contract | None:
    """The method's contract, or None when it declares none."""
    options = method.GetOptions()
    if not options.HasExtension(_OPTION):
        return None
    raw: contract_pb2.Contract = options.Extensions[_OPTION]
    no_side_effects = descriptor_pb2.MethodOptions.NO_SIDE_EFFECTS
    return Contract(
        method=method_path(method),
        timeout_ms=raw.timeout_ms,
        idempotency_key=tuple(raw.idempotency_key),
        retry=Retry(raw.retry.max_attempts, raw.retry.fixed_delay_ms, tuple(raw.retry.retryable_codes)),
        lock_ttl_ms=raw.lock_ttl_ms,
        sla=raw.sla,
        mutating=options.idempotency_level != no_side_effects,
        on_duplicate=_on_duplicate(method, raw.on_duplicate),
    )


def _on_duplicate(method: descriptor.MethodDescriptor, number: int) -> OnDuplicate:
    """proto3 enums are open: a number this holdfast does not know (a newer
    contract.proto's) is refused, never served as some other behaviour."""
    try:
        return OnDuplicate(number)
    except ValueError:
        raise ValueError(f"{method.full_name}: on_duplicate {number} is not one this holdfast knows"
                         f" ({', '.join(f'{m.name} = {m.value}' for m in OnDuplicate)})") from None


def of_service(service: descriptor.ServiceDescriptor) -> dict[str, Contract]:
    """Every method's contract by gRPC path; a method without one is an error.

    Serving an RPC with no budget and no key is exactly the bare-timeout guess
    holdfast exists to remove, so this refuses instead of defaulting.
    """
    contracts: dict[str, Contract] = {}
    for method in service.methods:
        found = of_method(method)
        if found is None:
            raise ValueError(f"{method.full_name} declares no (holdfast.contract.v1.contract) option")
        _check_key_fields(method, found)
        if found.on_duplicate is OnDuplicate.WAIT and not found.idempotency_key:
            # Without a key, the key is the request's fingerprint: two
            # callers sending the same bytes would be told one's answer.
            raise ValueError(f"{method.full_name}: on_duplicate WAIT needs idempotency_key fields")
        contracts[found.method] = found
    return contracts


def _check_key_fields(method: descriptor.MethodDescriptor, found: Contract) -> None:
    fields = method.input_type.fields_by_name
    for name in found.idempotency_key:
        field = fields.get(name)
        if field is None or field.type not in _SCALARS or field.is_repeated:
            raise ValueError(f"{method.full_name}: key field {name!r} is not a scalar of {method.input_type.full_name}")
