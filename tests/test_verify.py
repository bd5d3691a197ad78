"""`holdfast verify`: a clean run of the inventory reports nothing; each kind
of inconsistency, planted directly in the store (SQL) or the snapshot (a
reset ahead), is found and named; `--repair-snapshot` mends the snapshot
and a second run is clean. On SQLite and PostgreSQL + Redis (and Redis
Cluster for the snapshot), against a server that keeps running."""

from __future__ import annotations

import asyncio
import json
import sqlite3
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc
import psycopg
import pytest

from holdfast import cli, metrics
from holdfast.inventory.v1 import inventory_pb2 as pb
from holdfast.inventory.v1 import inventory_pb2_grpc as pb_grpc
from holdfast.server import Config, Running, start
from tests.support import BUILT_IN_APPS

SKU = "sku-1"


@dataclass
class Books:
    """A running server whose inventory made a few moves, and its ids."""

    server: Running
    store: str
    snapshot: str
    held: str  # RESERVED, 2 units
    confirmed: str  # CONFIRMED, 3 units
    released: str  # RELEASED, 1 unit


@pytest.fixture(params=["sqlite+memory", "postgres+redis"])
def urls(request: pytest.FixtureRequest, tmp_path) -> tuple[str, str]:
    if request.param == "sqlite+memory":
        return f"sqlite:///{tmp_path}/store.db", "memory://"
    return request.getfixturevalue("postgres_url"), request.getfixturevalue("redis_url")


async def _books(store: str, snapshot: str) -> Books:
    server = await start(Config(listen="127.0.0.1:0", store=store, snapshot=snapshot, apps=BUILT_IN_APPS))
    try:
        return await _moves(server, store, snapshot)
    except BaseException:
        await server.stop(0)
        raise


async def _moves(server: Running, store: str, snapshot: str) -> Books:
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as channel:
        stub = pb_grpc.InventoryServiceStub(channel)
        await stub.PutStock(pb.PutStockRequest(sku_id=SKU, total=10, request_id="r1"))
        await stub.PutStock(pb.PutStockRequest(sku_id="sku-2", total=4, request_id="r1"))
        ids = []
        for n, quantity in enumerate((2, 3, 1)):
            reply = await stub.Reserve(pb.ReserveRequest(order_id=f"o{n}", sku_id=SKU, quantity=quantity, timestamp_ms=n + 1))
            ids.append(reply.reservation_id)
        await stub.Confirm(pb.ConfirmRequest(reservation_id=ids[1]))
        await stub.Release(pb.ReleaseRequest(reservation_id=ids[2], reason="changed my mind"))
    return Books(server, store, snapshot, *ids)


@pytest.fixture
async def books(urls: tuple[str, str]) -> AsyncIterator[Books]:
    made = await _books(*urls)
    yield made
    await made.server.stop(0)


def plant(store: str, *statements: str, checks: bool = True) -> None:
    """SQL straight into the store, behind the server's back; `checks`
    False first lifts the stock table's CHECKs (what a bug or a hand edit
    could get past on another engine)."""
    if store.startswith("sqlite://"):
        db = sqlite3.connect(store.removeprefix("sqlite:///"), isolation_level=None)
        if not checks:
            db.execute("PRAGMA ignore_check_constraints = ON")
        for statement in statements:
            db.execute(statement)
        db.close()
        return
    with psycopg.connect(store, autocommit=True) as db:
        if not checks:
            for (name,) in db.execute("SELECT conname FROM pg_constraint WHERE conrelid = 'stock'::regclass AND contype = 'c'"):
                db.execute(f'ALTER TABLE stock DROP CONSTRAINT "{name}"')
        for statement in statements:
            db.execute(statement)


async def run(*args: str, capsys: pytest.CaptureFixture[str] | None = None) -> tuple[int, str]:
    """`holdfast verify ARGS` in a thread (it runs its own event loop), and what it printed."""
    code = await asyncio.to_thread(cli.main, ["verify", *args])
    out = capsys.readouterr().out if capsys is not None else ""
    return code, out


async def verify_json(books: Books, capsys, *more: str) -> tuple[int, dict]:
    code, out = await run("--store", books.store, "--snapshot", books.snapshot, "--json", "--intent-age-ms", "100",
                          *more, capsys=capsys)
    return code, json.loads(out)


def kinds(report: dict) -> list[tuple[str, str, str]]:
    return sorted((f["kind"], f["table"], f["key"]) for f in report["findings"])


async def test_a_clean_run_reports_nothing(books: Books, capsys) -> None:
    code, report = await verify_json(books, capsys)
    assert (code, report["findings"], report["clean"]) == (0, [], True)
    assert report["checked"]["stock rows"] == 2
    assert report["checked"]["outcome records"] >= 7
    if books.snapshot != "memory://":
        assert report["checked"]["snapshot rows"] == 3
        assert report["checked"]["snapshot entries"] == 3
    code, out = await run("--store", books.store, "--snapshot", books.snapshot, capsys=capsys)
    assert code == 0 and ": clean (" in out


# One row per kind the store can be planted with: (kind, SQL, CHECKs kept,
# the findings expected beyond the kind's own row: (kind, table, key)).
PLANTED = {
    "held_mismatch": ("UPDATE stock SET available = available - 1, held = held + 1 WHERE sku_id = 'sku-1'", True),
    "sold_mismatch": ("UPDATE stock SET available = available - 2, sold = sold + 2 WHERE sku_id = 'sku-1'", True),
    "stock_unbalanced": ("UPDATE stock SET total = total + 5 WHERE sku_id = 'sku-2'", False),
    "stock_negative": ("UPDATE stock SET available = -1, total = -1 WHERE sku_id = 'sku-2'", False),
    "stock_missing": ("UPDATE reservation SET sku_id = 'sku-gone' WHERE reservation_id = '{released}' OR reservation_id = '{held}'", True),
}


@pytest.mark.parametrize("kind", sorted(PLANTED))
async def test_each_planted_stock_inconsistency_is_found_and_named(books: Books, capsys, kind: str) -> None:
    statement, checks = PLANTED[kind]
    plant(books.store, statement.format(held=books.held, released=books.released), checks=checks)
    code, report = await verify_json(books, capsys)
    assert code == 1 and not report["clean"]
    found = [f for f in report["findings"] if f["kind"] == kind]
    assert found, report
    if kind == "held_mismatch":
        assert [(f["table"], f["key"], f["expected"], f["found"]) for f in found] == [("stock", SKU, 2, 3)]
    elif kind == "sold_mismatch":
        assert [(f["table"], f["key"], f["expected"], f["found"]) for f in found] == [("stock", SKU, 3, 5)]
    elif kind == "stock_missing":
        # The RESERVED one: its held units are no longer counted against sku-1 either.
        assert [f["key"] for f in found] == [books.held]
        assert {f["kind"] for f in report["findings"]} == {"stock_missing", "held_mismatch"}
    else:
        assert [(f["table"], f["key"]) for f in found] == [("stock", "sku-2")]
        assert {f["kind"] for f in report["findings"]} == {kind}
    code, out = await run("--store", books.store, "--snapshot", books.snapshot, capsys=capsys)
    assert code == 1 and f"{kind} " in out and "finding(s)" in out


async def test_an_intent_left_in_the_store_is_found_once_its_bound_passes(books: Books, capsys) -> None:
    plant(books.store, f"UPDATE reservation SET state = 6 WHERE reservation_id = '{books.held}'")  # RELEASING
    code, report = await verify_json(books, capsys)
    assert code == 1
    assert [(f["kind"], f["table"], f["key"], f["found"]) for f in report["findings"]] == [
        ("intent_stuck", "reservation", books.held, "RELEASING at version 1")
    ]


async def test_outcome_records_whose_reservation_is_gone_are_found(books: Books, capsys) -> None:
    plant(books.store, f"DELETE FROM reservation WHERE reservation_id = '{books.released}'")
    code, report = await verify_json(books, capsys)
    assert code == 1
    orphaned = [f for f in report["findings"] if f["kind"] == "outcome_orphaned"]
    # The Reserve that created it and the Release that settled it.
    assert len(orphaned) == 2 and {f["expected"] for f in orphaned} == {f"reservation {books.released}"}
    assert all(f["found"] == "no such row" and len(f["key"]) == 64 for f in orphaned)
    if books.snapshot != "memory://":  # its snapshot entry now names no row
        assert [(f["kind"], f["key"], f["expected"]) for f in report["findings"] if f["kind"] == "snapshot_ahead"] == [
            ("snapshot_ahead", books.released, 0)
        ]


@pytest.fixture(params=["sqlite+redis", "postgres+redis", "postgres+redis-cluster"])
async def shared(request: pytest.FixtureRequest, tmp_path) -> AsyncIterator[Books]:
    store = f"sqlite:///{tmp_path}/store.db" if request.param.startswith("sqlite") else request.getfixturevalue("postgres_url")
    snapshot = request.getfixturevalue("redis_cluster_url" if request.param.endswith("cluster") else "redis_url")
    made = await _books(store, snapshot)
    yield made
    await made.server.stop(0)


async def test_a_snapshot_ahead_of_the_store_is_found_and_repaired(shared: Books, capsys) -> None:
    snapshot = shared.server.engine.snapshot
    await snapshot.reset(shared.confirmed, 9)  # the store holds version 2
    await snapshot.reset("rsv_000000000000000000000000", 4)  # no such row
    before = metrics.VERIFY_FINDINGS.labels("snapshot_ahead")._value.get()
    code, report = await verify_json(shared, capsys, "--repair-snapshot")
    assert code == 1
    assert [(f["kind"], f["table"], f["key"], f["expected"], f["found"]) for f in report["findings"]] == [
        ("snapshot_ahead", "reservation", shared.confirmed, 2, 9),  # the store's pages first, then the snapshot's own
        ("snapshot_ahead", "-", "rsv_000000000000000000000000", 0, 4),
    ]
    assert report["repaired"] == report["findings"]
    assert metrics.VERIFY_FINDINGS.labels("snapshot_ahead")._value.get() == before + 2
    assert await snapshot.version(shared.confirmed) == 2
    code, report = await verify_json(shared, capsys)
    assert (code, report["findings"]) == (0, [])


async def test_usage_and_connection_errors_exit_2(tmp_path, capsys) -> None:
    code = await asyncio.to_thread(cli.main, ["verify", "--store", f"sqlite:///{tmp_path}/none.db"])
    assert code == 2 and "no such file" in capsys.readouterr().err
    assert not (tmp_path / "none.db").exists()
    code = await asyncio.to_thread(cli.main, ["verify", "--store", "mysql://x"])
    assert code == 2 and "unsupported store URL" in capsys.readouterr().err
    code = await asyncio.to_thread(cli.main, ["verify", "--store", "postgresql://nobody@127.0.0.1:1/none"])
    assert code == 2 and "cannot open the store" in capsys.readouterr().err
    sqlite3.connect(tmp_path / "s.db").close()
    store = f"sqlite:///{tmp_path}/s.db"
    code = await asyncio.to_thread(cli.main, ["verify", "--store", store, "--snapshot", "redis://127.0.0.1:1"])
    assert code == 2 and "does not answer" in capsys.readouterr().err
    code = await asyncio.to_thread(cli.main, ["verify", "--store", store, "--app", "no.such:App"])
    assert code == 2 and "cannot load" in capsys.readouterr().err
    code = await asyncio.to_thread(cli.main, ["verify", "--store", store, "--page", "0"])
    assert code == 2


async def test_the_metric_file_names_each_kind(books: Books, capsys, tmp_path) -> None:
    plant(books.store, "UPDATE stock SET available = available - 1, held = held + 1 WHERE sku_id = 'sku-1'")
    code, _ = await run("--store", books.store, "--snapshot", books.snapshot, "--metrics-file", str(tmp_path / "v.prom"),
                        capsys=capsys)
    assert code == 1
    assert 'holdfast_verify_findings_total{kind="held_mismatch"} 1.0' in (tmp_path / "v.prom").read_text()
