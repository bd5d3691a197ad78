"""The store of record at scale: PostgreSQL, through psycopg 3.

Moves keep the embedded store's shape: group commit on worker threads, one
connection each (the pool, sized by `--store-pool`). psycopg 3's blocking
calls on a dedicated thread were measured against asyncpg and psycopg's async
mode on this very transaction: batched on one writer, half the Python CPU per
move and the highest moves/s; a second writer buys nothing on a hot SKU,
whose row lock one batch holds at a time.
Instances share the database, so reads inside a move lock their row
(`FOR UPDATE`) and a lost compare-and-set reruns the move on the winner's
state; a deadlock between two batches reruns the losing batch.
"""

from __future__ import annotations

import json
from collections.abc import Set as AbstractSet
from typing import Any

import psycopg
from psycopg import errors

from holdfast.batch import BufferedStore, Changes, Named, Rows
from holdfast.redaction import redact_url, scrub, secrets_of
from holdfast.store import (
    ENTITY_COLUMNS,
    RESERVATION_COLUMNS,
    Entity,
    Record,
    Reservation,
    Row,
    SqlTxn,
    Stock,
    entity_of_row,
    reservation_of_row,
    schema,
)

# A flush statement fails, rather than reports, a short row count: so the
# COMMIT can ride in the same pipeline, and is skipped when one fails.
EXPECT_ROWS = """
CREATE OR REPLACE FUNCTION holdfast_expect_rows(written BIGINT, expected BIGINT) RETURNS BIGINT
LANGUAGE plpgsql AS $$
BEGIN
  IF written <> expected THEN
    RAISE EXCEPTION 'holdfast: wrote % of % rows', written, expected USING ERRCODE = 'HF409';
  END IF;
  RETURN written;
END $$;
"""
SHORT_WRITE = "HF409"  # the SQLSTATE it raises
SCHEMA = schema(integer="BIGINT", blob="BYTEA") + EXPECT_ROWS
# Instances starting together must not race on CREATE TABLE.
SCHEMA_LOCK = "SELECT pg_advisory_xact_lock(hashtext('holdfast.schema'))"


class PostgresTxn(SqlTxn):
    LOCK = " FOR UPDATE"

    # PostgreSQL text cannot hold NUL, so no stored id contains one: an id that
    # does is simply not found (validation keeps NUL out of every write).
    def stock(self, sku_id: str) -> Stock | None:
        return None if "\x00" in sku_id else super().stock(sku_id)

    def reservation(self, reservation_id: str) -> Reservation | None:
        return None if "\x00" in reservation_id else super().reservation(reservation_id)

    def entity(self, entity_id: str) -> Entity | None:
        return None if "\x00" in entity_id else super().entity(entity_id)

    def due_entities(self, kind: str, now_ms: int, limit: int) -> list[Entity]:
        return [] if "\x00" in kind else super().due_entities(kind, now_ms, limit)


# -- a batch as set-based statements (holdfast.batch) ----------------------------
#
# A batch's rows travel as one JSON parameter per statement, an array of
# arrays (bytes as hex), which the server unpacks: json.dumps is C, where
# psycopg dumps a Python list element by element (measured on a 30-row
# insert: ~280 against ~620 µs of client CPU, which the event loop shares).


def _json_rows(columns: tuple[tuple[str, str], ...]) -> str:
    """`SELECT`s body turning each element j of the JSON parameter into a row:
    column i is j->>i as its type (bytea from hex)."""
    values = [
        f"decode(j->>{i}, 'hex') AS {name}" if kind == "bytea" else f"(j->>{i})::{kind} AS {name}"
        for i, (name, kind) in enumerate(columns)
    ]
    return ", ".join(values) + " FROM json_array_elements(%s::json) AS j"


_OUTCOME = (("key", "bytea"), ("fingerprint", "bytea"), ("reason", "text"), ("payload", "bytea"), ("recorded_at_ms", "bigint"))
_RESERVATION = (("reservation_id", "text"), ("order_id", "text"), ("sku_id", "text"), ("quantity", "bigint"),
                ("state", "int"), ("version", "bigint"), ("expires_at_ms", "bigint"), ("retry_count", "int"),
                ("release_reason", "text"))
_ENTITY = (("entity_id", "text"), ("kind", "text"), ("state", "int"), ("version", "bigint"), ("data", "bytea"),
           ("lease_owner", "text"), ("lease_until_ms", "bigint"), ("due_at_ms", "bigint"))
_STOCK = (("sku_id", "text"), ("total", "bigint"), ("available", "bigint"), ("held", "bigint"), ("sold", "bigint"),
          ("version", "bigint"))
_KEYS = "(SELECT decode(value, 'hex') FROM json_array_elements_text(%s::json))"
_IDS = "(SELECT value FROM json_array_elements_text(%s::json))"

PREFETCH_OUTCOMES = f"SELECT key, fingerprint, reason, payload FROM outcome WHERE key IN {_KEYS}"
PREFETCH_RESERVATIONS = (
    f"SELECT {RESERVATION_COLUMNS} FROM reservation WHERE reservation_id IN {_IDS} ORDER BY reservation_id FOR UPDATE"
)
PREFETCH_ENTITIES = f"SELECT {ENTITY_COLUMNS} FROM entity WHERE entity_id IN {_IDS} ORDER BY entity_id FOR UPDATE"
# The SKUs named, and those of the reservations named (a Confirm knows only
# its reservation): the stock a move settles is locked with the rest.
PREFETCH_STOCK = (
    f"SELECT sku_id, total, available, held, sold, version FROM stock WHERE sku_id IN {_IDS}"
    f" OR sku_id IN (SELECT sku_id FROM reservation WHERE reservation_id IN {_IDS}) ORDER BY sku_id FOR UPDATE"
)
FLUSH_OUTCOMES = (
    f"INSERT INTO outcome (key, fingerprint, reason, payload, recorded_at_ms) SELECT {_json_rows(_OUTCOME)}"
    " ON CONFLICT (key) DO NOTHING"
)
FLUSH_INSERTED = (
    f"INSERT INTO reservation ({RESERVATION_COLUMNS}) SELECT {_json_rows(_RESERVATION)}"
    " ON CONFLICT (reservation_id) DO NOTHING"
)
FLUSH_UPDATED = (
    "UPDATE reservation AS r SET order_id = u.order_id, sku_id = u.sku_id, quantity = u.quantity, state = u.state,"
    " version = u.version, expires_at_ms = u.expires_at_ms, retry_count = u.retry_count,"
    " release_reason = u.release_reason"
    f" FROM (SELECT {_json_rows((*_RESERVATION, ('stored', 'bigint')))}) AS u"
    " WHERE r.reservation_id = u.reservation_id AND r.version = u.stored"
)
FLUSH_INSERTED_ENTITIES = (
    f"INSERT INTO entity ({ENTITY_COLUMNS}) SELECT {_json_rows(_ENTITY)} ON CONFLICT (entity_id) DO NOTHING"
)
# The kind is left as inserted: a machine never turns into another.
FLUSH_UPDATED_ENTITIES = (
    "UPDATE entity AS e SET state = u.state, version = u.version, data = u.data, lease_owner = u.lease_owner,"
    " lease_until_ms = u.lease_until_ms, due_at_ms = u.due_at_ms"
    f" FROM (SELECT {_json_rows((*_ENTITY, ('stored', 'bigint')))}) AS u"
    " WHERE e.entity_id = u.entity_id AND e.version = u.stored"
)
FLUSH_STOCK = (
    f"INSERT INTO stock (sku_id, total, available, held, sold, version) SELECT {_json_rows(_STOCK)}"
    " ON CONFLICT (sku_id) DO UPDATE SET total = excluded.total, available = excluded.available,"
    " held = excluded.held, sold = excluded.sold, version = excluded.version"
)


def _expecting(statement: str) -> str:
    """`statement`, failing with SHORT_WRITE unless it wrote as many rows as
    the second parameter says."""
    return f"WITH written AS ({statement} RETURNING 1) SELECT holdfast_expect_rows(count(*), %s) FROM written"


FLUSH = {
    kind: _expecting(statement)
    for kind, statement in (
        ("outcomes", FLUSH_OUTCOMES), ("inserted", FLUSH_INSERTED), ("updated", FLUSH_UPDATED),
        ("inserted_entities", FLUSH_INSERTED_ENTITIES), ("updated_entities", FLUSH_UPDATED_ENTITIES),
        ("stocks", FLUSH_STOCK),
    )
}


def _json(rows: list[Row]) -> str:
    return json.dumps([[v.hex() if isinstance(v, bytes) else v for v in row] for row in rows], ensure_ascii=False)


def _ids(names: AbstractSet[str]) -> list[str]:
    # PostgreSQL text cannot hold NUL: such an id names no row (PostgresTxn).
    return sorted(name for name in names if "\x00" not in name)


class PostgresStore(BufferedStore):
    TXN = PostgresTxn
    DATABASE_ERROR = psycopg.Error

    # A batch rerun with a savepoint per move holds one subtransaction per
    # move; PostgreSQL caches 64 per backend before every snapshot slows down.
    def __init__(self, url: str, workers: int = 1, batch_max: int = 64, connect_timeout_s: int = 2) -> None:
        super().__init__(workers=workers, batch_max=batch_max)
        self.url = url
        self._connect_timeout_s = connect_timeout_s
        # Parsed here, so a malformed URL is refused at once and in our
        # words: psycopg's own error quotes the URL whole, password and all.
        self.secrets = secrets_of(url)
        try:
            info = psycopg.conninfo.conninfo_to_dict(url)
        except psycopg.Error as error:
            raise ValueError(f"bad store URL {redact_url(url)!r}: {scrub(str(error).strip(), self.secrets)}") from None
        if info.get("password"):  # also from ?password=...
            self.secrets = tuple(dict.fromkeys((*self.secrets, str(info["password"]))))

    def describe(self) -> str:
        info = psycopg.conninfo.conninfo_to_dict(self.url)
        info.pop("password", None)
        host, port, name = info.get("host", "localhost"), info.get("port", "5432"), info.get("dbname", "")
        return f"postgresql://{info.get('user', '')}@{host}:{port}/{name}".replace("//@", "//")

    def _connect(self) -> psycopg.Connection:
        # A statement that waits this long is a stuck dependency, not a slow
        # move; a server that went silent is noticed by TCP, not waited on.
        return psycopg.connect(
            self.url,
            autocommit=True,
            connect_timeout=self._connect_timeout_s,
            options="-c statement_timeout=10000 -c idle_in_transaction_session_timeout=30000",
            keepalives=1,
            keepalives_idle=5,
            keepalives_interval=2,
            keepalives_count=3,
            tcp_user_timeout=10000,
            # No server-side prepared statements: psycopg's cache of them went
            # out of step with the server after aborted pipelines ("prepared
            # statement _pg3_12 does not exist", two instances racing in
            # tests/test_faults.py). A batch sends few statements, so parsing
            # them each time costs little, and PgBouncer's transaction pooling
            # works as it is.
            prepare_threshold=None,
        )

    def _create_schema(self, connection: psycopg.Connection) -> None:
        with connection.transaction():
            connection.execute(SCHEMA_LOCK)
            connection.execute(SCHEMA)
            self._stamp_schema(connection)

    def _is_unavailable(self, error: BaseException) -> bool:
        return isinstance(error, (psycopg.OperationalError, psycopg.InterfaceError)) and not self._is_retryable(error)

    def _is_retryable(self, error: BaseException) -> bool:
        return isinstance(error, (errors.DeadlockDetected, errors.SerializationFailure))

    # -- a batch, buffered: prefetch, moves in memory, flush, commit --

    def _load(self, connection: psycopg.Connection, named: Named) -> Rows:
        """BEGIN and one SELECT per table, in one round trip (entities only
        when a job named one: most batches are the inventory's)."""
        keys, rids = named.keys, named.reservations
        rows = Rows()
        if not named:
            connection.execute("BEGIN")
            return rows
        rid_list, sku_list, eid_list = _ids(rids), _ids(named.skus), _ids(named.entities)
        entities = None
        with connection.pipeline():
            connection.execute("BEGIN")
            rid_json = json.dumps(rid_list, ensure_ascii=False)
            outcomes = connection.execute(PREFETCH_OUTCOMES, (json.dumps([key.hex() for key in keys]),))
            reservations = connection.execute(PREFETCH_RESERVATIONS, (rid_json,))
            if eid_list:
                entities = connection.execute(PREFETCH_ENTITIES, (json.dumps(eid_list, ensure_ascii=False),))
            stocks = connection.execute(PREFETCH_STOCK, (json.dumps(sku_list, ensure_ascii=False), rid_json))
        found_outcomes = {bytes(k): Record(bytes(f), reason, bytes(p)) for k, f, reason, p in outcomes.fetchall()}
        for key in keys:
            rows.loaded_outcome(key, found_outcomes.get(key))
        found_reservations = {row[0]: reservation_of_row(row) for row in reservations.fetchall()}
        for rid in rids:
            if "\x00" not in rid:
                rows.loaded_reservation(rid, found_reservations.get(rid))
        found_entities = {} if entities is None else {row[0]: entity_of_row(row) for row in entities.fetchall()}
        for eid in eid_list:
            rows.loaded_entity(eid, found_entities.get(eid))
        for row in stocks.fetchall():
            rows.loaded_stock(row[0], Stock(*row))
        for sku in sku_list:
            if sku not in rows.stocks:
                rows.loaded_stock(sku, None)
        return rows

    def _write(self, connection: psycopg.Connection, changes: Changes) -> bool:
        """One multi-row statement per table, in one round trip. False when
        one of them wrote fewer rows than it holds: another writer got there
        first, and the batch must run again on the savepoint path."""
        return self._send(connection, changes, commit=False)

    def _commit(self, connection: psycopg.Connection, changes: Changes) -> bool:
        """The last writes and the COMMIT in one round trip."""
        return self._send(connection, changes, commit=True)

    def _send(self, connection: psycopg.Connection, changes: Changes, commit: bool) -> bool:
        try:
            with connection.pipeline():
                for kind, rows in changes.row_sets():
                    connection.execute(FLUSH[kind], (_json(rows), len(rows)))
                if commit:
                    connection.execute("COMMIT")
        except psycopg.Error as error:
            if error.sqlstate == SHORT_WRITE:  # the transaction is aborted; the caller rolls it back
                return False
            raise
        return True

    def _after_failure(self, connection: Any, error: BaseException) -> Any:
        if connection is not None and connection.closed:
            return None
        return super()._after_failure(connection, error)
