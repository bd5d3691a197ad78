"""holdfast: deterministic reservation services. This module is the public
API a team builds on; nothing outside `__all__` is promised, and the names
are pinned by tests/test_framework.py. The built-in apps (holdfast.apps)
and the tutorial's example (examples/tables) use nothing else.

A service built on holdfast is

* a `.proto` whose every RPC declares its contract (timeout, idempotency
  key fields, retry policy, lock lease), linted by `holdfast lint` and
  compiled by `holdfast codegen --protos DIR --out DIR`;
* a `Machine`: its states, the table of (source, event, destination), the
  initial and terminal states;
* a `Service` subclass with one async method per RPC. A mutating method
  validates its request, then calls `self.move(entity_id, decide)`, where
  `decide(entity, now_ms)` returns either an `Outcome` (a refusal: nothing
  is written) or a `Change` (the events to walk, the entity's new data and
  how to answer). holdfast does the rest in one store transaction: the
  replay of a recorded key, the snapshot's double check, the lease, the
  state check against the table, the compare-and-set on the version, the
  outcome recorded under the key;
* `holdfast serve --app MODULE:ATTR` to run it with every serve flag, or
  `start` in tests.

The names load on first use (PEP 562), so `import holdfast` alone imports
nothing but this file: the CLI, the lint and the generated code
(`holdfast.inventory.v1`) load without the runtime, and no app is imported
unless it is hosted.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from holdfast.call import Call, current_call, idempotency_key
    from holdfast.client import aio_channel, channel
    from holdfast.clock import Clock, ManualClock, SystemClock
    from holdfast.contracts.contract import Contract
    from holdfast.engine import Engine, Move
    from holdfast.framework import (
        Change,
        Service,
        decode_data,
        derive_id,
        encode_data,
        invalid,
        lease_held,
        shown_id,
        states_of,
        text_violations,
    )
    from holdfast.machine import Machine
    from holdfast.outcome import AppReason, Outcome, Reason, failure, success
    from holdfast.refusal import Refusal, refusal
    from holdfast.server import Config, Running, ServiceFactory, serve, start
    from holdfast.store import Entity, Txn
    from holdfast.table import Column, Query, Table

# Each public name and the module that defines it.
_HOMES = {
    # declaring a state machine
    "Machine": "holdfast.machine",
    # a service and its moves
    "Service": "holdfast.framework",
    "Change": "holdfast.framework",
    "Entity": "holdfast.store",
    "Outcome": "holdfast.outcome",
    "Reason": "holdfast.outcome",
    "AppReason": "holdfast.outcome",
    "success": "holdfast.outcome",
    "failure": "holdfast.outcome",
    "derive_id": "holdfast.framework",
    "shown_id": "holdfast.framework",
    "lease_held": "holdfast.framework",
    "encode_data": "holdfast.framework",
    "decode_data": "holdfast.framework",
    "states_of": "holdfast.framework",
    "text_violations": "holdfast.framework",
    "invalid": "holdfast.framework",
    # what a call carries (set by the gateway from the contract in the .proto)
    "Call": "holdfast.call",
    "Contract": "holdfast.contracts.contract",
    "current_call": "holdfast.call",
    "idempotency_key": "holdfast.call",
    # lower level: moves over the store's transaction
    "Engine": "holdfast.engine",
    "Move": "holdfast.engine",
    "Txn": "holdfast.store",
    # an app's own tables
    "Table": "holdfast.table",
    "Column": "holdfast.table",
    "Query": "holdfast.table",
    # what a client reads of a refusal (for tests above all)
    "Refusal": "holdfast.refusal",
    "refusal": "holdfast.refusal",
    # time
    "Clock": "holdfast.clock",
    "SystemClock": "holdfast.clock",
    "ManualClock": "holdfast.clock",
    # running a server: a team's services beside or instead of holdfast's
    "Config": "holdfast.server",
    "Running": "holdfast.server",
    "ServiceFactory": "holdfast.server",
    "start": "holdfast.server",
    "serve": "holdfast.server",
    # calling a service: channels that apply its generated service config
    # (the contracts' deadlines and retries; grpcio's own reading fires early)
    "channel": "holdfast.client",
    "aio_channel": "holdfast.client",
}

__all__ = list(_HOMES)


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module 'holdfast' has no attribute {name!r}")
    value = getattr(importlib.import_module(home), name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
