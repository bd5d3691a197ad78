"""A table of the store of record, declared by the app whose rows it holds.

The core knows two tables of its own (the idempotency records, and the
framework's generic `entity` rows); an app that wants columns of its own
(the inventory's stock and reservations: rows read on every Reserve, with
CHECKs that keep the books adding up even under a bug) declares a `Table`.
Every backend builds what it needs from the declaration alone: the DDL,
the batch's one-statement prefetch and set-based flush (holdfast.batch),
the savepoint path's statements (holdfast.store), the in-memory store's
dicts and indexes (holdfast.memory). So an app's rows get group commit,
compare-and-set and the snapshot's double check exactly as the
framework's own do.

A row is an object whose attributes are named as the columns (a
dataclass); the first column is its key (text), and a versioned table's
`version` column is what compare-and-set compares.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from operator import attrgetter
from typing import Any, Generic, Literal, TypeVar

R = TypeVar("R")
ColumnType = Literal["text", "integer", "blob"]


class ColumnNotAddable(ValueError):
    """A declared column an existing table lacks cannot be added to it."""


@dataclass(frozen=True, slots=True)
class Column:
    """One column. `constraint` is SQL after the type (`NOT NULL CHECK
    (quantity > 0)`); `fixed` ones are written when the row is inserted
    and never again (an entity's kind: a machine never turns into another).
    A column declared after a table has rows in some database carries a
    DEFAULT in its constraint: the store adds it to the existing table
    (`Table.added`) and the old rows read as the default."""

    name: str
    type: ColumnType
    constraint: str = "NOT NULL"
    fixed: bool = False


@dataclass(frozen=True, slots=True)
class Query(Generic[R]):
    """A range query an app asks of one table: the rows that match `where`
    (SQL over the table's columns, `%s` for each parameter), in `order_by`,
    at most `limit`. `matches` and `order` say the same in Python, for the
    in-memory store; `candidate`, when given, is a condition every match
    meets that the in-memory store keeps an index of (what an SQL index on
    the same columns is for), so the query does not scan the whole table."""

    where: str
    order_by: str
    matches: Callable[[R, tuple[Any, ...]], bool]
    order: Callable[[R], Any]
    candidate: Callable[[R], bool] | None = None


@dataclass(frozen=True)
class Table(Generic[R]):
    """A table's declaration.

    `versioned` rows are written by compare-and-set on `version`
    (`Txn.save`); the others are upserted (`Txn.put`) under their row lock,
    as stock is. `snapshot` tables are the ones whose versions the snapshot
    double-checks: a write to one is reported in `Txn.written`, and
    `Txn.versions` lists them. `noun` names a row in answers ("reservation
    rsv_… moved concurrently", metadata `reservation_id`). `locked_with`
    names rows of this table that a move on another table will touch
    without naming them: (other table, its column holding our key), so
    a Confirm that names only its reservation has the reservation's stock
    row loaded and locked in the same prefetch. `in_place`: moves may
    change a row they read in place, so a batch copies rows in and out.
    `refused` says what the SQL schema's CHECKs would refuse, for the
    in-memory store; the column types it checks by itself. `queries` lists
    the range queries asked of the table: the in-memory store keeps the
    index of each that has a `candidate`, and refuses one it was not told of.
    """

    name: str
    columns: tuple[Column, ...]
    make: Callable[..., R]
    versioned: bool = True
    snapshot: bool = False
    noun: str = ""
    checks: tuple[str, ...] = ()
    indexes: tuple[tuple[str, str], ...] = ()
    locked_with: tuple[tuple[str, str], ...] = ()
    in_place: bool = False
    refused: Callable[[R], str | None] | None = None
    # How a driver's row becomes a row object, and back, when the row's
    # fields are not the driver's values as they are (an IntEnum state,
    # bytes a driver hands back as a buffer).
    of_values: Callable[[Sequence[Any]], R] | None = None
    values_of: Callable[[R], tuple[Any, ...]] | None = None
    queries: tuple[Query[R], ...] = ()
    key: Callable[[R], str] = field(init=False, repr=False, compare=False)
    _fixed: tuple[str, ...] = field(init=False, repr=False, compare=False)
    _getter: Callable[[R], tuple[Any, ...]] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        names = [column.name for column in self.columns]
        assert len(set(names)) == len(names), f"table {self.name}: a column is declared twice"
        assert self.columns and self.columns[0].type == "text", f"table {self.name}: the first column is the text key"
        assert not self.versioned or "version" in names, f"table {self.name}: a versioned table has a version column"
        assert not self.snapshot or self.versioned, f"table {self.name}: the snapshot holds versions of versioned rows"
        assert not self.columns[0].fixed, f"table {self.name}: the key is fixed by being the key"
        assert len(names) > 1, f"table {self.name}: a key alone is no row"
        object.__setattr__(self, "key", attrgetter(names[0]))
        object.__setattr__(self, "_fixed", tuple(column.name for column in self.columns if column.fixed))
        # attrgetter of several names answers a tuple, in C.
        object.__setattr__(self, "_getter", attrgetter(*names))

    @property
    def key_column(self) -> str:
        return self.columns[0].name

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(column.name for column in self.columns)

    @property
    def updated(self) -> tuple[str, ...]:
        """The columns an update writes: all but the key and the fixed ones."""
        return tuple(column.name for column in self.columns[1:] if not column.fixed)

    def row(self, values: Sequence[Any]) -> R:
        """A row object from a driver's values, in column order."""
        return self.make(*values) if self.of_values is None else self.of_values(values)

    def values(self, row: R) -> tuple[Any, ...]:
        """A row's values in column order, as a statement takes them."""
        if self.values_of is not None:
            return self.values_of(row)
        return self._getter(row)

    def advanced(self, row: R, expected_version: int) -> int:
        """The version a save of `row` writes: the one after `expected_version`,
        since a move advances a versioned row by exactly one."""
        assert self.versioned, f"table {self.name} is not versioned: put its rows"
        version: int = getattr(row, "version")
        assert version == expected_version + 1, "a move advances the version by exactly one"
        return version

    def stored(self, row: R | None) -> int:
        """A versioned row's version, 0 for no row (what a new row's save expects)."""
        return 0 if row is None else int(getattr(row, "version"))

    def moved_past(self, key: str, expected_version: int) -> str:
        """Why a compare-and-set lost (`Contended`), in the table's words."""
        return f"{self.noun or self.name} {key} moved past version {expected_version}"

    def refixed(self, before: R | None, after: R) -> str | None:
        """What a write of `after` over `before` would change of the fixed
        columns (None: nothing): a bug, asserted by every store."""
        if before is None or not self._fixed:
            return None
        changed = [name for name in self._fixed if getattr(before, name) != getattr(after, name)]
        return f"{self.noun or self.name} {self.key(after)} would change its {', '.join(changed)}" if changed else None

    def copy(self, row: R) -> R:
        return self.row(self.values(row))

    def ddl(self, integer: str, blob: str) -> str:
        """CREATE TABLE IF NOT EXISTS, in a backend's names
        for 64-bit integers and bytes: a store written before keeps its rows."""
        lines = [f"{self.key_column} TEXT PRIMARY KEY"]
        lines += [_column_sql(c, integer, blob) for c in self.columns[1:]]
        lines += [f"CHECK ({check})" for check in self.checks]
        body = ",\n    ".join(lines)
        return f"CREATE TABLE IF NOT EXISTS {self.name} (\n    {body}\n);"

    def index_ddl(self) -> list[str]:
        """CREATE INDEX IF NOT EXISTS for each declared index: run after the
        columns a store written before lacks were added, since an index may
        name one of them."""
        return [f"CREATE INDEX IF NOT EXISTS {index} ON {self.name} ({columns})" for index, columns in self.indexes]

    def added(self, existing: Collection[str], integer: str, blob: str) -> list[str]:
        """ALTER TABLE ... ADD COLUMN for each declared column a table made
        by an older declaration lacks (`existing`: the database's column
        names). Its rows gain the column's DEFAULT, so a column may only be
        added with one; a table the database lacks altogether is CREATE
        TABLE's, not ours. Columns are only ever added: one the database has
        and the declaration no longer names is left alone."""
        if not existing:
            return []
        statements = []
        for column in self.columns:
            if column.name in existing:
                continue
            if column is self.columns[0] or "DEFAULT" not in column.constraint.upper():
                raise ColumnNotAddable(
                    f"table {self.name}: column {column.name} is missing from the database and has no DEFAULT"
                    " for the rows it holds, so it cannot be added"
                )
            statements.append(f"ALTER TABLE {self.name} ADD COLUMN {_column_sql(column, integer, blob)}")
        return statements

    def refusal(self, row: R) -> str | None:
        """What the SQL schema would refuse of `row`: a column of the wrong
        type (NULL included), a NUL in text (PostgreSQL's text cannot hold
        one), or one of the table's CHECKs."""
        for column, value in zip(self.columns, self.values(row)):
            if column.type == "text":
                if not isinstance(value, str):
                    return f"{self.name} {self.key(row)!r}: {column.name} must be text (NOT NULL), got {value!r}"
                if "\x00" in value:
                    return f"{self.name} {self.key(row)!r}: {column.name} holds a NUL byte, which PostgreSQL text cannot"
            elif column.type == "integer" and (not isinstance(value, int) or isinstance(value, bool)):
                return f"{self.name} {self.key(row)!r}: {column.name} must be an integer (NOT NULL), got {value!r}"
            elif column.type == "blob" and not isinstance(value, bytes):
                return f"{self.name} {self.key(row)!r}: {column.name} must be bytes (NOT NULL), got {type(value).__name__}"
        return None if self.refused is None else self.refused(row)


def _column_sql(column: Column, integer: str, blob: str) -> str:
    """A column's definition, in a backend's names for 64-bit integers and bytes."""
    types = {"text": "TEXT", "integer": integer, "blob": blob}
    return f"{column.name} {types[column.type]} {column.constraint}".rstrip()
