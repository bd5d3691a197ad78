"""The README's two-minute tour, run as written: `holdfast serve` as a real
process and every client command through the `holdfast` console script."""

from __future__ import annotations

import json
import re
import signal

import pytest

from holdfast import cli
from tests.process import ServerProcess, run_holdfast, start_server

SKU = "sku-42"
TIMESTAMP = "1700000000000"
RESERVED = re.compile(
    r"^(?P<rid>rsv_[0-9a-f]+): RESERVED 3 x sku-42 for order order-7"
    r" \(version 1, expires at (?P<expires>\d+) ms\)(?P<replayed>  \(replayed\))?$"
)


@pytest.fixture
def served(tmp_path):
    server = start_server(f"sqlite:///{tmp_path}/holdfast.db")
    try:
        yield server
    finally:
        server.close()


def holdfast(server: ServerProcess, *args: str):
    """One client command against `server`; returns the completed process."""
    return run_holdfast(*args, "--target", server.target)


def ok_line(server: ServerProcess, *args: str) -> str:
    done = holdfast(server, *args)
    assert done.returncode == 0, f"holdfast {' '.join(args)} exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    lines = done.stdout.splitlines()
    assert len(lines) == 1, f"expected one line from holdfast {' '.join(args)}, got {done.stdout!r}"
    return lines[0]


def json_of(server: ServerProcess, *args: str, code: int = 0) -> dict:
    done = holdfast(server, *args, "--json")
    assert done.returncode == code, f"holdfast {' '.join(args)} --json exited {done.returncode}\n{done.stdout}\n{done.stderr}"
    return json.loads(done.stdout)


def test_the_tour_works_as_written(served):
    assert ok_line(served, "stock", "put", SKU, "10", "--request-id", "restock-1") == (
        "sku-42: total 10, available 10, held 0, sold 0 (version 1)"
    )

    first = RESERVED.match(ok_line(served, "reserve", "order-7", SKU, "3", "--timestamp-ms", TIMESTAMP))
    assert first is not None and first["replayed"] is None
    assert int(first["expires"]) > 0  # every hold expires

    # The client is unsure the hold was taken and sends the same call again.
    again = RESERVED.match(ok_line(served, "reserve", "order-7", SKU, "3", "--timestamp-ms", TIMESTAMP))
    assert again is not None and again["replayed"] == "  (replayed)"
    assert (again["rid"], again["expires"]) == (first["rid"], first["expires"])

    # The same key with another payload is refused.
    refused = holdfast(served, "reserve", "order-7", SKU, "5", "--timestamp-ms", TIMESTAMP)
    assert refused.returncode == 1
    assert refused.stdout == ""
    assert refused.stderr.strip() == (
        "Reserve failed: IDEMPOTENCY_KEY_REUSED: this idempotency key was used with another request"
    )

    assert ok_line(served, "stock", "get", SKU) == "sku-42: total 10, available 7, held 3, sold 0 (version 2)"

    rid = first["rid"]
    assert ok_line(served, "confirm", rid) == (
        f"{rid}: CONFIRMED 3 x sku-42 for order order-7 (version 2, expires at {first['expires']} ms)"
    )
    assert ok_line(served, "stock", "get", SKU) == "sku-42: total 10, available 7, held 0, sold 3 (version 3)"

    # `holdfast get` reads the reservation the tour made.
    assert ok_line(served, "get", rid) == (
        f"{rid}: CONFIRMED 3 x sku-42 for order order-7 (version 2, expires at {first['expires']} ms)"
    )


def test_json_output_parses_and_marks_replays(served):
    put = json_of(served, "stock", "put", "sku-j", "4", "--request-id", "r1")
    assert put["method"] == "PutStock" and put["replayed"] is False
    assert put["reply"]["skuId"] == "sku-j" and int(put["reply"]["total"]) == 4
    assert int(put["reply"]["available"]) == 4

    args = ("reserve", "order-j", "sku-j", "2", "--timestamp-ms", "5")
    first = json_of(served, *args)
    assert first["method"] == "Reserve" and first["replayed"] is False
    assert first["reply"]["state"] == "RESERVATION_STATE_RESERVED"
    assert int(first["reply"]["quantity"]) == 2 and int(first["reply"]["version"]) == 1
    assert first["context_id"]

    second = json_of(served, *args)
    assert second["replayed"] is True
    assert second["reply"] == first["reply"]
    assert second["context_id"] == first["context_id"]

    stock = json_of(served, "stock", "get", "sku-j")
    assert (int(stock["reply"]["available"]), int(stock["reply"]["held"])) == (2, 2)


def test_json_failures_carry_their_reason(served):
    json_of(served, "stock", "put", "sku-f", "1", "--request-id", "r1")

    short = json_of(served, "reserve", "order-f", "sku-f", "2", "--timestamp-ms", "9", code=1)
    assert short["method"] == "Reserve"
    assert short["status"] == "FAILED_PRECONDITION" and short["reason"] == "INSUFFICIENT_STOCK"

    reused = json_of(served, "reserve", "order-f", "sku-f", "1", "--timestamp-ms", "9", code=1)
    assert reused["status"] == "ALREADY_EXISTS" and reused["reason"] == "IDEMPOTENCY_KEY_REUSED"

    missing = json_of(served, "confirm", "rsv_nope", code=1)
    assert missing["status"] == "NOT_FOUND" and missing["reason"] == "RESERVATION_NOT_FOUND"

    invalid = json_of(served, "reserve", "order-g", "sku-f", "0", "--timestamp-ms", "9", code=1)
    assert invalid["status"] == "INVALID_ARGUMENT" and invalid["reason"] == "INVALID_REQUEST"
    assert [v["field"] for v in invalid["field_violations"]] == ["quantity"]


def test_a_failure_without_json_names_its_reason_and_exits_1(served):
    done = holdfast(served, "stock", "get", "no-such-sku")
    assert done.returncode == 1 and done.stdout == ""
    assert done.stderr.startswith("GetStock failed: SKU_NOT_FOUND: ")


def test_the_start_up_line_says_where_it_listens_and_what_it_stores_where(served, tmp_path):
    line = served.ready_line
    assert line is not None
    assert line.startswith(
        "holdfast serving holdfast.inventory.v1.InventoryService, holdfast.fulfillment.v1.DispatchService on "
    )
    assert f" on {served.target} " in line
    assert str(tmp_path / "holdfast.db") in line
    assert "store sqlite:" in line
    assert "snapshot memory://" in line


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_signal_stops_the_server_cleanly(tmp_path, sig):
    server = start_server(f"sqlite:///{tmp_path}/holdfast.db")
    try:
        ok_line(server, "stock", "put", SKU, "10", "--request-id", "restock-1")
        code = server.stop(sig)
        assert code == 0, server.output()
        assert server.stdout.lines[-1] == "holdfast stopped", server.output()
        assert "Traceback" not in server.stderr.text(), server.output()
    finally:
        server.close()

    # What it stored is there for the next server.
    again = start_server(f"sqlite:///{tmp_path}/holdfast.db")
    try:
        assert ok_line(again, "stock", "get", SKU) == "sku-42: total 10, available 10, held 0, sold 0 (version 1)"
    finally:
        again.close()


def test_the_built_in_names_are_apps_the_cli_alone_names():
    """The CLI is the one layer that names holdfast's own apps: each is a
    Service class, `simulate` takes some of them by name, and the server
    hosts none unless given them."""
    from holdfast.framework import Service
    from holdfast.server import Config, load_attribute

    assert Config().apps == ()
    for spec in cli.BUILT_IN.values():
        found = load_attribute(spec)
        assert isinstance(found, type) and issubclass(found, Service), spec
    assert set(cli.SIMULATED.values()) <= set(cli.BUILT_IN.values())
    assert cli.SIMULATED_BY_DEFAULT in cli.SIMULATED
    assert cli.HANDED["replay"] == {"default_apps": tuple(cli.BUILT_IN.values())}


@pytest.mark.parametrize(("argv", "apps", "settings"), [
    ([], ("holdfast.apps.inventory:Inventory", "holdfast.apps.fulfillment:Dispatch"), {}),
    (["--app", "tables:Tables"], ("tables:Tables",), {}),
    (["--services", "inventory", "--app", "tables:Tables", "--setting", "no_show_after_ms=60000",
      "--setting", "greeting=hello"],
     ("holdfast.apps.inventory:Inventory", "tables:Tables"), {"no_show_after_ms": 60000, "greeting": "hello"}),
])
def test_serve_hosts_the_built_in_services_and_the_apps_with_their_settings(argv, apps, settings):
    args = cli._parser().parse_args(["serve", *argv])
    assert cli._apps(args) == apps
    assert dict(args.settings) == settings


def test_a_malformed_setting_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as exited:
        cli._parser().parse_args(["serve", "--setting", "no equals"])
    assert exited.value.code == 2
    assert "expected NAME=VALUE" in capsys.readouterr().err
