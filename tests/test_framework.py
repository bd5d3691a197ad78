"""holdfast's public API (`import holdfast`): its names are a promise, and
holdfast's own services are built on it alone."""

from __future__ import annotations

import ast
import enum
from pathlib import Path

import pytest

import holdfast as framework
from holdfast.framework import ID_LENGTH_MAX
from holdfast import Change, Entity, Machine, Reason, derive_id, encode_data, failure, lease_held

ROOT = Path(__file__).resolve().parents[1]

PUBLIC = {
    "Machine", "Service", "Change", "Entity", "Outcome", "Reason", "success", "failure", "derive_id", "shown_id",
    "lease_held",
    "encode_data", "decode_data", "states_of", "text_violations", "invalid", "Call", "Contract", "current_call", "idempotency_key", "Engine", "Move", "Txn",
    "Table", "Column", "Query",
    "AppReason", "Refusal", "refusal", "Clock", "SystemClock", "ManualClock", "Config", "Running", "ServiceFactory", "start",
    "serve", "channel", "aio_channel",
}

# Each built-in app may import the public API, its own generated code and
# its own modules; nothing else of holdfast's.
OWN_MODULES = {
    "service/apps/inventory.py": {
        "holdfast", "holdfast.inventory.v1", "holdfast.apps", "holdfast.apps.inventory_machine", "holdfast.apps.inventory_store",
    },
    # Dispatch reads reservations through inventory's moves (Dispatch.from_settings).
    "service/apps/fulfillment.py": {"holdfast", "holdfast.fulfillment.v1", "holdfast.apps.carrier", "holdfast.apps.inventory"},
}


def test_the_public_names_are_pinned():
    assert set(framework.__all__) == PUBLIC
    assert len(framework.__all__) == len(PUBLIC), "a name listed twice"


@pytest.mark.parametrize("name", sorted(PUBLIC))
def test_every_public_name_resolves(name):
    assert getattr(framework, name) is not None


def test_an_unknown_name_is_an_attribute_error():
    with pytest.raises(AttributeError):
        framework.no_such_name  # noqa: B018


@pytest.mark.parametrize("path", sorted(OWN_MODULES))
def test_holdfasts_services_import_only_the_public_api(path):
    tree = ast.parse((ROOT / path).read_text())
    imported = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module and node.module.split(".")[0] == "holdfast":
            imported.add(node.module)
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names if alias.name.split(".")[0] == "holdfast")
    assert imported <= OWN_MODULES[path], imported - OWN_MODULES[path]


class Door(enum.IntEnum):
    OPEN = 1
    CLOSED = 2
    LOCKED = 3
    GONE = 4


def door(**changes) -> Machine[Door]:
    declared = dict(
        name="door", states=Door,
        table=((Door.OPEN, "CLOSE", Door.CLOSED), (Door.CLOSED, "LOCK", Door.LOCKED), (Door.CLOSED, "OPEN", Door.OPEN),
               (Door.LOCKED, "REMOVE", Door.GONE)),
        initial=Door.OPEN, terminal=(Door.GONE,),
    )
    return Machine(**{**declared, **changes})


def test_a_machine_walks_its_table_and_nothing_else():
    machine = door()
    assert machine.walk(Door.OPEN, ("CLOSE", "LOCK")) is Door.LOCKED
    assert machine.walk(Door.OPEN, ("LOCK",)) is None
    assert machine.next(Door.CLOSED, "OPEN") is Door.OPEN
    assert machine.events == ("CLOSE", "LOCK", "OPEN", "REMOVE")


def test_a_terminal_state_with_a_move_is_refused_at_declaration():
    with pytest.raises(AssertionError, match="terminal"):
        door(terminal=(Door.LOCKED,))


def test_a_nondeterministic_table_is_refused_at_declaration():
    table = ((Door.OPEN, "CLOSE", Door.CLOSED), (Door.OPEN, "CLOSE", Door.LOCKED))
    with pytest.raises(AssertionError, match="deterministic"):
        door(table=table, terminal=())


def test_recovery_must_walk_from_an_intent():
    with pytest.raises(AssertionError, match="no intent"):
        door(recovery={Door.CLOSED: ("OPEN",)})
    with pytest.raises(AssertionError, match="not a walk"):
        door(intents=(Door.CLOSED,), recovery={Door.CLOSED: ("REMOVE",)})


def test_a_change_answers_with_a_reply_or_a_recorded_refusal():
    with pytest.raises(AssertionError):
        Change(("CLOSE",), b"{}")  # neither
    with pytest.raises(AssertionError):
        Change((), b"{}", reply=lambda e: None)  # no event
    unrecorded = failure(Reason.LEASE_HELD, "held")
    with pytest.raises(AssertionError, match="recorded"):
        Change(("CLOSE",), b"{}", refusal=unrecorded)
    Change(("CLOSE",), b"{}", refusal=failure(Reason.LEASE_LOST, "lost"))


def test_ids_derive_from_the_key_alone():
    key = bytes(range(32))
    assert derive_id("wb", key) == "wb_" + key.hex()[:24] == derive_id("wb", key)
    assert derive_id("wb", bytes(32)) != derive_id("wb", key)


def test_an_id_in_an_error_is_cut_to_the_id_limit():
    assert framework.shown_id("wb_1") == "wb_1"
    assert framework.shown_id("x" * 5000) == "x" * ID_LENGTH_MAX + "…"


def test_data_encodes_canonically():
    assert encode_data({"b": 1, "a": "é"}) == encode_data({"a": "é", "b": 1}) == '{"a":"é","b":1}'.encode()


def test_a_lease_is_held_until_its_end_by_someone():
    leased = Entity("wb_1", "fulfillment", 3, 2, b"{}", "d1", 1_000)
    assert lease_held(leased, 999) and not lease_held(leased, 1_000)
    assert not lease_held(Entity("wb_1", "fulfillment", 3, 2, b"{}", "", 5_000), 0)
    assert not lease_held(None, 0)


# -- less scaffolding: states from the proto enum, data as a message, validation --------


def test_states_come_from_the_proto_enum_without_prefix_or_zero():
    from holdfast.inventory.v1 import inventory_pb2 as pb

    states = framework.states_of(pb.ReservationState)
    assert [(s.name, int(s)) for s in states] == [
        ("AVAILABLE", 1), ("RESERVING", 2), ("RESERVED", 3), ("CONFIRMING", 4), ("CONFIRMED", 5),
        ("RELEASING", 6), ("RELEASED", 7),
    ]
    assert framework.states_of(pb.ReservationState.DESCRIPTOR, "Hold").__name__ == "Hold"
    with pytest.raises(TypeError, match="generated proto enum"):
        framework.states_of(Door)


def test_entity_data_may_be_the_apps_own_message():
    from holdfast.inventory.v1 import inventory_pb2 as pb

    message = pb.StockReply(sku_id="s", total=3, available=2, held=1)
    data = encode_data(message)
    assert data == message.SerializeToString(deterministic=True)
    assert framework.decode_data(data, pb.StockReply) == message
    assert framework.decode_data(encode_data({"b": 1, "a": "é"})) == {"a": "é", "b": 1}


def test_text_violations_name_each_field_in_order():
    from holdfast.inventory.v1 import inventory_pb2 as pb

    request = pb.ReserveRequest(order_id="o\n", sku_id="")
    assert framework.text_violations(request, required=("sku_id",), optional=("order_id",)) == [
        ("sku_id", "sku_id must be set"), ("order_id", "order_id must not contain control characters"),
    ]
    long = pb.ReserveRequest(order_id="x" * 9)
    assert framework.text_violations(long, optional=("order_id",), length_max=8) == [
        ("order_id", "order_id is longer than 8 characters"),
    ]
    refused = framework.invalid([("sku_id", "sku_id must be set"), ("quantity", "quantity must be positive")])
    assert (refused.reason, refused.recorded) == (Reason.INVALID_REQUEST, False)
    assert refused.status().message == "sku_id must be set; quantity must be positive"
