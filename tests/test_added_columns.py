"""A table gains a column on a database an older declaration made
(holdfast.table's `Table.added`): CREATE TABLE IF NOT EXISTS leaves an
existing table as it is, so the store compares the declared columns with
the database's (PRAGMA table_info on SQLite, information_schema on
PostgreSQL) when it opens and adds the missing ones with their DEFAULT,
in its schema transaction. The old rows read as the default; nothing else
changes. Run on SQLite and PostgreSQL (`store_url`)."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from holdfast import Column, Table
from holdfast.apps.inventory_machine import State
from holdfast.apps.inventory_store import TABLES, Reservation, reservation, save_reservation
from holdfast.backends import open_store
from holdfast.store import SCHEMA_VERSION
from holdfast.table import ColumnNotAddable
from tests.test_entity_store import _made_by_an_older_holdfast
from tests.test_group_commit import read_outside


@dataclass(slots=True)
class Gadget:
    gadget_id: str
    version: int
    colour: str = "grey"
    weight_g: int = 7


_V1 = (Column("gadget_id", "text"), Column("version", "integer"))
GADGETS_V1: Table[Gadget] = Table("gadget", _V1, Gadget)
GADGETS_V2: Table[Gadget] = Table(
    "gadget",
    (*_V1, Column("colour", "text", "NOT NULL DEFAULT 'grey'"), Column("weight_g", "integer", "NOT NULL DEFAULT 7 CHECK (weight_g > 0)")),
    Gadget,
)


def _columns(url: str, table: str) -> list[str]:
    if url.startswith("sqlite://"):
        return [row[0] for row in read_outside(url, f"SELECT name FROM pragma_table_info('{table}') ORDER BY cid")]
    return [row[0] for row in read_outside(
        url, f"SELECT column_name FROM information_schema.columns WHERE table_name = '{table}' ORDER BY ordinal_position")]


class _V1Gadget:
    """A v1 row object: only the v1 columns."""

    def __init__(self, gadget_id: str, version: int) -> None:
        self.gadget_id, self.version = gadget_id, version


async def test_a_table_gains_the_declared_columns_with_their_defaults(store_url):
    old = open_store(store_url, tables=(Table("gadget", _V1, _V1Gadget),))
    await old.open()
    try:
        await old.transact(lambda txn: txn.save(old.table("gadget"), _V1Gadget("g1", 1), 0))
    finally:
        await old.close()
    assert _columns(store_url, "gadget") == ["gadget_id", "version"]

    for n in range(2):  # a second opening finds nothing to add
        new = open_store(store_url, tables=(GADGETS_V2,))
        await new.open()
        try:
            assert await new.transact(lambda txn: txn.row(GADGETS_V2, "g1")) == Gadget("g1", 1, "grey", 7)
            await new.transact(lambda txn: txn.save(GADGETS_V2, Gadget(f"g2-{n}", 1, "red", 3), 0))
            assert await new.transact(lambda txn: txn.row(GADGETS_V2, f"g2-{n}")) == Gadget(f"g2-{n}", 1, "red", 3)
        finally:
            await new.close()
        assert _columns(store_url, "gadget") == ["gadget_id", "version", "colour", "weight_g"]
    # The added column's CHECK holds, as a created one's does.
    with pytest.raises(Exception, match="(?i)check|constraint"):
        read_outside(store_url, "UPDATE gadget SET weight_g = 0 WHERE gadget_id = 'g1'")


async def test_a_column_without_a_default_is_refused_by_name(store_url):
    old = open_store(store_url, tables=(GADGETS_V1,))
    await old.open()
    await old.close()
    strict = Table("gadget", (*_V1, Column("colour", "text")), Gadget)
    with pytest.raises(ColumnNotAddable, match="column colour is missing from the database and has no DEFAULT"):
        await open_store(store_url, tables=(strict,)).open()
    assert _columns(store_url, "gadget") == ["gadget_id", "version"]  # the schema transaction changed nothing


def test_added_statements_name_only_the_missing_columns():
    assert GADGETS_V2.added({"gadget_id", "version", "colour"}, integer="BIGINT", blob="BYTEA") == [
        "ALTER TABLE gadget ADD COLUMN weight_g BIGINT NOT NULL DEFAULT 7 CHECK (weight_g > 0)"
    ]
    assert GADGETS_V2.added(set(), integer="BIGINT", blob="BYTEA") == []  # no table: CREATE TABLE makes it whole
    assert GADGETS_V2.added(set(GADGETS_V2.names) | {"gone"}, integer="BIGINT", blob="BYTEA") == []


async def test_an_older_inventory_store_gains_the_reservation_columns_and_keeps_its_rows(store_url):
    _made_by_an_older_holdfast(store_url, stamp=2)  # reservation without confirmed_quantity, order_hold_id
    store = open_store(store_url, tables=TABLES)
    await store.open()
    try:
        old = await store.transact(lambda txn: reservation(txn, "rsv_old"))
        assert old == Reservation("rsv_old", "o1", "sku", 1, State.AVAILABLE, 1, 5, 0, "", 0, "")
        line = Reservation("rsv_line", "o2", "sku", 3, State.RESERVED, 1, 5, order_hold_id="ord_1")
        await store.transact(lambda txn: save_reservation(txn, line, 0))
        assert await store.transact(lambda txn: reservation(txn, "rsv_line")) == line
    finally:
        await store.close()
    assert _columns(store_url, "reservation")[-2:] == ["confirmed_quantity", "order_hold_id"]
    assert read_outside(store_url, "SELECT version FROM holdfast_schema") == [(SCHEMA_VERSION,)]
    assert SCHEMA_VERSION == 4
