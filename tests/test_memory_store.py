"""The store contract (tests/test_store.py) on the in-memory store of record
(holdfast.memory), which `holdfast simulate` runs on: every test there that
speaks through `Store.transact` and the `Txn` methods, unchanged. Its entity
rows pass tests/test_entity_store.py, parametrized over it. Left out are
what an in-memory store has not got: a URL, a schema, a file to reopen."""

from __future__ import annotations

import pytest

from holdfast.memory import MemoryStore
from holdfast.store import Record
from holdfast.apps.inventory_store import TABLES
from tests.test_store import (  # noqa: F401  (collected here, on the fixture below)
    test_concurrent_moves_all_commit_with_exact_totals,
    test_contended_move_is_undone_and_rerun_on_the_new_state,
    test_due_holds_and_intents_are_found_in_order,
    test_failed_move_is_undone_alone_within_a_shared_transaction,
    test_recorded_outcome_round_trips_its_exact_bytes,
    test_save_reservation_is_a_compare_and_set_on_version,
    test_settle_stock_moves_held_units_to_sold_or_back,
    test_spent_budget_refuses_the_move_before_it_runs,
    test_take_stock_holds_only_when_enough_is_available,
)


@pytest.fixture
async def store():
    opened = MemoryStore(tables=TABLES)
    await opened.open()
    yield opened
    await opened.close()


async def test_the_rows_outlive_the_store_over_them():
    """What a simulated crash relies on: a new store over the same rows
    finds every committed move, and nothing of one that failed."""
    first = MemoryStore(tables=TABLES)
    await first.open()
    await first.transact(lambda txn: txn.record(b"key", _record(), 1))
    with pytest.raises(RuntimeError):
        await first.transact(lambda txn: (txn.record(b"lost", _record(), 1), _fail()))
    await first.close()
    second = MemoryStore(first.rows, tables=TABLES)
    await second.open()
    try:
        assert await second.transact(lambda txn: (txn.recorded(b"key"), txn.recorded(b"lost"))) == (_record(), None)
    finally:
        await second.close()


def _record() -> Record:
    return Record(b"fp", None, b"payload")


def _fail() -> None:
    raise RuntimeError("the move's own failure")
