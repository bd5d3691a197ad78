"""The inventory's own checks for `holdfast verify` (Inventory.verifier),
run over its tables (holdfast.apps.inventory_store) beside the framework's.

Per SKU, in one statement per page of SKUs (one snapshot of the books even
on PostgreSQL's READ COMMITTED, where two statements may see two):

* `stock_negative`: a count below zero;
* `stock_unbalanced`: `available + held + sold != total`;
* `held_mismatch`: `held` is not the quantity of its live holds (RESERVED,
  and the intents that hold stock: CONFIRMING and RELEASING, whose
  recovery settles held units; RESERVING took none yet);
* `sold_mismatch`: `sold` is not what its CONFIRMED reservations sold, and its
  pruned ones (`pruned_sale`, holdfast.retention) had sold (a
  partial confirm's `confirmed_quantity`, else the whole hold);
* `stock_missing`: a reservation holding or sold units of a SKU with no
  stock row.

Reservations resting in an intent go to the framework's intent check, and
`owner` ties outcome records to reservations where the record's own bytes
prove it: a successful Reserve's reply names the id derived from its key;
a successful Confirm's, Release's or hold expiry's key is recomputed from
the reservation id in its reply. The Reserve's key needs its timestamp_ms,
which no reply carries, so that one is told by the derived id alone;
recovery's keys need the intent's retry count, so they are not tied.

The books are duck-typed (holdfast.verify.Books): this layer does not
import the tools above it.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol, TypeVar

from google.protobuf.message import DecodeError
from holdfast.inventory.v1 import inventory_pb2 as pb

from holdfast import Txn, idempotency_key
from holdfast.apps.inventory import REAPER_METHOD, SERVICE, reservation_id
from holdfast.apps.inventory_machine import INTENTS, State
from holdfast.apps.inventory_store import PRUNED_SALES, RESERVATIONS, STOCK

T = TypeVar("T")
HOLDING = (State.RESERVED, State.CONFIRMING, State.RELEASING)
SOLD = (State.CONFIRMED,)
_METHODS = tuple(f"/{SERVICE.full_name}/{name}" for name in ("Confirm", "Release")) + (REAPER_METHOD,)


class Books(Protocol):
    page: int

    def sql(self, txn: Txn, statement: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]: ...
    def pages(self, read: Callable[[Txn, Any, int], list[T]], key: Callable[[T], Any], first: Any) -> Any: ...
    def found(self, kind: str, table: str, key: str, expected: Any, found: Any, message: str = "") -> None: ...
    def count(self, what: str, n: int) -> None: ...
    def intent(self, table: Any, key: str, version: int, state: str) -> None: ...


def _in(states: tuple[State, ...]) -> str:
    return ", ".join(str(int(s)) for s in states)


# What a CONFIRMED reservation sold (Reservation.sold): the units its Confirm
# named, or the whole hold when it named none (0), as before partial confirms.
SOLD_QUANTITY = ("COALESCE(NULLIF(r.confirmed_quantity, 0), r.quantity)"
                 if "confirmed_quantity" in RESERVATIONS.names else "r.quantity")


# A page of SKUs and, beside each, the quantities its reservations hold and sold.
STOCK_PAGE = f"""
SELECT s.sku_id, s.total, s.available, s.held, s.sold,
       COALESCE(SUM(CASE WHEN r.state IN ({_in(HOLDING)}) THEN r.quantity ELSE 0 END), 0),
       COALESCE(SUM(CASE WHEN r.state IN ({_in(SOLD)}) THEN {SOLD_QUANTITY} ELSE 0 END), 0)
         + COALESCE((SELECT p.sold FROM {PRUNED_SALES.name} AS p WHERE p.sku_id = s.sku_id), 0)
FROM (SELECT sku_id, total, available, held, sold FROM {STOCK.name} WHERE sku_id > %s ORDER BY sku_id LIMIT %s) AS s
LEFT JOIN {RESERVATIONS.name} AS r ON r.sku_id = s.sku_id
GROUP BY s.sku_id, s.total, s.available, s.held, s.sold
ORDER BY s.sku_id
"""
# Reservations that hold or sold units of a SKU the stock table lacks.
STOCKLESS_PAGE = f"""
SELECT r.reservation_id, r.sku_id, r.state, r.quantity FROM {RESERVATIONS.name} AS r
WHERE r.reservation_id > %s AND r.state IN ({_in(HOLDING + SOLD)})
  AND NOT EXISTS (SELECT 1 FROM {STOCK.name} AS s WHERE s.sku_id = r.sku_id)
ORDER BY r.reservation_id LIMIT %s
"""
INTENT_PAGE = f"""
SELECT reservation_id, state, version FROM {RESERVATIONS.name}
WHERE reservation_id > %s AND state IN ({_in(tuple(sorted(INTENTS)))}) ORDER BY reservation_id LIMIT %s
"""


class InventoryVerifier:
    async def check(self, books: Books) -> None:
        await self._stock(books)
        await self._stockless(books)
        await self._intents(books)

    async def _stock(self, books: Books) -> None:
        def read(txn: Txn, after: str, limit: int) -> list[tuple[Any, ...]]:
            return books.sql(txn, STOCK_PAGE, (after, limit))

        async for page in books.pages(read, lambda row: row[0], ""):
            books.count("stock rows", len(page))
            for sku_id, total, available, held, sold, holds, sales in page:
                holds, sales = int(holds), int(sales)
                if min(total, available, held, sold) < 0:
                    books.found("stock_negative", STOCK.name, sku_id, "every count >= 0",
                                f"total {total}, available {available}, held {held}, sold {sold}")
                if available + held + sold != total:
                    books.found("stock_unbalanced", STOCK.name, sku_id, f"available + held + sold = total {total}",
                                f"{available} + {held} + {sold} = {available + held + sold}")
                if held != holds:
                    books.found("held_mismatch", STOCK.name, sku_id, holds, held,
                                "held against the quantity of its RESERVED, CONFIRMING and RELEASING reservations")
                if sold != sales:
                    books.found("sold_mismatch", STOCK.name, sku_id, sales, sold,
                                "sold against the quantity of its CONFIRMED reservations")

    async def _stockless(self, books: Books) -> None:
        def read(txn: Txn, after: str, limit: int) -> list[tuple[Any, ...]]:
            return books.sql(txn, STOCKLESS_PAGE, (after, limit))

        async for page in books.pages(read, lambda row: row[0], ""):
            for rid, sku_id, state, quantity in page:
                books.found("stock_missing", RESERVATIONS.name, rid, f"a stock row for {sku_id}", "none",
                            f"{State(state).name} {quantity} x {sku_id}")

    async def _intents(self, books: Books) -> None:
        def read(txn: Txn, after: str, limit: int) -> list[tuple[Any, ...]]:
            return books.sql(txn, INTENT_PAGE, (after, limit))

        async for page in books.pages(read, lambda row: row[0], ""):
            for rid, state, version in page:
                books.intent(RESERVATIONS, rid, version, State(state).name)

    def owner(self, key: bytes, reason: str | None, payload: bytes) -> tuple[str, str] | None:
        """The reservation a recorded success is of, when its bytes prove it."""
        if reason is not None:
            return None
        try:
            reply = pb.ReservationReply.FromString(payload)
        except DecodeError:
            return None
        rid = reply.reservation_id
        if not rid.startswith("rsv_"):
            return None
        if rid == reservation_id(key) or any(key == idempotency_key(method, (rid,)) for method in _METHODS):
            return RESERVATIONS.name, rid
        return None
