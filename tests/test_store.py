"""The store contract: what every store-of-record backend must do.

Parametrised by backend; a new backend joins by adding to the `store_url`
fixture (tests/conftest.py) and passing every test here unchanged. PostgreSQL
is a real server started by tests/backends.py, with a fresh database per test.
"""

from __future__ import annotations

import asyncio
import time

import pytest

from holdfast.apps.inventory_machine import State
from holdfast.backends import open_store
from holdfast.store import SCHEMA_VERSION, BudgetSpent, Contended, Record, SchemaTooNew
from holdfast.apps.inventory_store import TABLES, Reservation, Stock, due_holds, intents, put_stock, reservation, save_reservation, settle_stock, stock, take_stock

@pytest.fixture
async def store(store_url):
    opened = open_store(store_url, tables=TABLES)
    await opened.open()
    yield opened
    await opened.close()


def _hold(rid: str = "r1", version: int = 1, state: State = State.RESERVED, expires_at_ms: int = 1_000) -> Reservation:
    return Reservation(rid, "o1", "sku", 2, state, version, expires_at_ms)


async def _stock(store, sku: str = "sku") -> Stock | None:
    return await store.transact(lambda txn: stock(txn, sku))


async def test_take_stock_holds_only_when_enough_is_available(store):
    await store.transact(lambda txn: put_stock(txn, Stock("sku", 3, 3, 0, 0, 1)))
    assert await store.transact(lambda txn: take_stock(txn, "sku", 2)) is True
    assert await store.transact(lambda txn: take_stock(txn, "sku", 2)) is False
    assert await _stock(store) == Stock("sku", 3, 1, 2, 0, 2)


async def test_settle_stock_moves_held_units_to_sold_or_back(store):
    await store.transact(lambda txn: put_stock(txn, Stock("sku", 5, 1, 4, 0, 1)))
    await store.transact(lambda txn: settle_stock(txn, "sku", 3, sold=True))
    await store.transact(lambda txn: settle_stock(txn, "sku", 1, sold=False))
    assert await _stock(store) == Stock("sku", 5, 2, 0, 3, 3)


def _saving(reservation: Reservation, expected_version: int):
    def work(txn):
        try:
            save_reservation(txn, reservation, expected_version)
        except Contended:
            return "contended"
        return "saved"

    return work


async def test_save_reservation_is_a_compare_and_set_on_version(store):
    assert await store.transact(_saving(_hold(), 0)) == "saved"
    assert await store.transact(_saving(_hold(), 0)) == "contended"  # already exists
    confirmed = _hold(version=2, state=State.CONFIRMED)
    assert await store.transact(_saving(confirmed, 1)) == "saved"
    assert await store.transact(_saving(_hold(version=2, state=State.RELEASED), 1)) == "contended"
    assert await store.transact(lambda txn: reservation(txn, "r1")) == confirmed


async def test_contended_move_is_undone_and_rerun_on_the_new_state(store):
    await store.transact(lambda txn: put_stock(txn, Stock("sku", 10, 10, 0, 0, 1)))
    attempts = []

    def loses_first_race(txn):
        assert take_stock(txn, "sku", 4)
        attempts.append(stock(txn, "sku").available)
        if len(attempts) == 1:
            raise Contended("a concurrent writer won")
        return "done"

    assert await store.transact(loses_first_race) == "done"
    assert attempts == [6, 6]  # the first attempt's hold was undone before the rerun
    assert await _stock(store) == Stock("sku", 10, 6, 4, 0, 2)


async def test_recorded_outcome_round_trips_its_exact_bytes(store):
    record = Record(b"\x00fp", "INSUFFICIENT_STOCK", bytes(range(256)))
    await store.transact(lambda txn: txn.record(b"key", record, 5))
    assert await store.transact(lambda txn: txn.recorded(b"key")) == record
    assert await store.transact(lambda txn: txn.recorded(b"other")) is None


async def test_failed_move_is_undone_alone_within_a_shared_transaction(store):
    await store.transact(lambda txn: put_stock(txn, Stock("sku", 10, 10, 0, 0, 1)))

    def take_then_fail(txn):
        assert take_stock(txn, "sku", 4)
        raise RuntimeError("the move's own failure")

    results = await asyncio.gather(
        store.transact(lambda txn: take_stock(txn, "sku", 1)),
        store.transact(take_then_fail),
        store.transact(lambda txn: take_stock(txn, "sku", 2)),
        return_exceptions=True,
    )
    assert results[0] is True and results[2] is True
    assert isinstance(results[1], RuntimeError)
    assert await _stock(store) == Stock("sku", 10, 7, 3, 0, 3)


async def test_spent_budget_refuses_the_move_before_it_runs(store):
    await store.transact(lambda txn: put_stock(txn, Stock("sku", 10, 10, 0, 0, 1)))
    with pytest.raises(BudgetSpent):
        await store.transact(lambda txn: take_stock(txn, "sku", 1), deadline=time.monotonic() - 0.001)
    assert await _stock(store) == Stock("sku", 10, 10, 0, 0, 1)


async def test_concurrent_moves_all_commit_with_exact_totals(store):
    await store.transact(lambda txn: put_stock(txn, Stock("sku", 1000, 1000, 0, 0, 1)))
    taken = await asyncio.gather(*(store.transact(lambda txn: take_stock(txn, "sku", 3)) for _ in range(500)))
    assert taken.count(True) == 333
    assert await _stock(store) == Stock("sku", 1000, 1, 999, 0, 334)


async def test_due_holds_and_intents_are_found_in_order(store):
    await store.transact(lambda txn: save_reservation(txn, _hold("b", expires_at_ms=50), 0))
    await store.transact(lambda txn: save_reservation(txn, _hold("a", expires_at_ms=50), 0))
    await store.transact(lambda txn: save_reservation(txn, _hold("c", expires_at_ms=500), 0))
    await store.transact(lambda txn: save_reservation(txn, _hold("i", state=State.CONFIRMING), 0))
    due = await store.transact(lambda txn: due_holds(txn, 100, 10))
    assert [r.reservation_id for r in due] == ["a", "b"]
    found = await store.transact(lambda txn: intents(txn, 10))
    assert [(r.reservation_id, r.state) for r in found] == [("i", State.CONFIRMING)]


async def test_committed_moves_survive_reopening(store_url):
    first = open_store(store_url, tables=TABLES)
    await first.open()
    await first.transact(lambda txn: put_stock(txn, Stock("sku", 4, 4, 0, 0, 1)))
    await first.close()
    second = open_store(store_url, tables=TABLES)
    await second.open()
    try:
        assert await _stock(second) == Stock("sku", 4, 4, 0, 0, 1)
    finally:
        await second.close()


def test_store_url_must_name_a_supported_backend():
    with pytest.raises(ValueError, match="unsupported store URL"):
        open_store("mysql://nope")
    with pytest.raises(ValueError, match="names no file"):
        open_store("sqlite://")


async def test_store_written_by_a_newer_schema_is_refused_at_start_up(store_url):
    first = open_store(store_url, tables=TABLES)
    await first.open()
    await first.transact(lambda txn: txn._execute("UPDATE holdfast_schema SET version = %s", (SCHEMA_VERSION + 1,)))
    await first.close()
    with pytest.raises(SchemaTooNew, match=f"schema version {SCHEMA_VERSION + 1}"):
        await open_store(store_url, tables=TABLES).open()
