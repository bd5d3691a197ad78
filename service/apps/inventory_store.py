"""The inventory's rows: stock per SKU, reservations and order holds, as
tables of its own (holdfast.table), and the stock effects its moves make on
them.

Their own tables rather than generic entities: a Reserve reads and writes
both on the hot path, and the CHECKs (`available + held + sold = total`,
none negative, a positive quantity) keep the books adding up in the
database itself, even against a bug. The tables' names and columns are
the ones every store written so far holds; the columns schema 3 added carry
a DEFAULT, so an older store gains them when it opens (`Table.added`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from holdfast import Column, Query, Table, Txn
from holdfast.apps.inventory_machine import INTENTS, TERMINAL, State
# Not in the public API: a Reserve that reclaims expired holds records each
# expiry under the reaper's key, as the engine records a move (record_expiry).
from holdfast.store import Record


@dataclass(slots=True)
class Stock:
    sku_id: str
    total: int
    available: int
    held: int
    sold: int
    version: int

    def check(self) -> None:
        assert self.available + self.held + self.sold == self.total, f"stock of {self.sku_id} does not add up: {self}"
        assert min(self.available, self.held, self.sold) >= 0, f"negative stock for {self.sku_id}: {self}"


@dataclass(slots=True)
class Reservation:
    reservation_id: str
    order_id: str
    sku_id: str
    quantity: int
    state: State
    version: int
    expires_at_ms: int
    retry_count: int = 0
    # Why it was released: the client's reason, or "hold expired" for the reaper.
    release_reason: str = ""
    # The units a Confirm that named a quantity sold (the rest of the hold
    # went back to available); 0 when the whole hold was confirmed without
    # naming one, as every Confirm before partial confirms did.
    confirmed_quantity: int = 0
    # The order hold this reservation is a line of ("" for a lone Reserve's):
    # a line moves only with its order (holdfast.apps.inventory).
    order_hold_id: str = ""

    def sold(self) -> int:
        """The units this reservation sold: none unless CONFIRMED."""
        if self.state != State.CONFIRMED:
            return 0
        return self.confirmed_quantity or self.quantity


@dataclass(slots=True)
class OrderHold:
    """Several reservations (its lines, one per SKU) held, confirmed,
    released or expired together, each move in one transaction. Its state
    is the one every line is in; `line_ids` are the lines' reservation ids
    in the order of the request's lines, joined by commas (an id has none)."""

    order_hold_id: str
    order_id: str
    state: State
    version: int
    expires_at_ms: int
    line_ids: str
    release_reason: str = ""

    @property
    def lines(self) -> tuple[str, ...]:
        return tuple(self.line_ids.split(","))


@dataclass(slots=True)
class PrunedSale:
    """The units a SKU's pruned reservations had sold (holdfast.retention):
    what keeps `sold` accountable once the reservations that sold it are
    gone (holdfast verify adds it to the sales of the ones still kept)."""

    sku_id: str
    sold: int


def _reservation_of(values: Sequence[Any]) -> Reservation:
    return Reservation(values[0], values[1], values[2], values[3], State(values[4]), *values[5:])


def _values_of(r: Reservation) -> tuple[Any, ...]:
    """The state as a plain int: a driver would write an IntEnum by its name."""
    return (r.reservation_id, r.order_id, r.sku_id, r.quantity, int(r.state), r.version, r.expires_at_ms,
            r.retry_count, r.release_reason, r.confirmed_quantity, r.order_hold_id)


def _order_hold_of(values: Sequence[Any]) -> OrderHold:
    return OrderHold(values[0], values[1], State(values[2]), *values[3:])


def _order_hold_values(o: OrderHold) -> tuple[Any, ...]:
    return (o.order_hold_id, o.order_id, int(o.state), o.version, o.expires_at_ms, o.line_ids, o.release_reason)


def _stock_of(values: Sequence[Any]) -> Stock:
    return Stock(*values)


def _copy_stock(s: Stock) -> Stock:
    return Stock(s.sku_id, s.total, s.available, s.held, s.sold, s.version)


def _stock_refused(s: Stock) -> str | None:
    if min(s.total, s.available, s.held, s.sold) < 0 or s.available + s.held + s.sold != s.total:
        return f"stock {s.sku_id!r}: CHECK (available + held + sold = total), none negative, refuses {s}"
    return None


def _reservation_refused(r: Reservation) -> str | None:
    if r.quantity <= 0:
        return f"reservation {r.reservation_id}: quantity must be positive (CHECK quantity > 0)"
    if not 0 <= r.confirmed_quantity <= r.quantity:
        return f"reservation {r.reservation_id}: confirmed_quantity must be within 0..quantity (CHECK)"
    return None


def _order_hold_refused(o: OrderHold) -> str | None:
    return None if o.line_ids else f"order hold {o.order_hold_id}: an order has lines (CHECK line_ids <> '')"


# The holds whose time is up: what the reaper releases, oldest first.
DUE_HOLDS: Query[Reservation] = Query(
    where="state = %s AND expires_at_ms <= %s",
    order_by="expires_at_ms, reservation_id",
    matches=lambda r, params: r.state == params[0] and r.expires_at_ms <= params[1],
    order=lambda r: (r.expires_at_ms, r.reservation_id),
    candidate=lambda r: r.state is State.RESERVED,
)
# A SKU's lone holds whose time is up: what a Reserve short of stock
# reclaims, oldest first (docs/reclaim.md). An order's lines are left to
# the reaper, which expires them with their order.
EXPIRED_HOLDS: Query[Reservation] = Query(
    where="sku_id = %s AND state = %s AND order_hold_id = '' AND expires_at_ms <= %s",
    order_by="expires_at_ms, reservation_id",
    matches=lambda r, params: r.sku_id == params[0] and r.state == params[1] and not r.order_hold_id
    and r.expires_at_ms <= params[2],
    order=lambda r: (r.expires_at_ms, r.reservation_id),
    candidate=lambda r: r.state is State.RESERVED and not r.order_hold_id,
)
# Write-ahead intents a crashed writer left: what recovery drives on.
_INTENT_STATES = tuple(sorted(int(s) for s in INTENTS))
OPEN_INTENTS: Query[Reservation] = Query(
    where="state IN (" + ", ".join(["%s"] * len(_INTENT_STATES)) + ")",
    order_by="reservation_id",
    matches=lambda r, params: r.state in INTENTS,
    order=lambda r: r.reservation_id,
)

# Settled a retention ago: what retention prunes (holdfast.retention). A
# hold settles by its expiry at the latest (a Confirm or Release comes
# before it, the reaper's expiry at it), so `expires_at_ms` bounds when; a
# line of an order goes with its order.
_TERMINAL_STATES = tuple(sorted(int(s) for s in TERMINAL))
_TERMINAL_MARKS = ", ".join(["%s"] * len(_TERMINAL_STATES))
SETTLED_HOLDS: Query[Reservation] = Query(
    where=f"state IN ({_TERMINAL_MARKS}) AND expires_at_ms < %s AND order_hold_id = ''",
    order_by="expires_at_ms, reservation_id",
    matches=lambda r, params: r.state in params[:-1] and r.expires_at_ms < params[-1] and not r.order_hold_id,
    order=lambda r: (r.expires_at_ms, r.reservation_id),
)
SETTLED_ORDERS: Query[OrderHold] = Query(
    where=f"state IN ({_TERMINAL_MARKS}) AND expires_at_ms < %s",
    order_by="expires_at_ms, order_hold_id",
    matches=lambda o, params: o.state in params[:-1] and o.expires_at_ms < params[-1],
    order=lambda o: (o.expires_at_ms, o.order_hold_id),
)

RESERVATIONS: Table[Reservation] = Table(
    "reservation",
    (
        Column("reservation_id", "text"),
        Column("order_id", "text"),
        Column("sku_id", "text"),
        Column("quantity", "integer", "NOT NULL CHECK (quantity > 0)"),
        Column("state", "integer"),
        Column("version", "integer"),
        Column("expires_at_ms", "integer"),
        Column("retry_count", "integer", "NOT NULL DEFAULT 0"),
        Column("release_reason", "text", "NOT NULL DEFAULT ''"),
        # Added by schema 3: a store written before gains them with their defaults.
        Column("confirmed_quantity", "integer", "NOT NULL DEFAULT 0 CHECK (confirmed_quantity >= 0)"),
        Column("order_hold_id", "text", "NOT NULL DEFAULT ''", fixed=True),
    ),
    Reservation,
    snapshot=True,
    noun="reservation",
    # `reservation_reclaim` serves EXPIRED_HOLDS in its own order, so the
    # query reads only the rows it answers. Every store makes its indexes
    # (CREATE INDEX IF NOT EXISTS) each time it opens: one written before
    # gains it then, with no schema version of its own (an older holdfast
    # simply does not use it).
    indexes=(
        ("reservation_due", "state, expires_at_ms"),
        ("reservation_reclaim", "sku_id, state, order_hold_id, expires_at_ms, reservation_id"),
    ),
    refused=_reservation_refused,
    of_values=_reservation_of,
    values_of=_values_of,
    queries=(DUE_HOLDS, EXPIRED_HOLDS, OPEN_INTENTS, SETTLED_HOLDS),
)
# Stock is written under its row lock, not by compare-and-set: racing
# Reserves of one SKU never conflict, those that find too little simply
# do not take it. A move on a reservation locks its SKU's stock with it.
STOCK: Table[Stock] = Table(
    "stock",
    (
        Column("sku_id", "text"),
        Column("total", "integer", "NOT NULL CHECK (total >= 0)"),
        Column("available", "integer", "NOT NULL CHECK (available >= 0)"),
        Column("held", "integer", "NOT NULL CHECK (held >= 0)"),
        Column("sold", "integer", "NOT NULL CHECK (sold >= 0)"),
        Column("version", "integer"),
    ),
    Stock,
    versioned=False,
    noun="stock",
    checks=("available + held + sold = total",),
    locked_with=(("reservation", "sku_id"),),
    refused=_stock_refused,
    of_values=_stock_of,
    values_of=lambda s: (s.sku_id, s.total, s.available, s.held, s.sold, s.version),
)
ORDER_HOLDS: Table[OrderHold] = Table(
    "order_hold",
    (
        Column("order_hold_id", "text"),
        Column("order_id", "text", fixed=True),
        Column("state", "integer"),
        Column("version", "integer"),
        Column("expires_at_ms", "integer"),
        Column("line_ids", "text", "NOT NULL CHECK (line_ids <> '')", fixed=True),
        Column("release_reason", "text", "NOT NULL DEFAULT ''"),
    ),
    OrderHold,
    snapshot=True,
    noun="order hold",
    indexes=(("order_hold_due", "state, expires_at_ms"),),
    refused=_order_hold_refused,
    of_values=_order_hold_of,
    values_of=_order_hold_values,
    queries=(SETTLED_ORDERS,),
)
# Added by schema 4; only retention writes it, so it never waits on a Reserve.
PRUNED_SALES: Table[PrunedSale] = Table(
    "pruned_sale",
    (Column("sku_id", "text"), Column("sold", "integer", "NOT NULL CHECK (sold >= 0)")),
    PrunedSale,
    versioned=False,
    noun="pruned sale",
)
# In this order: a batch locks order holds before reservations before
# stock, each table's rows in key order, on every instance; a move that
# reads rows one by one (the savepoint path) reads them in the same order.
TABLES: tuple[Table[Any], ...] = (ORDER_HOLDS, RESERVATIONS, STOCK, PRUNED_SALES)


# -- what the inventory's moves do with them, inside their transaction --------------


def stock(txn: Txn, sku_id: str) -> Stock | None:
    return txn.row(STOCK, sku_id)


def put_stock(txn: Txn, row: Stock) -> None:
    row.check()
    txn.put(STOCK, row)


def take_stock(txn: Txn, sku_id: str, quantity: int) -> bool:
    """The conditional hold: False (nothing taken) when the SKU has fewer
    than `quantity` units available, or no stock at all."""
    assert quantity > 0
    found = txn.row(STOCK, sku_id)
    if found is None or found.available < quantity:
        return False
    put_stock(txn, Stock(sku_id, found.total, found.available - quantity, found.held + quantity, found.sold,
                         found.version + 1))
    return True


def settle_stock(txn: Txn, sku_id: str, quantity: int, sold: bool) -> None:
    """Held units leave the hold: sold, or back to available."""
    split_stock(txn, sku_id, quantity, quantity if sold else 0)


def split_stock(txn: Txn, sku_id: str, quantity: int, sold: int) -> None:
    """`quantity` held units leave the hold in one write: `sold` of them
    sold, the rest back to available (a partial confirm)."""
    assert 0 <= sold <= quantity, f"selling {sold} of a hold of {quantity}"
    found = txn.row(STOCK, sku_id)
    assert found is not None and found.held >= quantity, f"settling {quantity} of {sku_id} that is not held"
    put_stock(txn, Stock(sku_id, found.total, found.available + quantity - sold, found.held - quantity,
                         found.sold + sold, found.version + 1))


def reservation(txn: Txn, reservation_id: str) -> Reservation | None:
    return txn.row(RESERVATIONS, reservation_id)


def save_reservation(txn: Txn, row: Reservation, expected_version: int) -> None:
    """Compare-and-set on the version; a new reservation expects version 0."""
    txn.save(RESERVATIONS, row, expected_version)


def order_hold(txn: Txn, order_hold_id: str) -> OrderHold | None:
    return txn.row(ORDER_HOLDS, order_hold_id)


def save_order_hold(txn: Txn, row: OrderHold, expected_version: int) -> None:
    """Compare-and-set on the version; a new order hold expects version 0."""
    txn.save(ORDER_HOLDS, row, expected_version)


def due_holds(txn: Txn, now_ms: int, limit: int) -> list[Reservation]:
    return txn.select(RESERVATIONS, DUE_HOLDS, (int(State.RESERVED), now_ms), limit)


def expired_holds(txn: Txn, sku_id: str, now_ms: int, limit: int) -> list[Reservation]:
    """`sku_id`'s lone RESERVED holds expired by `now_ms`, oldest expiry first
    (then by id), at most `limit`: read from the store, not locked."""
    return txn.select(RESERVATIONS, EXPIRED_HOLDS, (sku_id, int(State.RESERVED), now_ms), limit)


def record_expiry(txn: Txn, key: bytes, reservation_id: str, payload: bytes, now_ms: int) -> None:
    """Records a hold's expiry as the reaper's move records it (holdfast.engine:
    its fingerprint is its key, its entity the hold's row, its outcome a
    success with `payload`), so that move, made later, replays it."""
    txn.record(key, Record(key, None, payload, f"{RESERVATIONS.name}:{reservation_id}"), now_ms)


def intents(txn: Txn, limit: int) -> list[Reservation]:
    return txn.select(RESERVATIONS, OPEN_INTENTS, _INTENT_STATES, limit)


def prune_settled(txn: Txn, before_ms: int, limit: int) -> list[tuple[Table[Any], str]]:
    """Deletes order holds (with their lines) and lone reservations settled
    before `before_ms`, about `limit` rows (an order's lines go whole, so
    one order may pass it), and adds what the deleted ones sold to their
    SKUs' `pruned_sale`."""
    gone: list[tuple[Table[Any], str]] = []
    sales: dict[str, int] = {}
    for order in txn.select(ORDER_HOLDS, SETTLED_ORDERS, (*_TERMINAL_STATES, before_ms), limit):
        if len(gone) >= limit:
            break
        for line_id in order.lines:
            line = txn.row(RESERVATIONS, line_id)
            if line is not None:
                _prune_reservation(txn, line, sales, gone)
        if txn.delete(ORDER_HOLDS, order.order_hold_id):
            gone.append((ORDER_HOLDS, order.order_hold_id))
    if len(gone) < limit:
        for lone in txn.select(RESERVATIONS, SETTLED_HOLDS, (*_TERMINAL_STATES, before_ms), limit - len(gone)):
            _prune_reservation(txn, lone, sales, gone)
    for sku_id, sold in sorted(sales.items()):
        kept = txn.row(PRUNED_SALES, sku_id)
        txn.put(PRUNED_SALES, PrunedSale(sku_id, (0 if kept is None else kept.sold) + sold))
    return gone


def _prune_reservation(txn: Txn, found: Reservation, sales: dict[str, int], gone: list[tuple[Table[Any], str]]) -> None:
    """Its sale is counted only if this transaction deleted it: two
    instances' retention may pick the same row, and only one deletes it."""
    assert found.state in TERMINAL, f"pruning {found.reservation_id}, which is {found.state.name}"
    if not txn.delete(RESERVATIONS, found.reservation_id):
        return
    if found.sold():
        sales[found.sku_id] = sales.get(found.sku_id, 0) + found.sold()
    gone.append((RESERVATIONS, found.reservation_id))
