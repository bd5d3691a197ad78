"""What one call carries, and which call this task serves.

The gateway (holdfast.gateway, server layer) builds a `Call` from the
method's contract for every call and makes it current with `serving`; a
servicer and the framework's `Service.move` read it with `current_call`. The
key a call is recorded under is `idempotency_key`: the core derives entity
ids and timeout keys from it, so it lives here, below the gateway, and never
changes.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
from collections.abc import Iterator
from dataclasses import dataclass

from holdfast.contracts.contract import Contract


@dataclass(frozen=True, slots=True)
class Call:
    """What the gateway knows about one call; the servicer's only input besides the request."""

    contract: Contract
    key: bytes
    fingerprint: bytes
    context_id: str
    deadline: float  # time.monotonic() seconds


_current: contextvars.ContextVar[Call] = contextvars.ContextVar("holdfast_call")


def current_call() -> Call:
    """The call being served by this task; set by the gateway."""
    return _current.get()


@contextlib.contextmanager
def serving(call: Call) -> Iterator[None]:
    """Makes `call` the current call for the block: how the gateway hands a
    call to the servicer, and how a simulation drives the servicer without gRPC."""
    token = _current.set(call)
    try:
        yield
    finally:
        _current.reset(token)


# json.dumps(..., ensure_ascii=False) builds a new encoder on every call;
# this one encodes exactly the same, once built.
_KEY_ENCODER = json.JSONEncoder(ensure_ascii=False)


def idempotency_key(method: str, values: tuple[object, ...]) -> bytes:
    """Method-scoped, so two methods called on one entity never collide;
    JSON-encoded, so no choice of field values can make two keys collide.
    Stored keys and the ids derived from them depend on it: it never changes."""
    return hashlib.sha256(_KEY_ENCODER.encode([method, *values]).encode()).digest()
