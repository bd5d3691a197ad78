"""`holdfast.fulfillment.v1.DispatchService`: waybill dispatch, the second
service of the design's users, built only on the framework's public API
(service.framework).

A waybill is created for a CONFIRMED reservation, handed to its carrier by
dispatchers, and acknowledged when the carrier has the parcel. Dispatch is
the move that once took an outage: its contract allows 3 attempts, 1,200 ms
apart, each under an 800 ms lease on the waybill. All three numbers are read
from the proto, never restated here.
"""

from __future__ import annotations

import enum

from service.framework import Machine


class Waybill(enum.IntEnum):
    """Values equal the wire's `WaybillState` numbers. NEW is a waybill not
    yet created; it is never in a reply."""

    NEW = 1
    CREATED = 2
    DISPATCHING = 3
    DISPATCHED = 4
    ACKNOWLEDGED = 5
    FAILED = 6


WAYBILL: Machine[Waybill] = Machine(
    "fulfillment",
    Waybill,
    (
        (Waybill.NEW, "CREATE", Waybill.CREATED),
        (Waybill.CREATED, "DISPATCH_START", Waybill.DISPATCHING),
        (Waybill.DISPATCHING, "CARRIER_ACCEPTED", Waybill.DISPATCHED),
        (Waybill.DISPATCHING, "CARRIER_REFUSED", Waybill.CREATED),
        (Waybill.DISPATCHING, "ATTEMPTS_EXHAUSTED", Waybill.FAILED),
        (Waybill.DISPATCHING, "LEASE_EXPIRED", Waybill.CREATED),
        (Waybill.DISPATCHED, "CARRIER_ACKNOWLEDGED", Waybill.ACKNOWLEDGED),
        (Waybill.CREATED, "GIVE_UP", Waybill.FAILED),
    ),
    initial=Waybill.NEW,
    terminal=(Waybill.ACKNOWLEDGED, Waybill.FAILED),
)
