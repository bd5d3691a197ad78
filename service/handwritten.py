"""The inventory service a team writes instead of using holdfast: the benchmark's
hand-written baseline (issue 14), run as

    python -m holdfast.handwritten --listen 127.0.0.1:PORT --postgres URL --redis URL

It serves the same proto service as holdfast's inventory
(`holdfast.inventory.v1.InventoryService`: PutStock, GetStock, Reserve,
Confirm, Release and GetReservation; the order methods answer UNIMPLEMENTED),
with the same requests and replies, so one benchmark client drives both. Once
it serves it prints one line to stdout, `handwritten serving InventoryService
on HOST:PORT (...)`, and it stops cleanly on SIGTERM or SIGINT.

Why it is built this way: it is what users would pick instead, not a straw
man, so each choice is the one a tutorial or a peer service makes.

* grpc.aio with the generated servicer (`add_InventoryServiceServicer_to_server`),
  on uvloop when it is installed, as holdfast runs (holdfast.loop). Handlers
  return messages and gRPC serializes them.
* A `transitions.Machine` per request, built for the reservation's state as
  the library's tutorial does (`Machine(model=..., states=..., transitions=...,
  initial=...)`, defaults otherwise): the state machine is the point of the
  baseline, so it is not cached.
* PostgreSQL through asyncpg, a pool of a few connections (`--pool-size`,
  4), one transaction per write, in the shape of the usual "idempotency keys in
  Postgres" write-up: the key's row first (`INSERT ... ON CONFLICT DO
  NOTHING`), so a duplicate waits for the first call's commit and then gets
  its stored reply bytes back, byte for byte; then the conditional stock update
  (`UPDATE ... WHERE available >= $1`: row locks and PostgreSQL's re-check
  after the wait are what keep concurrent Reserves from overselling), the
  reservation's row, and the reply stored on the key's row. A key reused with
  a different request is ALREADY_EXISTS. Replies are those holdfast fills
  (ids, state, version, quantities, expiry), and the reservation id is derived
  from the Reserve key the way holdfast derives it (sha256 of the JSON of the
  method's full name and the key fields, "rsv_" and 24 hex digits), so a
  client computes the id to Confirm without reading the reply.
* Redis through redis-py (redis.asyncio) around the transaction: the
  reservation's (or SKU's) cached state and version read with HGETALL
  before, written with HSET after the commit, the cache a typical service
  keeps. It is never trusted: every decision reads PostgreSQL inside the
  transaction, so here the cache decides nothing (a stale entry is only
  logged at DEBUG), and a Redis that fails or is down is logged and skipped.
  GetStock reads PostgreSQL, never the cache.
* Refusals are gRPC statuses with a `google.rpc.Status` carrying an
  ErrorInfo (domain "handwritten", reasons named as holdfast names them:
  INSUFFICIENT_STOCK, SKU_NOT_FOUND, RESERVATION_NOT_FOUND, ...), as
  Google's API design guide (AIP-193) asks: NOT_FOUND for an unknown SKU or
  reservation, FAILED_PRECONDITION for too little stock or a move the state
  does not allow, INVALID_ARGUMENT for a bad request.

What it does not do, compared with holdfast (so the benchmark compares
honestly):

* No snapshot double check: nothing compares the cache with the store, and the
  cache is not part of any write's decision.
* No journal, no replay or verification tooling, no contracts read from the
  .proto (no deadlines, retry policy or key fields enforced from it: the key
  fields are written into the handlers), no metrics.
* A refusal is not recorded under its key: the transaction rolls back with
  the key's row, so a retry of a refused Reserve may succeed after a restock
  (holdfast replays its INSUFFICIENT_STOCK).
* No reaper: a hold past its expiry is refused at Confirm (HOLD_EXPIRED)
  but its units stay held until a Release returns them.
* No order holds (ReserveOrder and the rest answer UNIMPLEMENTED), no lease or
  intent recovery, no retention of keys (the key table grows), no TLS or
  tokens, no Redis Cluster (a `redis://` URL only).
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import signal
import sys
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import asyncpg
import grpc
import redis.asyncio as aioredis
from google.protobuf import any_pb2
from google.rpc import error_details_pb2, status_pb2
from transitions import Machine, MachineError

from holdfast.inventory.v1 import inventory_pb2 as pb
from holdfast.inventory.v1 import inventory_pb2_grpc as pb_grpc
from holdfast.loop import name as loop_name
from holdfast.loop import run as run_loop

log = logging.getLogger("holdfast.handwritten")

READY_LINE = "handwritten serving "
SERVICE_NAME = "holdfast.inventory.v1.InventoryService"
METHOD_PREFIX = f"/{SERVICE_NAME}/"
DOMAIN = "handwritten"
ID_LENGTH_MAX = 128
REASON_LENGTH_MAX = 512
HOLD_DEFAULT_MS = 15 * 60 * 1000
HOLD_MAX_MS = 7 * 24 * 60 * 60 * 1000
POOL_SIZE = 4
STOP_GRACE_S = 5.0

SCHEMA = """
CREATE TABLE IF NOT EXISTS hw_stock (
    sku_id     text PRIMARY KEY,
    total      bigint NOT NULL,
    available  bigint NOT NULL,
    held       bigint NOT NULL DEFAULT 0,
    sold       bigint NOT NULL DEFAULT 0,
    version    bigint NOT NULL DEFAULT 1,
    CHECK (available >= 0 AND held >= 0 AND sold >= 0 AND available + held + sold = total)
);
CREATE TABLE IF NOT EXISTS hw_reservation (
    reservation_id     text PRIMARY KEY,
    order_id           text NOT NULL,
    sku_id             text NOT NULL,
    quantity           bigint NOT NULL,
    state              text NOT NULL,
    version            bigint NOT NULL,
    expires_at_ms      bigint NOT NULL,
    confirmed_quantity bigint NOT NULL DEFAULT 0,
    release_reason     text NOT NULL DEFAULT '',
    updated_at         timestamptz NOT NULL DEFAULT now()
);
CREATE TABLE IF NOT EXISTS hw_idempotency (
    method       text NOT NULL,
    key          text NOT NULL,
    request_hash bytea NOT NULL,
    reply        bytea,
    created_at   timestamptz NOT NULL DEFAULT now(),
    PRIMARY KEY (method, key)
);
"""
SCHEMA_LOCK = 0x68770001  # an advisory lock: two instances starting at once create the tables once

# -- the state machine, as the transitions tutorial builds one -------------------

STATES = ["AVAILABLE", "RESERVED", "CONFIRMED", "RELEASED"]
TRANSITIONS = [
    {"trigger": "reserve", "source": "AVAILABLE", "dest": "RESERVED"},
    {"trigger": "confirm", "source": "RESERVED", "dest": "CONFIRMED"},
    {"trigger": "release", "source": "RESERVED", "dest": "RELEASED"},
]


class ReservationModel:
    """The model a Machine drives: `state`, and a method per trigger."""

    state: str


def reservation_machine(state: str) -> ReservationModel:
    """A fresh Machine for one request, started at the reservation's state."""
    model = ReservationModel()
    Machine(model=model, states=STATES, transitions=TRANSITIONS, initial=state)
    return model


def move(state: str, trigger: str, reservation_id: str) -> str:
    """The state `trigger` leads to from `state`; a refusal when it is not allowed."""
    model = reservation_machine(state)
    try:
        getattr(model, trigger)()
    except MachineError:
        raise Refused(grpc.StatusCode.FAILED_PRECONDITION, "INVALID_TRANSITION",
                      f"cannot {trigger} reservation {reservation_id} in state {state}",
                      {"reservation_id": reservation_id, "state": state}) from None
    return model.state


# -- keys, ids and refusals --------------------------------------------------------


def idempotency_key(method: str, *values: object) -> str:
    """sha256 hex of the JSON of the method's full name and the key fields."""
    encoded = json.dumps([METHOD_PREFIX + method, *values], ensure_ascii=False)
    return hashlib.sha256(encoded.encode()).hexdigest()


def reservation_id_of(reserve_key: str) -> str:
    """The reservation a Reserve names: derived from its key, so a retry names the same."""
    return "rsv_" + reserve_key[:24]


class Refused(Exception):
    """A refusal: a gRPC status, and the ErrorInfo reason that says which."""

    def __init__(self, code: grpc.StatusCode, reason: str, message: str,
                 metadata: Mapping[str, str] | None = None) -> None:
        super().__init__(message)
        self.code, self.reason, self.message, self.metadata = code, reason, message, dict(metadata or {})

    def trailers(self) -> tuple[tuple[str, bytes], ...]:
        info = any_pb2.Any()
        info.Pack(error_details_pb2.ErrorInfo(reason=self.reason, domain=DOMAIN, metadata=self.metadata))
        status = status_pb2.Status(code=self.code.value[0], message=self.message, details=[info])
        return (("grpc-status-details-bin", status.SerializeToString()),)


def invalid(message: str) -> Refused:
    return Refused(grpc.StatusCode.INVALID_ARGUMENT, "INVALID_REQUEST", message)


def check_ids(request: Any, *names: str) -> None:
    for name in names:
        value = getattr(request, name)
        if not value:
            raise invalid(f"{name} must be set")
        if len(value) > ID_LENGTH_MAX:
            raise invalid(f"{name} must be at most {ID_LENGTH_MAX} characters, got {len(value)}")
        if any(ord(c) < 0x20 or ord(c) == 0x7F for c in value):
            raise invalid(f"{name} must not contain control characters")


def now_ms() -> int:
    return time.time_ns() // 1_000_000


# -- replies -----------------------------------------------------------------------


def stock_reply(row: Mapping[str, Any]) -> pb.StockReply:
    return pb.StockReply(sku_id=row["sku_id"], total=row["total"], available=row["available"],
                         held=row["held"], sold=row["sold"], version=row["version"])


def reservation_reply(row: Mapping[str, Any]) -> pb.ReservationReply:
    confirmed = row["confirmed_quantity"]
    return pb.ReservationReply(
        reservation_id=row["reservation_id"],
        order_id=row["order_id"],
        sku_id=row["sku_id"],
        quantity=row["quantity"],
        state=pb.ReservationState.Value("RESERVATION_STATE_" + row["state"]),
        version=row["version"],
        expires_at_ms=row["expires_at_ms"],
        confirmed_quantity=confirmed,
        returned_quantity=row["quantity"] - confirmed if confirmed else 0,
    )


def sku_not_found(sku_id: str) -> Refused:
    return Refused(grpc.StatusCode.NOT_FOUND, "SKU_NOT_FOUND", f"no stock is recorded for SKU {sku_id!r}",
                   {"sku_id": sku_id})


def reservation_not_found(rid: str) -> Refused:
    return Refused(grpc.StatusCode.NOT_FOUND, "RESERVATION_NOT_FOUND", f"no reservation {rid!r}",
                   {"reservation_id": rid})


RESERVATION_COLUMNS = "reservation_id, order_id, sku_id, quantity, state, version, expires_at_ms, confirmed_quantity"
STOCK_COLUMNS = "sku_id, total, available, held, sold, version"

Work = Callable[[asyncpg.Connection], Awaitable[tuple[Any, Mapping[str, str]]]]


# -- the servicer --------------------------------------------------------------------


class HandwrittenInventory(pb_grpc.InventoryServiceServicer):
    def __init__(self, pool: asyncpg.Pool, cache: aioredis.Redis) -> None:
        self.pool = pool
        self.cache = cache

    # -- RPCs --

    async def PutStock(self, request: pb.PutStockRequest, context: grpc.aio.ServicerContext) -> pb.StockReply:
        async def work(conn: asyncpg.Connection) -> tuple[Any, Mapping[str, str]]:
            row = await conn.fetchrow(
                f"""INSERT INTO hw_stock AS s (sku_id, total, available) VALUES ($1, $2, $2)
                    ON CONFLICT (sku_id) DO UPDATE
                       SET total = EXCLUDED.total, available = EXCLUDED.total - s.held - s.sold,
                           version = s.version + 1
                     WHERE EXCLUDED.total >= s.held + s.sold
                    RETURNING {STOCK_COLUMNS}""",
                request.sku_id, request.total,
            )
            if row is None:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION, "STOCK_BELOW_COMMITTED",
                              f"total {request.total} is below the units held or sold for {request.sku_id}",
                              {"sku_id": request.sku_id})
            return stock_reply(row), {"total": str(row["total"]), "version": str(row["version"])}

        def checked() -> None:
            check_ids(request, "sku_id", "request_id")
            if request.total < 0:
                raise invalid(f"total must be zero or more, got {request.total}")

        return await self._write(context, checked, "PutStock", (request.sku_id, request.request_id),
                                 request, f"hw:stock:{request.sku_id}", work, pb.StockReply)

    async def GetStock(self, request: pb.GetStockRequest, context: grpc.aio.ServicerContext) -> pb.StockReply:
        try:
            check_ids(request, "sku_id")
            row = await self._store(self.pool.fetchrow(
                f"SELECT {STOCK_COLUMNS} FROM hw_stock WHERE sku_id = $1", request.sku_id))
            if row is None:
                raise sku_not_found(request.sku_id)
            return stock_reply(row)
        except Refused as refused:
            await context.abort(refused.code, refused.message, trailing_metadata=refused.trailers())
            raise  # unreachable: abort raises

    async def Reserve(self, request: pb.ReserveRequest, context: grpc.aio.ServicerContext) -> pb.ReservationReply:
        key_fields = (request.order_id, request.sku_id, request.timestamp_ms)
        rid = reservation_id_of(idempotency_key("Reserve", *key_fields))
        hold_ms = request.hold_ms or HOLD_DEFAULT_MS

        def checked() -> None:
            check_ids(request, "order_id", "sku_id")
            if request.quantity <= 0:
                raise invalid(f"quantity must be positive, got {request.quantity}")
            if request.timestamp_ms < 0:
                raise invalid(f"timestamp_ms must not be negative, got {request.timestamp_ms}")
            if not 0 <= request.hold_ms <= HOLD_MAX_MS:
                raise invalid(f"hold_ms must be within 0..{HOLD_MAX_MS}, got {request.hold_ms}")

        async def work(conn: asyncpg.Connection) -> tuple[Any, Mapping[str, str]]:
            # The key is new, so is the reservation: it starts AVAILABLE.
            state = move("AVAILABLE", "reserve", rid)
            taken = await conn.fetchval(
                "UPDATE hw_stock SET available = available - $1, held = held + $1, version = version + 1"
                " WHERE sku_id = $2 AND available >= $1 RETURNING version",
                request.quantity, request.sku_id,
            )
            if taken is None:
                if await conn.fetchval("SELECT 1 FROM hw_stock WHERE sku_id = $1", request.sku_id) is None:
                    raise sku_not_found(request.sku_id)
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION, "INSUFFICIENT_STOCK",
                              f"{request.sku_id} has fewer than {request.quantity} units available",
                              {"sku_id": request.sku_id, "quantity": str(request.quantity)})
            row = await conn.fetchrow(
                f"""INSERT INTO hw_reservation (reservation_id, order_id, sku_id, quantity, state, version, expires_at_ms)
                    VALUES ($1, $2, $3, $4, $5, 1, $6) RETURNING {RESERVATION_COLUMNS}""",
                rid, request.order_id, request.sku_id, request.quantity, state, now_ms() + hold_ms,
            )
            return reservation_reply(row), {"state": row["state"], "version": str(row["version"])}

        return await self._write(context, checked, "Reserve", key_fields, request,
                                 f"hw:reservation:{rid}", work, pb.ReservationReply)

    async def Confirm(self, request: pb.ConfirmRequest, context: grpc.aio.ServicerContext) -> pb.ReservationReply:
        rid = request.reservation_id

        def checked() -> None:
            check_ids(request, "reservation_id")
            if request.quantity < 0:
                raise invalid(f"quantity must be zero (the whole hold) or more, got {request.quantity}")

        async def work(conn: asyncpg.Connection) -> tuple[Any, Mapping[str, str]]:
            found = await self._locked_reservation(conn, rid)
            if request.expected_version and request.expected_version != found["version"]:
                raise Refused(grpc.StatusCode.ABORTED, "VERSION_CONFLICT",
                              f"reservation {rid} is at version {found['version']}, not the expected"
                              f" {request.expected_version}", {"reservation_id": rid, "version": str(found["version"])})
            if found["state"] == "RESERVED" and now_ms() >= found["expires_at_ms"]:
                raise Refused(grpc.StatusCode.FAILED_PRECONDITION, "HOLD_EXPIRED",
                              f"the hold of reservation {rid} expired at {found['expires_at_ms']} ms",
                              {"reservation_id": rid})
            state = move(found["state"], "confirm", rid)
            if request.quantity > found["quantity"]:
                raise invalid(f"quantity {request.quantity} is more than the {found['quantity']} units"
                              f" reservation {rid} holds")
            sold = request.quantity or found["quantity"]
            return await self._settle(conn, found, state, sold, request.quantity, "")

        return await self._write(context, checked, "Confirm", (rid,), request,
                                 f"hw:reservation:{rid}", work, pb.ReservationReply)

    async def Release(self, request: pb.ReleaseRequest, context: grpc.aio.ServicerContext) -> pb.ReservationReply:
        rid = request.reservation_id

        def checked() -> None:
            check_ids(request, "reservation_id")
            if len(request.reason) > REASON_LENGTH_MAX:
                raise invalid(f"reason must be at most {REASON_LENGTH_MAX} characters")

        async def work(conn: asyncpg.Connection) -> tuple[Any, Mapping[str, str]]:
            found = await self._locked_reservation(conn, rid)
            state = move(found["state"], "release", rid)
            return await self._settle(conn, found, state, 0, 0, request.reason or "released")

        return await self._write(context, checked, "Release", (rid,), request,
                                 f"hw:reservation:{rid}", work, pb.ReservationReply)

    async def GetReservation(self, request: pb.GetReservationRequest,
                             context: grpc.aio.ServicerContext) -> pb.ReservationReply:
        try:
            check_ids(request, "reservation_id")
            row = await self._store(self.pool.fetchrow(
                f"SELECT {RESERVATION_COLUMNS} FROM hw_reservation WHERE reservation_id = $1",
                request.reservation_id))
            if row is None:
                raise reservation_not_found(request.reservation_id)
            return reservation_reply(row)
        except Refused as refused:
            await context.abort(refused.code, refused.message, trailing_metadata=refused.trailers())
            raise

    # -- the write path: cache read, one transaction, cache write --

    async def _write(self, context: grpc.aio.ServicerContext, checked: Callable[[], None], method: str,
                     key_fields: tuple[object, ...], request: Any, cache_key: str, work: Work,
                     reply_type: Any) -> Any:
        try:
            checked()
            key = idempotency_key(method, *key_fields)
            request_hash = hashlib.sha256(request.SerializeToString(deterministic=True)).digest()
            cached = await self._cache_get(cache_key)
            stored, reply, fresh = await self._store(self._transaction(method, key, request_hash, work))
        except Refused as refused:
            await context.abort(refused.code, refused.message, trailing_metadata=refused.trailers())
            raise
        if stored is not None:
            return reply_type.FromString(stored)  # the first call's bytes, serialized again as they were
        if cached and cached.get("version") != fresh.get("version"):
            log.debug("cache of %s was stale: %s, now %s", cache_key, cached, fresh)
        await self._cache_set(cache_key, fresh)
        return reply

    async def _transaction(self, method: str, key: str, request_hash: bytes,
                           work: Work) -> tuple[bytes | None, Any, Mapping[str, str]]:
        """(stored reply, None, {}) for a duplicate; (None, reply, cache fields) once committed."""
        async with self.pool.acquire() as conn:
            async with conn.transaction():
                claimed = await conn.fetchval(
                    "INSERT INTO hw_idempotency (method, key, request_hash) VALUES ($1, $2, $3)"
                    " ON CONFLICT DO NOTHING RETURNING true",
                    method, key, request_hash,
                )
                if not claimed:
                    row = await conn.fetchrow(
                        "SELECT request_hash, reply FROM hw_idempotency WHERE method = $1 AND key = $2", method, key)
                    if row["request_hash"] != request_hash:
                        raise Refused(grpc.StatusCode.ALREADY_EXISTS, "IDEMPOTENCY_KEY_REUSED",
                                      f"the idempotency key of this {method} was used by another request")
                    return row["reply"], None, {}
                reply, fresh = await work(conn)
                await conn.execute("UPDATE hw_idempotency SET reply = $3 WHERE method = $1 AND key = $2",
                                   method, key, reply.SerializeToString())
        return None, reply, fresh

    async def _locked_reservation(self, conn: asyncpg.Connection, rid: str) -> asyncpg.Record:
        found = await conn.fetchrow(
            f"SELECT {RESERVATION_COLUMNS} FROM hw_reservation WHERE reservation_id = $1 FOR UPDATE", rid)
        if found is None:
            raise reservation_not_found(rid)
        return found

    async def _settle(self, conn: asyncpg.Connection, found: asyncpg.Record, state: str, sold: int,
                      confirmed: int, why: str) -> tuple[Any, Mapping[str, str]]:
        """The hold leaves: `sold` of its units sold, the rest back to available."""
        await conn.execute(
            "UPDATE hw_stock SET available = available + $1 - $2, held = held - $1, sold = sold + $2,"
            " version = version + 1 WHERE sku_id = $3",
            found["quantity"], sold, found["sku_id"],
        )
        row = await conn.fetchrow(
            f"""UPDATE hw_reservation SET state = $2, version = version + 1, confirmed_quantity = $3,
                       release_reason = $4, updated_at = now()
                 WHERE reservation_id = $1 RETURNING {RESERVATION_COLUMNS}""",
            found["reservation_id"], state, confirmed, why,
        )
        return reservation_reply(row), {"state": row["state"], "version": str(row["version"])}

    @staticmethod
    async def _store(pending: Awaitable[Any]) -> Any:
        """The store's failures as statuses: a rolled-back transaction is ABORTED
        (retry it); a lost connection UNAVAILABLE (it may have committed)."""
        try:
            return await pending
        except asyncpg.TransactionRollbackError as error:  # serialization failure, deadlock
            raise Refused(grpc.StatusCode.ABORTED, "TRANSACTION_ROLLED_BACK", str(error)) from error
        except (OSError, asyncpg.InterfaceError, asyncpg.PostgresConnectionError,
                asyncpg.CannotConnectNowError) as error:
            raise Refused(grpc.StatusCode.UNAVAILABLE, "DEPENDENCY_UNAVAILABLE",
                          f"PostgreSQL failed: {type(error).__name__}") from error

    async def _cache_get(self, cache_key: str) -> dict[str, str]:
        try:
            return await self.cache.hgetall(cache_key)  # type: ignore[no-any-return, misc]
        except (aioredis.RedisError, OSError) as error:
            log.warning("cache read of %s failed: %s", cache_key, error)
            return {}

    async def _cache_set(self, cache_key: str, fields: Mapping[str, str]) -> None:
        try:
            await self.cache.hset(cache_key, mapping=dict(fields))  # type: ignore[misc]
        except (aioredis.RedisError, OSError) as error:
            log.warning("cache write of %s failed: %s", cache_key, error)


# -- the process ------------------------------------------------------------------------


async def create_tables(pool: asyncpg.Pool) -> None:
    async with pool.acquire() as conn:
        async with conn.transaction():
            await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK)
            await conn.execute(SCHEMA)


async def serve(listen: str, postgres: str, redis_url: str, pool_size: int = POOL_SIZE) -> None:
    pool = await asyncpg.create_pool(postgres, min_size=pool_size, max_size=pool_size)
    cache = aioredis.Redis.from_url(redis_url, decode_responses=True)
    server: grpc.aio.Server | None = None
    try:
        await create_tables(pool)
        server = grpc.aio.server()
        pb_grpc.add_InventoryServiceServicer_to_server(HandwrittenInventory(pool, cache), server)
        try:
            port = server.add_insecure_port(listen)
        except RuntimeError as error:
            raise SystemExit(f"handwritten: cannot listen on {listen}: {error}") from None
        if port == 0:
            raise SystemExit(f"handwritten: cannot listen on {listen}")
        await server.start()
        stopping = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stopping.set)
        host = listen.rsplit(":", 1)[0]
        print(f"{READY_LINE}InventoryService on {host}:{port} (postgres pool {pool_size}, redis cache,"
              f" loop {loop_name()})", flush=True)
        await stopping.wait()
        await server.stop(STOP_GRACE_S)
        server = None
    finally:
        if server is not None:
            await server.stop(0)
        await cache.aclose()
        await pool.close()
    print("handwritten stopped", file=sys.stderr, flush=True)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m holdfast.handwritten",
        description="The hand-written inventory service the benchmark runs beside holdfast.",
    )
    parser.add_argument("--listen", required=True, help="HOST:PORT to serve gRPC on (port 0: any free port)")
    parser.add_argument("--postgres", required=True, help="PostgreSQL URL (postgresql://user@host:port/db)")
    parser.add_argument("--redis", required=True, help="Redis URL of the cache (redis://host:port/db)")
    parser.add_argument("--pool-size", type=int, default=POOL_SIZE, help=f"PostgreSQL connections ({POOL_SIZE})")
    args = parser.parse_args(argv)
    if args.pool_size < 1:
        parser.error("--pool-size must be at least 1")
    logging.basicConfig(level=logging.WARNING, stream=sys.stderr, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    run_loop(serve(args.listen, args.postgres, args.redis, args.pool_size))


if __name__ == "__main__":
    main()
