"""Failure reasons: holdfast's own (`Reason`, domain `holdfast`) and an app's
own (`AppReason`, in the app's domain), as they reach ErrorInfo and as a
recorded one is stored and found again by (domain, name)."""

from __future__ import annotations

import grpc
import pytest
from google.rpc import error_details_pb2, status_pb2

from holdfast import AppReason, Reason, failure
from holdfast.outcome import reason_key, reason_named


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


def test_holdfasts_reasons_keep_the_holdfast_domain():
    info = error_info(failure(Reason.INSUFFICIENT_STOCK, "no").payload)
    assert (info.domain, info.reason) == ("holdfast", "INSUFFICIENT_STOCK")


def test_members_rank_in_declaration_order_and_never_alias():
    # Two members with the same (status, recorded) stay two members.
    assert list(SpotReason) == [SpotReason.SPOT_HELD, SpotReason.DRIVER_UNKNOWN, SpotReason.SPOT_CLOSED]
    assert [member.value for member in SpotReason] == [1, 2, 3]


@pytest.mark.parametrize("reason", [Reason.INSUFFICIENT_STOCK, Reason.CARRIER_REFUSED, SpotReason.SPOT_HELD,
                                    SpotReason.SPOT_CLOSED, OtherReason.SPOT_HELD])
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
