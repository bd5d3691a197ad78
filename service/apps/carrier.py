"""Carriers: who takes a waybill's parcel. An interface, and a simulated
carrier for tests and the demo.

A real carrier's API is reached over the network and may fail or stall;
the dispatch service calls it outside any store transaction, under the
waybill's lease, and treats an answer that comes after the lease as none.
A carrier should treat (waybill_id, attempt) as its own idempotency key.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class Parcel:
    waybill_id: str
    attempt: int
    carrier: str
    address: str


@dataclass(frozen=True, slots=True)
class Answer:
    """`accepted` with the carrier's `tracking_id`, or refused with `detail`."""

    accepted: bool
    tracking_id: str = ""
    detail: str = ""


class Carrier(Protocol):
    async def dispatch(self, parcel: Parcel) -> Answer: ...


class SimulatedCarrier:
    """Refuses a share of attempts and answers after a latency, both decided
    by a hash of (seed, waybill, attempt): the same attempt gets the same
    answer on every instance and every retry, as a real carrier keyed by it
    would give.

    `refuse_first` refuses every waybill's first N attempts outright (tests:
    "fails twice, succeeds on the third").
    """

    def __init__(self, failure_rate: float = 0.0, latency_ms: int = 0, refuse_first: int = 0, seed: int = 0) -> None:
        if not 0.0 <= failure_rate <= 1.0:
            raise ValueError(f"failure rate must be within 0..1, got {failure_rate}")
        if latency_ms < 0 or refuse_first < 0:
            raise ValueError("latency and refuse_first must not be negative")
        self.failure_rate = failure_rate
        self.latency_ms = latency_ms
        self.refuse_first = refuse_first
        self.seed = seed
        self.parcels: list[Parcel] = []  # every call, in order: what tests inspect

    async def dispatch(self, parcel: Parcel) -> Answer:
        self.parcels.append(parcel)
        draw = self._draw(parcel)
        if self.latency_ms:
            # Up to twice the mean, so some answers come late.
            await asyncio.sleep(self.latency_ms * 2 * draw[1] / 1000)
        if parcel.attempt <= self.refuse_first:
            return Answer(False, detail=f"{parcel.carrier} refused attempt {parcel.attempt} (simulated)")
        if draw[0] < self.failure_rate:
            return Answer(False, detail=f"{parcel.carrier} is unavailable (simulated, rate {self.failure_rate})")
        return Answer(True, tracking_id="trk_" + hashlib.sha256(parcel.waybill_id.encode()).hexdigest()[:16])

    def _draw(self, parcel: Parcel) -> tuple[float, float]:
        digest = hashlib.sha256(f"{self.seed}:{parcel.waybill_id}:{parcel.attempt}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64, int.from_bytes(digest[8:16], "big") / 2**64
