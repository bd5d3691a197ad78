"""Random sequences of Reserve, Confirm, Release, PutStock, replays, lost
replies, hold expiry and restarts, checked against the simulation's auditor
model: the same invariants as `holdfast simulate`, with hypothesis choosing
(and shrinking) the sequence instead of a seed."""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from holdfast.auditor import Request
from holdfast.apps.inventory_workload import SKUS, InventoryWorkload, reservation_of
from holdfast.simulate import NO_FAULTS, Simulation

skus = st.sampled_from(SKUS[:3])
quantities = st.integers(min_value=1, max_value=6)
picks = st.integers(min_value=0, max_value=10_000)  # an index into what exists, taken modulo its length


class Inventory(RuleBasedStateMachine):
    """Faults come from the rules (a lost reply, a duplicate, a crash), not from
    chance, so a failing sequence shrinks to the few moves that break it."""

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.sim = Simulation(seed=0, faults=NO_FAULTS, workload=InventoryWorkload)
        self.sent: list[Request] = []

    def teardown(self) -> None:
        self.loop.close()

    def _send(self, *requests: Request, lost: bool = False) -> None:
        self.loop.run_until_complete(self.sim.deliver(list(requests), [lost] * len(requests)))
        self.sent.extend(requests)
        self.sim.check(requests)

    def _rid(self, pick: int) -> str:
        rids = self.sim._reserves
        return rids[pick % len(rids)]

    @rule(sku=skus, total=st.integers(min_value=0, max_value=40))
    def put_stock(self, sku: str, total: int) -> None:
        self._send(self.sim.put_stock(sku, total))

    @rule(sku=skus, quantity=quantities, hold_ms=st.sampled_from([0, 1_000, 60_000]), lost=st.booleans())
    def reserve(self, sku: str, quantity: int, hold_ms: int, lost: bool) -> None:
        self._send(self.sim.reserve(sku, quantity, hold_ms), lost=lost)

    @precondition(lambda self: self.sim._reserves)
    @rule(pick=picks, lost=st.booleans())
    def confirm(self, pick: int, lost: bool) -> None:
        self._send(self.sim.confirm(self._rid(pick)), lost=lost)

    @precondition(lambda self: self.sim._reserves)
    @rule(pick=picks, lost=st.booleans())
    def release(self, pick: int, lost: bool) -> None:
        self._send(self.sim.release(self._rid(pick)), lost=lost)

    @precondition(lambda self: self.sent)
    @rule(pick=picks, twice=st.booleans())
    def replay(self, pick: int, twice: bool) -> None:
        """An earlier request again: alone, or delivered twice at once."""
        request = self.sent[pick % len(self.sent)]
        self._send(*([request] * (2 if twice else 1)))

    @precondition(lambda self: self.sim.auditor.pending)
    @rule()
    def retry_lost(self) -> None:
        self._send(*self.sim.auditor.pending.values())

    @rule(delta_ms=st.sampled_from([1, 999, 1_000, 60_000, 15 * 60 * 1000]))
    def expire(self, delta_ms: int) -> None:
        self.loop.run_until_complete(self.sim.tick(delta_ms))
        self.sim.check()

    @rule(torn=st.booleans())
    def crash(self, torn: bool) -> None:
        """A restart; `torn` leaves an intent behind for recovery to settle."""
        self.loop.run_until_complete(self.sim.restart(torn=torn))
        self.sim.check()

    @invariant()
    def store_matches_the_answers(self) -> None:
        self.sim.auditor.sweep(self.sim.store)

    @invariant()
    def versions_only_move_forward(self) -> None:
        for rid, held in self.sim.auditor.holds.items():
            found = reservation_of(self.sim.store, rid)
            assert found is None or found.version >= held.version


Inventory.TestCase.settings = settings(
    max_examples=50, stateful_step_count=30, deadline=None, suppress_health_check=[HealthCheck.too_slow]
)
TestInventory = Inventory.TestCase
