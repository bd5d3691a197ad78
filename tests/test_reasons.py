"""Failure reasons: holdfast's own (`Reason`, domain `holdfast`, and its
built-in apps' `AppReason`s in the same domain) and a team's app's own
(`AppReason`, in the app's domain), as they reach ErrorInfo and as a recorded
one is stored and found again by (domain, name)."""

from __future__ import annotations

import hashlib
import subprocess
import sys

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from holdfast import AppReason, Engine, Move, Reason, failure
from holdfast import outcome as outcomes
from holdfast.apps.fulfillment import DispatchReason
from holdfast.apps.inventory import InventoryReason
from holdfast.backends import open_snapshot, open_store
from holdfast.clock import ManualClock
from holdfast.outcome import DOMAIN, reason_key, reason_named
from holdfast.apps.inventory_store import TABLES


class SpotReason(AppReason, domain="spots.parking.example.com"):
    SPOT_HELD = (grpc.StatusCode.FAILED_PRECONDITION, True)
    DRIVER_UNKNOWN = (grpc.StatusCode.NOT_FOUND, False)
    SPOT_CLOSED = (grpc.StatusCode.FAILED_PRECONDITION, True)


class OtherReason(AppReason, domain="other.example.com"):
    SPOT_HELD = (grpc.StatusCode.ABORTED, False)  # the same name in another domain


def error_info(payload: bytes) -> error_details_pb2.ErrorInfo:
    (detail,) = [d for d in status_pb2.Status.FromString(payload).details if d.Is(error_details_pb2.ErrorInfo.DESCRIPTOR)]
    info = error_details_pb2.ErrorInfo()
    detail.Unpack(info)
    return info


def test_an_apps_reason_carries_its_own_domain_status_and_recording():
    outcome = failure(SpotReason.SPOT_HELD, "spot a-1 is held by another driver", metadata={"spot_id": "a-1"})
    info = error_info(outcome.payload)
    assert (info.domain, info.reason, dict(info.metadata)) == ("spots.parking.example.com", "SPOT_HELD", {"spot_id": "a-1"})
    assert status_pb2.Status.FromString(outcome.payload).code == grpc.StatusCode.FAILED_PRECONDITION.value[0]
    assert (outcome.code, outcome.recorded) == (grpc.StatusCode.FAILED_PRECONDITION, True)
    assert failure(SpotReason.DRIVER_UNKNOWN, "who?").recorded is False


# The built-in apps' reasons as DESIGN.md's table promises them, and as they
# were when `Reason` held them: (reason, name, status, recorded).
BUILT_IN = [
    (InventoryReason.SKU_NOT_FOUND, "SKU_NOT_FOUND", grpc.StatusCode.NOT_FOUND, False),
    (InventoryReason.RESERVATION_NOT_FOUND, "RESERVATION_NOT_FOUND", grpc.StatusCode.NOT_FOUND, False),
    (InventoryReason.INSUFFICIENT_STOCK, "INSUFFICIENT_STOCK", grpc.StatusCode.FAILED_PRECONDITION, True),
    (InventoryReason.STOCK_BELOW_COMMITTED, "STOCK_BELOW_COMMITTED", grpc.StatusCode.FAILED_PRECONDITION, True),
    (InventoryReason.RESERVATION_NOT_CONFIRMED, "RESERVATION_NOT_CONFIRMED", grpc.StatusCode.FAILED_PRECONDITION, False),
    (DispatchReason.WAYBILL_NOT_FOUND, "WAYBILL_NOT_FOUND", grpc.StatusCode.NOT_FOUND, False),
    (DispatchReason.CARRIER_REFUSED, "CARRIER_REFUSED", grpc.StatusCode.ABORTED, True),
    (DispatchReason.WAYBILL_NOT_DISPATCHED, "WAYBILL_NOT_DISPATCHED", grpc.StatusCode.FAILED_PRECONDITION, False),
]

# failure(INSUFFICIENT_STOCK, SHORT, metadata=SHORT_METADATA).payload as it was
# when INSUFFICIENT_STOCK was a member of `Reason`: the bytes a client reads,
# and that stores hold under recorded keys.
SHORT = "SKU sku-1 has 2 units available, 5 asked"
SHORT_METADATA = {"sku_id": "sku-1", "available": "2"}
SHORT_PAYLOAD = bytes.fromhex(
    "08091228534b5520736b752d3120686173203220756e69747320617661696c61626c652c20352061736b65641a6b0a28747970652e676f"
    "6f676c65617069732e636f6d2f676f6f676c652e7270632e4572726f72496e666f123f0a12494e53554646494349454e545f53544f434b"
    "1208686f6c64666173741a0e0a09617661696c61626c651201321a0f0a06736b755f69641205736b752d31"
)


def test_holdfasts_reasons_keep_the_holdfast_domain():
    info = error_info(failure(Reason.HOLD_EXPIRED, "no").payload)
    assert (info.domain, info.reason) == ("holdfast", "HOLD_EXPIRED")


@pytest.mark.parametrize(("reason", "name", "code", "recorded"), BUILT_IN, ids=[row[1] for row in BUILT_IN])
def test_the_built_in_apps_reasons_keep_their_name_domain_status_and_recording(reason, name, code, recorded):
    assert (reason.name, reason.domain, reason.code, reason.recorded) == (name, DOMAIN, code, recorded)
    made = failure(reason, "why", metadata={"id": "x"})
    info = error_info(made.payload)
    assert (info.domain, info.reason, dict(info.metadata)) == ("holdfast", name, {"id": "x"})
    assert status_pb2.Status.FromString(made.payload).code == code.value[0]
    assert (made.code, made.recorded) == (code, recorded)
    assert reason_key(reason) == name  # stored by bare name, as stores already hold them
    assert reason_named(name) is reason


def test_a_built_in_apps_reason_answers_the_same_bytes_as_before():
    assert failure(InventoryReason.INSUFFICIENT_STOCK, SHORT, metadata=SHORT_METADATA).payload == SHORT_PAYLOAD


async def test_a_recorded_insufficient_stock_is_stored_by_name_and_replays_identical_bytes(tmp_path):
    store = open_store(f"sqlite:///{tmp_path}/store.db", tables=TABLES)
    await store.open()
    try:
        engine = Engine(store, open_snapshot("memory://"), ManualClock(1_000))
        key = hashlib.sha256(b"short").digest()
        move = Move("/test/Reserve", key, b"fp", None,
                    lambda txn, now_ms: failure(InventoryReason.INSUFFICIENT_STOCK, SHORT, metadata=SHORT_METADATA))
        first = await engine.move(move)
        stored = await store.transact(lambda txn: txn.recorded(key))
        assert stored is not None and (stored.reason, stored.payload) == ("INSUFFICIENT_STOCK", SHORT_PAYLOAD)
        again = await engine.move(move)
        assert (first.replayed, again.replayed) == (False, True)
        assert first.reason is again.reason is InventoryReason.INSUFFICIENT_STOCK
        assert first.payload == again.payload == SHORT_PAYLOAD
    finally:
        await store.close()


def test_a_built_in_apps_reason_not_loaded_is_a_key_error_naming_the_domain():
    """A bare name no loaded class declares: the app that recorded it is not
    hosted (here: nothing has imported holdfast.apps.inventory)."""
    script = (
        "from holdfast.outcome import reason_named\n"
        "try:\n    reason_named('INSUFFICIENT_STOCK')\nexcept KeyError as error:\n    print(error)\n"
        "import holdfast.apps.inventory\n"
        "print(reason_named('INSUFFICIENT_STOCK'))\n"
    )
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60, check=True)
    missing, found = done.stdout.splitlines()
    assert "'INSUFFICIENT_STOCK'" in missing and "'holdfast'" in missing and "holdfast.apps" in missing, missing
    assert found == "InventoryReason.INSUFFICIENT_STOCK"


def test_members_rank_in_declaration_order_and_never_alias():
    # Two members with the same (status, recorded) stay two members.
    assert list(SpotReason) == [SpotReason.SPOT_HELD, SpotReason.DRIVER_UNKNOWN, SpotReason.SPOT_CLOSED]
    assert [member.value for member in SpotReason] == [1, 2, 3]


@pytest.mark.parametrize("reason", [Reason.HOLD_EXPIRED, InventoryReason.INSUFFICIENT_STOCK, DispatchReason.CARRIER_REFUSED,
                                    SpotReason.SPOT_HELD, SpotReason.SPOT_CLOSED, OtherReason.SPOT_HELD])
def test_a_stored_reason_is_found_again_by_domain_and_name(reason):
    assert reason_named(reason_key(reason)) is reason


def test_holdfasts_reasons_are_stored_by_name_as_before():
    """Stores written before apps had reasons hold bare names; they still resolve."""
    assert reason_key(Reason.HOLD_EXPIRED) == "HOLD_EXPIRED"
    assert reason_key(SpotReason.SPOT_HELD) == "spots.parking.example.com/SPOT_HELD"


def test_a_reason_of_an_app_not_loaded_is_a_key_error_naming_it():
    with pytest.raises(KeyError, match="nobody.example.com"):
        reason_named("nobody.example.com/SPOT_HELD")


def test_reasons_without_a_domain_are_refused():
    with pytest.raises(TypeError, match="declare the reasons' ErrorInfo domain"):
        class Nameless(AppReason):
            X = (grpc.StatusCode.ABORTED, False)
    with pytest.raises(TypeError, match="declare the reasons' ErrorInfo domain"):
        AppReason("Functional", {"X": (grpc.StatusCode.ABORTED, False)})
    with pytest.raises(TypeError, match="DNS-like"):
        class Shouting(AppReason, domain="Not A Domain"):
            X = (grpc.StatusCode.ABORTED, False)


def test_the_holdfast_domain_and_a_taken_domain_are_refused():
    with pytest.raises(TypeError, match="holdfast's own"):
        class Mine(AppReason, domain="holdfast"):
            X = (grpc.StatusCode.ABORTED, False)
    # A team's app copied from a built-in one, or living in a look-alike
    # package, is refused too: only holdfast's own apps package may.
    for module in ("shop.apps.inventory", "holdfast_apps.inventory", "shop.holdfast.apps.inventory", "holdfast.apps"):
        with pytest.raises(TypeError, match="holdfast's own"):
            class Copied(AppReason, domain="holdfast"):
                __module__ = module
                MY_SKU_GONE = (grpc.StatusCode.NOT_FOUND, False)
    with pytest.raises(KeyError):
        reason_named("MY_SKU_GONE")
    with pytest.raises(TypeError, match="SpotReason's"):
        class Squatter(AppReason, domain="spots.parking.example.com"):
            X = (grpc.StatusCode.ABORTED, False)


@pytest.mark.parametrize(("value", "says"), [
    ((grpc.StatusCode.OK, True), "gRPC error status"),
    (("FAILED_PRECONDITION", True), "gRPC error status"),
    ((grpc.StatusCode.ABORTED, "yes"), "True or False"),
])
def test_a_reason_needs_an_error_status_and_a_recorded_flag(value, says):
    with pytest.raises(TypeError, match=says):
        class Broken(AppReason, domain="broken.example.com"):
            X = value


@pytest.fixture
def own_reasons(monkeypatch):
    """The registry of holdfast's own apps' reasons, restored after the test."""
    monkeypatch.setattr(outcomes, "_OWN_REASONS", dict(outcomes._OWN_REASONS))


def test_names_in_the_holdfast_domain_are_unique_across_reason_and_the_built_in_apps():
    names = [list(Reason.__members__), list(InventoryReason.__members__), list(DispatchReason.__members__)]
    assert sum(map(len, names)) == len({name for group in names for name in group})


def _own_app_reasons(module: str, **members: tuple) -> type[AppReason]:
    """`class Reasons(AppReason, domain="holdfast")` declared in `module`, with
    members of names given at run time."""
    namespace = type(AppReason).__prepare__("Reasons", (AppReason,))
    namespace["__module__"] = module
    for name, value in members.items():
        namespace[name] = value
    return type(AppReason)("Reasons", (AppReason,), namespace, domain="holdfast")


@pytest.mark.parametrize(("taken", "by"), [
    (Reason.HOLD_EXPIRED, "Reason.HOLD_EXPIRED"),
    (InventoryReason.INSUFFICIENT_STOCK, "holdfast.apps.inventory.InventoryReason.INSUFFICIENT_STOCK"),
    (DispatchReason.CARRIER_REFUSED, "holdfast.apps.fulfillment.DispatchReason.CARRIER_REFUSED"),
], ids=lambda row: getattr(row, "name", None))
def test_a_name_taken_in_the_holdfast_domain_is_refused(own_reasons, taken, by):
    with pytest.raises(TypeError, match=by.replace(".", r"\.")):
        _own_app_reasons("holdfast.apps.clash", CLASH_FRESH=(grpc.StatusCode.ABORTED, False),
                         **{taken.name: (grpc.StatusCode.ABORTED, False)})
    with pytest.raises(KeyError):  # nothing of a refused class is registered
        reason_named("CLASH_FRESH")
    assert reason_named(taken.name) is taken


def test_another_of_holdfasts_own_apps_shares_the_domain_by_bare_name(own_reasons):
    class ToyReason(AppReason, domain="holdfast"):
        __module__ = "holdfast.apps.toy"
        TOY_BROKEN = (grpc.StatusCode.FAILED_PRECONDITION, True)

    assert (ToyReason.TOY_BROKEN.domain, reason_key(ToyReason.TOY_BROKEN)) == ("holdfast", "TOY_BROKEN")
    assert reason_named("TOY_BROKEN") is ToyReason.TOY_BROKEN
    assert error_info(failure(ToyReason.TOY_BROKEN, "broken").payload).domain == "holdfast"
    with pytest.raises(TypeError, match=r"holdfast\.apps\.toy"):  # a second app cannot take its name
        class Other(AppReason, domain="holdfast"):
            __module__ = "holdfast.apps.other"
            TOY_BROKEN = (grpc.StatusCode.ABORTED, False)
