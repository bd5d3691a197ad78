"""Carriers: who takes a waybill's parcel. An interface, and a simulated
carrier for tests and the demo.

A real carrier's API is reached over the network and may fail or stall;
the dispatch service calls it outside any store transaction, under the
waybill's lease, and treats an answer that comes after the lease as none.
Handing a parcel over is a side effect no store transaction can undo, so
the carrier keeps the books of it: (waybill_id, attempt) is its
idempotency key (see `Carrier`).
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

    @property
    def key(self) -> tuple[str, int]:
        """The carrier's idempotency key: one decision per attempt."""
        return self.waybill_id, self.attempt


@dataclass(frozen=True, slots=True)
class Answer:
    """`accepted` with the carrier's `tracking_id`, or refused with `detail`."""

    accepted: bool
    tracking_id: str = ""
    detail: str = ""


class Carrier(Protocol):
    """What dispatch needs of a carrier, keyed by `Parcel.key`, (waybill_id,
    attempt), as a real carrier API keys a request by its idempotency key.

    `dispatch` decides an attempt once: the first call for a key hands the
    parcel over (or refuses it), and every later call for that key returns
    the same answer and hands nothing over again. Dispatch asks only within
    the attempt's lease, and an adapter must pass that deadline on, so that
    a call the caller gave up on decides nothing.

    `answered` is what the carrier answered a key, or None when it never
    decided it; it hands nothing over. After an attempt's lease, nobody asks
    the carrier again: whoever ends the attempt (a retry whose settlement had
    failed, the next attempt, the reaper) asks this, so that an attempt the
    carrier accepted is recorded accepted, never refused or expired, and the
    next attempt does not hand the parcel over a second time.
    """

    async def dispatch(self, parcel: Parcel) -> Answer: ...

    async def answered(self, parcel: Parcel) -> Answer | None: ...


class SimulatedCarrier:
    """Refuses a share of attempts and answers after a latency, both decided
    by a hash of (seed, waybill, attempt): the same attempt gets the same
    answer on every instance. It keeps its decisions by key, as a real
    carrier does: a call again for a decided attempt returns its answer at
    once and hands nothing over, and a call cancelled during its latency
    decides nothing.

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
        self.parcels: list[Parcel] = []  # every call of `dispatch`, in order: what tests inspect
        self.decided: dict[tuple[str, int], Answer] = {}  # the carrier's books: each attempt's answer, by key

    async def dispatch(self, parcel: Parcel) -> Answer:
        self.parcels.append(parcel)
        earlier = self.decided.get(parcel.key)
        if earlier is not None:
            return earlier
        draw = self._draw(parcel)
        if self.latency_ms:
            # Up to twice the mean, so some answers come late.
            await asyncio.sleep(self.latency_ms * 2 * draw[1] / 1000)
        # Two calls for one key that were both waiting decide alike; the first is kept.
        return self.decided.setdefault(parcel.key, self._decide(parcel, draw[0]))

    async def answered(self, parcel: Parcel) -> Answer | None:
        return self.decided.get(parcel.key)

    def handed_over(self) -> list[tuple[str, int]]:
        """The attempts whose parcel this carrier took, in the order it decided them."""
        return [key for key, answer in self.decided.items() if answer.accepted]

    def _decide(self, parcel: Parcel, draw: float) -> Answer:
        if parcel.attempt <= self.refuse_first:
            return Answer(False, detail=f"{parcel.carrier} refused attempt {parcel.attempt} (simulated)")
        if draw < self.failure_rate:
            return Answer(False, detail=f"{parcel.carrier} is unavailable (simulated, rate {self.failure_rate})")
        return Answer(True, tracking_id="trk_" + hashlib.sha256(parcel.waybill_id.encode()).hexdigest()[:16])

    def _draw(self, parcel: Parcel) -> tuple[float, float]:
        digest = hashlib.sha256(f"{self.seed}:{parcel.waybill_id}:{parcel.attempt}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64, int.from_bytes(digest[8:16], "big") / 2**64
