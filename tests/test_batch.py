"""Buffered batches (service/batch.py), on SQLite and PostgreSQL: the moves
of a batch run against rows loaded (and locked) together, and their changes
go out as one statement per table. What memory cannot know (another instance
committing the same key or reservation meanwhile, a statement that fails
inside a move) sends the batch back to the savepoint path; these tests make
each of those happen and check that every move still happens exactly once.
The races need a second writer during a batch, which SQLite's file lock
forbids, so they run on PostgreSQL alone."""

from __future__ import annotations

import asyncio
import sqlite3

import psycopg
import pytest

from holdfast.apps.inventory_machine import State
from holdfast.backends import open_store
from holdfast.store import Prefetch, Record
from holdfast.apps.inventory_store import TABLES, Reservation, Stock, due_holds, put_stock, reservation, save_reservation, stock, take_stock

KEY = b"k" * 32
THEIRS = Record(b"their fingerprint", None, b"their reply")
OURS = Record(b"our fingerprint", None, b"our reply")


async def _opened(url: str):
    opened = open_store(url, tables=TABLES)
    await opened.open()
    await opened.transact(lambda txn: put_stock(txn, Stock("sku", 100, 100, 0, 0, 1)))
    return opened


@pytest.fixture
async def store(store_url):
    opened = await _opened(store_url)
    yield opened
    await opened.close()


@pytest.fixture
async def pg_store(postgres_url):
    opened = await _opened(postgres_url)
    yield opened
    await opened.close()


def _elsewhere(url: str, sql: str, params: tuple) -> None:
    """Another instance commits, while our batch is between prefetch and flush."""
    with psycopg.connect(url, autocommit=True) as other:
        other.execute(sql, params)


def _stock(store):
    return store.transact(lambda txn: stock(txn, "sku"))


async def test_a_key_recorded_elsewhere_after_the_prefetch_replays_and_batch_mates_apply_once(pg_store, postgres_url):
    store = pg_store
    attempts: list[str] = []

    def record_unless_recorded(txn):
        found = txn.recorded(KEY)
        if found is not None:
            attempts.append("found")
            return found
        attempts.append("recording")
        if len(attempts) == 1:
            _elsewhere(
                postgres_url,
                "INSERT INTO outcome (key, fingerprint, reason, payload, recorded_at_ms) VALUES (%s, %s, NULL, %s, 1)",
                (KEY, THEIRS.fingerprint, THEIRS.payload),
            )
        txn.record(KEY, OURS, 2)
        return OURS

    taken, answer = await asyncio.gather(
        store.transact(lambda txn: take_stock(txn, "sku", 3)),
        store.transact(record_unless_recorded, prefetch=Prefetch(keys=(KEY,))),
    )

    assert taken is True
    assert attempts == ["recording", "found"]  # the buffered attempt lost the flush; the rerun saw their row
    assert answer == THEIRS
    assert await store.transact(lambda txn: txn.recorded(KEY)) == THEIRS
    assert await _stock(store) == Stock("sku", 100, 97, 3, 0, 2)  # the batch-mate took its 3 exactly once


async def test_a_reservation_created_elsewhere_after_the_prefetch_loses_the_compare_and_set(pg_store, postgres_url):
    store = pg_store
    hold = Reservation("r1", "o1", "sku", 2, State.RESERVED, 1, 10**15)
    outcomes: list[str] = []

    def create(txn):
        if reservation(txn, "r1") is not None:
            outcomes.append("exists")
            return "exists"
        if not outcomes:
            _elsewhere(
                postgres_url,
                "INSERT INTO reservation (reservation_id, order_id, sku_id, quantity, state, version, expires_at_ms)"
                " VALUES ('r1', 'theirs', 'sku', 1, %s, 1, 5)",
                (int(State.RESERVED),),
            )
        outcomes.append("created")
        assert take_stock(txn, "sku", 2)
        save_reservation(txn, hold, 0)
        return "created"

    assert await store.transact(create, prefetch=Prefetch(rows={"reservation": ("r1",), "stock": ("sku",)})) == "exists"
    assert outcomes == ["created", "exists"]
    assert (await store.transact(lambda txn: reservation(txn, "r1"))).order_id == "theirs"
    assert await _stock(store) == Stock("sku", 100, 100, 0, 0, 1)  # our take was undone with the batch


async def test_a_statement_error_inside_a_move_fails_that_move_alone(store):
    def take_then_break(txn):
        assert take_stock(txn, "sku", 5)
        txn._execute("SELECT no_such_column FROM stock")

    results = await asyncio.gather(
        store.transact(lambda txn: take_stock(txn, "sku", 1)),
        store.transact(take_then_break),
        store.transact(lambda txn: take_stock(txn, "sku", 2)),
        return_exceptions=True,
    )

    assert results[0] is True and results[2] is True
    assert isinstance(results[1], (psycopg.errors.UndefinedColumn, sqlite3.OperationalError))
    assert await _stock(store) == Stock("sku", 100, 97, 3, 0, 3)


async def test_a_range_query_sees_the_writes_of_earlier_moves_in_its_batch(store):
    hold = Reservation("due", "o1", "sku", 1, State.RESERVED, 1, 50)

    saved, due = await asyncio.gather(
        store.transact(lambda txn: save_reservation(txn, hold, 0)),
        store.transact(lambda txn: [r.reservation_id for r in due_holds(txn, 100, 10)]),
    )

    assert saved is None and due == ["due"]


async def test_a_move_that_writes_then_asks_a_range_query_sees_its_own_write(store):
    """Half a move cannot be flushed and then undone in memory: this one runs
    on the savepoint path instead, with the same answer."""
    hold = Reservation("due", "o1", "sku", 1, State.RESERVED, 1, 50)

    def write_then_query(txn):
        save_reservation(txn, hold, 0)
        return [r.reservation_id for r in due_holds(txn, 100, 10)]

    assert await store.transact(write_then_query) == ["due"]
    assert (await store.transact(lambda txn: reservation(txn, "due"))) == hold
