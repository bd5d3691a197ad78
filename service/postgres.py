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

Locks are bounded by the budgets of the moves they serve (docs/locks.md):

* a batch's prefetch takes the rows it can (`SKIP LOCKED`); a move that
  names a row another session holds goes to the waiter, a thread of its
  own that waits for the row, so the batch's other moves do not;
* a worker waits at most LOCK_WAIT_MS for a row it reads on the spot, then
  hands its whole batch (rolled back) to the waiter; the waiter waits at
  most until the last deadline of its batch's moves;
* a session that stops talking mid-transaction (its process frozen, its
  host partitioned) loses its locks once it has sat idle for IDLE_MAX_MS
  while anyone waits for them: the waiter, between its waits, ends such
  sessions (and PostgreSQL's idle_in_transaction_session_timeout, when its
  timer runs). Its late commit fails on the closed connection, so nothing
  of it lands; its callers had their answers at their deadlines.
"""

from __future__ import annotations

import functools
import json
import logging
import os
from collections.abc import Sequence
from collections.abc import Set as AbstractSet
from typing import Any

import psycopg
from psycopg import errors

from holdfast import metrics
from holdfast.batch import BufferedStore, Changes, Named, Rows
from holdfast.redaction import redact_url, scrub, secrets_of
from holdfast.store import Budget, Record, Row, SqlTxn, added_columns, schema
from holdfast.table import Query, R, Table

log = logging.getLogger("holdfast.store")

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
# A batch's bounds, set for its transaction alone, in the pipeline of its BEGIN.
BOUNDS = ("SELECT set_config('statement_timeout', %s, true), set_config('lock_timeout', %s, true),"
          " set_config('idle_in_transaction_session_timeout', %s, true)")
# How long a worker waits for a row before it hands its batch to the waiter:
# far longer than a healthy batch holds a row, far shorter than a budget.
LOCK_WAIT_MS = 100
# The longest a session may sit idle inside a transaction. A healthy worker
# never does for more than a few milliseconds (it runs its batch's moves in
# between); a frozen one loses its locks after this, or sooner, once the
# last budget of its batch is spent.
IDLE_MAX_MS = 2000
# A statement of a batch with no budget (the reaper's, retention's).
STATEMENT_MAX_MS = 10000
# The waiter waits for a busy row in slices of this, and between two ends
# the holdfast sessions that have sat idle inside a transaction for longer
# than IDLE_MAX_MS. PostgreSQL's own idle_in_transaction_session_timeout
# cannot be relied on for that: a Flush message (psycopg sends one when it
# leaves a pipeline with results still to read) stops its timer until the
# next statement, and a frozen process sends none.
LEASE_CHECK_MS = 200
# Sessions of holdfast (its application_name, holdfast-<pid>) stalled
# inside a transaction past the bound: ended, so their row locks go.
END_STALLED = (
    "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity"
    " WHERE datname = current_database() AND pid <> pg_backend_pid() AND application_name LIKE 'holdfast-%%'"
    " AND state IN ('idle in transaction', 'idle in transaction (aborted)')"
    " AND state_change < now() - make_interval(secs => %s)"
)
# Instances starting together must not race on CREATE TABLE.
SCHEMA_LOCK = "SELECT pg_advisory_xact_lock(hashtext('holdfast.schema'))"
# A table's columns as the database has them, in the schema the connection
# creates its tables in (the first of its search_path).
COLUMNS_OF = "SELECT column_name FROM information_schema.columns WHERE table_schema = current_schema() AND table_name = %s"


class PostgresTxn(SqlTxn):
    LOCK = " FOR UPDATE"

    # PostgreSQL text cannot hold NUL, so no stored key contains one: a key
    # that does is simply not found (validation keeps NUL out of every write).
    def row(self, table: Table[R], key: str) -> R | None:
        return None if "\x00" in key else super().row(table, key)

    def select(self, table: Table[R], query: Query[R], params: tuple[Any, ...], limit: int) -> list[R]:
        if any(isinstance(param, str) and "\x00" in param for param in params):
            return []
        return super().select(table, query, params, limit)


# -- a batch as set-based statements (holdfast.batch) ----------------------------
#
# A batch's rows travel as one JSON parameter per statement, an array of
# arrays (bytes as hex), which the server unpacks: json.dumps is C, where
# psycopg dumps a Python list element by element (measured on a 30-row
# insert: ~280 against ~620 µs of client CPU, which the event loop shares).

_TYPES = {"text": "text", "integer": "bigint", "blob": "bytea"}


def _json_rows(columns: tuple[tuple[str, str], ...]) -> str:
    """`SELECT`s body turning each element j of the JSON parameter into a row:
    column i is j->>i as its type (bytea from hex)."""
    values = [
        f"decode(j->>{i}, 'hex') AS {name}" if kind == "bytea" else f"(j->>{i})::{kind} AS {name}"
        for i, (name, kind) in enumerate(columns)
    ]
    return ", ".join(values) + " FROM json_array_elements(%s::json) AS j"


def _typed(table: Table[Any]) -> tuple[tuple[str, str], ...]:
    return tuple((column.name, _TYPES[column.type]) for column in table.columns)


_OUTCOME = (("key", "bytea"), ("fingerprint", "bytea"), ("reason", "text"), ("payload", "bytea"), ("recorded_at_ms", "bigint"),
            ("entity", "text"))
_KEYS = "(SELECT decode(value, 'hex') FROM json_array_elements_text(%s::json))"
_IDS = "(SELECT value FROM json_array_elements_text(%s::json))"

PREFETCH_OUTCOMES = f"SELECT key, fingerprint, reason, payload FROM outcome WHERE key IN {_KEYS}"
FLUSH_OUTCOMES = (
    f"INSERT INTO outcome (key, fingerprint, reason, payload, recorded_at_ms, entity) SELECT {_json_rows(_OUTCOME)}"
    " ON CONFLICT (key) DO NOTHING"
)


def _expecting(statement: str) -> str:
    """`statement`, failing with SHORT_WRITE unless it wrote as many rows as
    the second parameter says."""
    return f"WITH written AS ({statement} RETURNING 1) SELECT holdfast_expect_rows(count(*), %s) FROM written"


@functools.cache
def _flush(kind: str, table: Table[Any] | None) -> str:
    """A table's set-based insert, compare-and-set update or upsert, failing
    on a short write."""
    if table is None:
        return _expecting(FLUSH_OUTCOMES)
    names, key = ", ".join(table.names), table.key_column
    if kind == "insert":
        statement = f"INSERT INTO {table.name} ({names}) SELECT {_json_rows(_typed(table))} ON CONFLICT ({key}) DO NOTHING"
    elif kind == "update":
        sets = ", ".join(f"{name} = u.{name}" for name in table.updated)
        statement = (f"UPDATE {table.name} AS t SET {sets} FROM (SELECT {_json_rows((*_typed(table), ('stored', 'bigint')))}) AS u"
                     f" WHERE t.{key} = u.{key} AND t.version = u.stored")
    else:
        assert kind == "upsert", kind
        sets = ", ".join(f"{name} = excluded.{name}" for name in table.updated)
        statement = (f"INSERT INTO {table.name} ({names}) SELECT {_json_rows(_typed(table))}"
                     f" ON CONFLICT ({key}) DO UPDATE SET {sets}")
    return _expecting(statement)


def _json(rows: list[Row]) -> str:
    return json.dumps([[v.hex() if isinstance(v, bytes) else v for v in row] for row in rows], ensure_ascii=False)


def _ids(names: AbstractSet[str]) -> list[str]:
    # PostgreSQL text cannot hold NUL: such a key names no row (PostgresTxn).
    return sorted(name for name in names if "\x00" not in name)


def _bounds(budget: Budget) -> tuple[str, str, str]:
    """statement_timeout, lock_timeout and idle_in_transaction_session_timeout
    for a batch: its budget, a worker's short wait for a lock (the waiter's
    whole budget), and the budget again for sitting idle, at most IDLE_MAX_MS."""
    statement = budget.ms(STATEMENT_MAX_MS)
    lock = min(LEASE_CHECK_MS if budget.waits else LOCK_WAIT_MS, statement)
    return str(statement), str(lock), str(min(budget.ms(IDLE_MAX_MS), IDLE_MAX_MS))


class PostgresStore(BufferedStore):
    TXN = PostgresTxn
    DATABASE_ERROR = psycopg.Error
    WAITER = True

    # A batch rerun with a savepoint per move holds one subtransaction per
    # move; PostgreSQL caches 64 per backend before every snapshot slows down.
    def __init__(
        self, url: str, workers: int = 1, batch_max: int = 64, connect_timeout_s: int = 2, tables: Sequence[Table[Any]] = ()
    ) -> None:
        super().__init__(workers=workers, batch_max=batch_max, tables=tables)
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
        # pg_stat_activity tells whose session is holding what: a URL's own
        # application_name wins.
        self._conninfo = url if info.get("application_name") else psycopg.conninfo.make_conninfo(
            url, application_name=f"holdfast-{os.getpid()}")

    def describe(self) -> str:
        info = psycopg.conninfo.conninfo_to_dict(self.url)
        info.pop("password", None)
        host, port, name = info.get("host", "localhost"), info.get("port", "5432"), info.get("dbname", "")
        return f"postgresql://{info.get('user', '')}@{host}:{port}/{name}".replace("//@", "//")

    def _connect(self) -> psycopg.Connection:
        # A statement that waits this long is a stuck dependency, not a slow
        # move; a server that went silent is noticed by TCP, not waited on.
        return psycopg.connect(
            self._conninfo,
            autocommit=True,
            connect_timeout=self._connect_timeout_s,
            # Each batch sets its own bounds (BOUNDS); these hold for the rest.
            options=f"-c statement_timeout={STATEMENT_MAX_MS} -c idle_in_transaction_session_timeout={IDLE_MAX_MS}",
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
            connection.execute(schema(self.tables, integer="BIGINT", blob="BYTEA") + EXPECT_ROWS)

            def columns_of(name: str) -> set[str]:
                found = connection.execute(COLUMNS_OF, (name,)).fetchall()
                return {row[0] for row in found}

            for statement in added_columns(self.tables, columns_of, integer="BIGINT", blob="BYTEA"):
                connection.execute(statement)
            self._stamp_schema(connection)

    def _is_unavailable(self, error: BaseException) -> bool:
        if isinstance(error, errors.IdleInTransactionSessionTimeout):
            return True  # the server ended the session: this process stalled past its bound
        return (isinstance(error, (psycopg.OperationalError, psycopg.InterfaceError))
                and not self._is_retryable(error) and not self._is_lock_wait(error))

    def _is_retryable(self, error: BaseException) -> bool:
        return isinstance(error, (errors.DeadlockDetected, errors.SerializationFailure))

    def _is_lock_wait(self, error: BaseException) -> bool:
        return isinstance(error, (errors.LockNotAvailable, errors.QueryCanceled))

    def _end_stalled(self, connection: Any) -> Any:
        if connection is None:
            return None
        try:
            ended = connection.execute(END_STALLED, (IDLE_MAX_MS / 1000,)).fetchone()[0]
        except psycopg.Error as error:  # not allowed to, or the server went away: the bound is PostgreSQL's then
            log.warning("could not end stalled holdfast sessions: %s", self._said(error))
            return self._after_failure(connection, error)
        if ended:
            log.warning("ended %d holdfast session(s) stalled inside a transaction for over %d ms, holding rows",
                        ended, IDLE_MAX_MS)
            metrics.STALLED_SESSIONS_ENDED.inc(ended)
        return connection

    def _begin(self, cursor: Any, budget: Budget) -> None:
        cursor.execute("BEGIN")
        cursor.execute(BOUNDS, _bounds(budget))

    # -- a batch, buffered: prefetch, moves in memory, flush, commit --

    def _load(self, connection: psycopg.Connection, named: Named, budget: Budget) -> Rows:
        """BEGIN, the batch's bounds and one SELECT per table a job named
        rows of, in one round trip, each locking its rows in key order and
        the tables in their declared order, so two batches never wait on
        each other in a cycle. A worker's SELECTs skip the rows another
        session holds, and one more SELECT per table (no lock) tells those
        from rows that do not exist: they are the batch's `busy` rows."""
        rows = Rows(self.tables)
        selects: list[tuple[Table[Any], list[str], Any, Any]] = []
        with connection.pipeline():
            connection.execute("BEGIN")
            connection.execute(BOUNDS, _bounds(budget))
            if not named:
                return rows
            outcomes = connection.execute(PREFETCH_OUTCOMES, (json.dumps([key.hex() for key in named.keys]),))
            for table in self.tables:
                where, params = self._prefetch(table, named)
                if where is None:
                    continue
                order = f" ORDER BY {table.key_column}"
                present = None if budget.waits else connection.execute(f"SELECT {table.key_column} FROM {table.name} {where}", params)
                lock = " FOR UPDATE" if budget.waits else " FOR UPDATE SKIP LOCKED"
                locked = connection.execute(f"SELECT {', '.join(table.names)} FROM {table.name} {where}{order}{lock}", params)
                selects.append((table, _ids(named.rows.get(table.name, frozenset())), locked, present))
        found_outcomes = {bytes(k): Record(bytes(f), reason, bytes(p)) for k, f, reason, p in outcomes.fetchall()}
        for key in named.keys:
            rows.loaded_outcome(key, found_outcomes.get(key))
        for table, names, locked, present in selects:
            found = {row[0]: table.row(row) for row in locked.fetchall()}
            busy = set() if present is None else {key for key, in present.fetchall()} - found.keys()
            if busy:  # not loaded: a move that reads one waits for it, on the waiter
                rows.busy[table.name] = busy
            for key in {*names, *found} - busy:
                rows.loaded(table, key, found.get(key))
        return rows

    def _prefetch(self, table: Table[Any], named: Named) -> tuple[str | None, tuple[str, ...]]:
        """`table`'s WHERE for the batch's rows: those named, and those its
        `locked_with` tables' named rows point at."""
        clauses, params = [], []
        names = _ids(named.rows.get(table.name, frozenset()))
        if names:
            clauses.append(f"{table.key_column} IN {_IDS}")
            params.append(json.dumps(names, ensure_ascii=False))
        for other, column in table.locked_with:
            others = _ids(named.rows.get(other, frozenset()))
            if others:
                other_key = self.table(other).key_column
                clauses.append(f"{table.key_column} IN (SELECT {column} FROM {other} WHERE {other_key} IN {_IDS})")
                params.append(json.dumps(others, ensure_ascii=False))
        if not clauses:
            return None, ()
        return f"WHERE {' OR '.join(clauses)}", tuple(params)

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
                for kind, table, rows in changes.row_sets():
                    connection.execute(_flush(kind, table), (_json(rows), len(rows)))
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
