"""A client in another language gets the contracts from the generated service
config alone: a Node.js @grpc/grpc-js client (tests/node/client.js) is given
service/generated/service_config.json as its `grpc.service_config` channel
option, sets no deadline and writes no retry loop, and calls `holdfast serve`
whose fault file slows and fails methods.

The client runs once for the module (one plan of calls, one JSON line per
call); each test reads its part of the results. Attempts are counted where
they land, by the server's holdfast_faults_injected_total on its /metrics.
Times are asserted loosely: nothing here measures speed.

Node.js and npm are required, not optional: without them these tests fail
saying so (CI has both). `npm ci` installs the pinned packages of
tests/node/package-lock.json once, and again only when the lock changes.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import subprocess
import urllib.request
from pathlib import Path

import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from holdfast import client, faults
from holdfast.contracts import codegen
from tests.process import ROOT, free_port, start_server

NODE_DIR = ROOT / "tests" / "node"
NPM_TIMEOUT_S = 300.0
NODE_TIMEOUT_S = 60.0  # a guard on the test itself, far past every contract
SERVICE = "holdfast.inventory.v1.InventoryService"
CONFIG = codegen.GENERATED / codegen.SERVICE_CONFIG_NAME
GET_STOCK, GET_RESERVATION = f"/{SERVICE}/GetStock", f"/{SERVICE}/GetReservation"
RESERVE, CONFIRM = f"/{SERVICE}/Reserve", f"/{SERVICE}/Confirm"
# GetStock answers after this: long past a deadline misread as nanoseconds,
# well inside its 0.5 s contract even on a loaded machine.
GET_STOCK_DELAY_MS = 100
# GetReservation answers after this, so only the client's deadline ends it in time.
GET_RESERVATION_DELAY_MS = 10_000
RESERVE_FAILURES = 2  # Reserve's first attempts answered UNAVAILABLE, then it runs


def entry(method: str) -> dict:
    """The generated config's entry of one method, as written."""
    service, _, name = method.lstrip("/").partition("/")
    for found in json.loads(CONFIG.read_text())["methodConfig"]:
        if found["name"] == [{"service": service, "method": name}]:
            return found
    raise AssertionError(f"{CONFIG} has no entry for {method}")


@pytest.fixture(scope="session")
def node_client() -> list[str]:
    """The command that runs tests/node/client.js, its packages installed."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        pytest.fail(
            "tests/test_node_client.py needs Node.js (20 or later) and npm on PATH to run its @grpc/grpc-js"
            f" client; missing: {', '.join(n for n, p in (('node', node), ('npm', npm)) if p is None)}"
            " (Debian: apt-get install nodejs npm)",
            pytrace=False,
        )
    # node_modules is made by `npm ci` from the lock alone; the stamp skips it
    # while the lock (and package.json, which it must agree with) are unchanged.
    digest = hashlib.sha256((NODE_DIR / "package.json").read_bytes() + (NODE_DIR / "package-lock.json").read_bytes())
    stamp = NODE_DIR / "node_modules" / ".holdfast-installed"
    if not stamp.is_file() or stamp.read_text() != digest.hexdigest():
        done = subprocess.run([npm, "ci", "--no-audit", "--no-fund"], cwd=NODE_DIR, capture_output=True, text=True,
                              timeout=NPM_TIMEOUT_S, check=False)
        if done.returncode != 0:
            pytest.fail(f"npm ci in {NODE_DIR} failed ({done.returncode}):\n{done.stdout}{done.stderr}", pytrace=False)
        stamp.write_text(digest.hexdigest())
    return [node, str(NODE_DIR / "client.js")]


def first_failing(count: int, probability: float) -> int:
    """A fault seed whose first `count` calls are hit and the next is not
    (the server's own Decider, so the sequence is the server's)."""
    for seed in range(10_000):
        decider = faults.Decider(faults.Fault(RESERVE, status=grpc.StatusCode.UNAVAILABLE, probability=probability,
                                              seed=seed))
        if [decider.draw() for _ in range(count + 1)] == [True] * count + [False]:
            return seed
    raise AssertionError(f"no seed fails the first {count} calls")


def fault_file(path: Path) -> Path:
    path.write_text(f'''
["{GET_STOCK.lstrip("/")}"]
delay_ms = {GET_STOCK_DELAY_MS}

["{GET_RESERVATION.lstrip("/")}"]
delay_ms = {GET_RESERVATION_DELAY_MS}

["{RESERVE.lstrip("/")}"]
status = "UNAVAILABLE"
probability = 0.5
seed = {first_failing(RESERVE_FAILURES, 0.5)}

["{CONFIRM.lstrip("/")}"]
status = "UNAVAILABLE"
''')
    return path


def old_spelling(path: Path) -> Path:
    """The generated config with GetStock's timeout written "0.5s", as
    codegen wrote durations before they had nine fractional digits."""
    config = json.loads(CONFIG.read_text())
    for found in config["methodConfig"]:
        if found["name"] == entry(GET_STOCK)["name"]:
            assert found["timeout"] == "0.500000000s"
            found["timeout"] = "0.5s"
    path.write_text(json.dumps(config))
    return path


def injected(metrics_target: str) -> dict[str, float]:
    """The server's holdfast_faults_injected_total, by method."""
    with urllib.request.urlopen(f"http://{metrics_target}/metrics", timeout=10) as reply:
        text = reply.read().decode()
    return {
        sample.labels["method"]: sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
        if sample.name == "holdfast_faults_injected_total"
    }


@pytest.fixture(scope="module")
def results(node_client, tmp_path_factory) -> dict:
    """Each call's result by name, and the server's fault counts after them."""
    tmp = tmp_path_factory.mktemp("node")
    metrics_target = f"127.0.0.1:{free_port()}"
    server = start_server(f"sqlite:///{tmp}/holdfast.db",
                          extra=("--faults", str(fault_file(tmp / "faults.toml")), "--metrics-listen", metrics_target))
    try:
        named = {
            "put": ("PutStock", {"sku_id": "sku-1", "total": 5, "request_id": "restock-1"}, CONFIG),
            "get_stock": ("GetStock", {"sku_id": "sku-1"}, CONFIG),
            "slow": ("GetReservation", {"reservation_id": "rsv-1"}, CONFIG),
            "reserve": ("Reserve", {"order_id": "order-1", "sku_id": "sku-1", "quantity": 2,
                                    "timestamp_ms": 1_700_000_000_000}, CONFIG),
            "confirm": ("Confirm", {"reservation_id": "rsv-1"}, CONFIG),
            "old_spelling": ("GetStock", {"sku_id": "sku-1"}, old_spelling(tmp / "old_service_config.json")),
        }
        plan = {
            "target": server.target, "protos": str(codegen.PROTOS),
            "calls": [{"method": m, "request": r, "config": str(c)} for m, r, c in named.values()],
        }
        (tmp / "plan.json").write_text(json.dumps(plan))
        done = subprocess.run([*node_client, str(tmp / "plan.json")], capture_output=True, text=True,
                              timeout=NODE_TIMEOUT_S, check=False)
        assert done.returncode == 0, f"node client.js failed ({done.returncode}):\n{done.stdout}{done.stderr}"
        lines = [json.loads(line) for line in done.stdout.splitlines()]
        assert [line["method"] for line in lines] == [m for m, _, _ in named.values()], done.stdout
        return {"calls": dict(zip(named, lines)), "injected": injected(metrics_target)}
    finally:
        server.stop()
        server.close()


def test_a_half_second_contract_is_not_cut_off_after_a_millisecond(results):
    """The generated "0.500000000s" reads as 0.5 s in grpc-js, so a call
    answered after 100 ms gets its answer."""
    assert client.deadlines()[GET_STOCK] == 0.5
    assert results["calls"]["put"]["code"] == "OK"
    got = results["calls"]["get_stock"]
    assert (got["code"], got["reply"]["total"], got["reply"]["available"]) == ("OK", "5", "5"), got
    assert got["elapsed_ms"] >= GET_STOCK_DELAY_MS * 0.9


def test_a_call_slower_than_its_contract_ends_at_the_contracts_deadline(results):
    timeout_s = client.deadlines()[GET_RESERVATION]
    assert timeout_s * 1000 * 5 < GET_RESERVATION_DELAY_MS
    got = results["calls"]["slow"]
    assert got["code"] == "DEADLINE_EXCEEDED", got
    assert 0.8 * timeout_s <= got["elapsed_ms"] / 1000 <= 5 * timeout_s, got


def test_a_retryable_status_is_retried_until_answered(results):
    assert "UNAVAILABLE" in entry(RESERVE)["retryPolicy"]["retryableStatusCodes"]
    assert RESERVE_FAILURES < entry(RESERVE)["retryPolicy"]["maxAttempts"]
    got = results["calls"]["reserve"]
    assert (got["code"], got["reply"]["state"], got["reply"]["quantity"]) == (
        "OK", "RESERVATION_STATE_RESERVED", "2"), got
    assert results["injected"][RESERVE] == RESERVE_FAILURES  # then one more attempt, answered


def test_retries_stop_at_the_contracts_max_attempts(results):
    got = results["calls"]["confirm"]
    assert got["code"] == "UNAVAILABLE", got
    assert results["injected"][CONFIRM] == entry(CONFIRM)["retryPolicy"]["maxAttempts"]


def test_the_old_duration_spelling_would_cut_a_half_second_call_off(results):
    """grpc-js reads the fraction of "0.5s" as 5 ns: the call that answered
    above, under the old spelling, runs out of time at once."""
    got = results["calls"]["old_spelling"]
    assert got["code"] == "DEADLINE_EXCEEDED", got
    assert got["elapsed_ms"] < 0.5 * client.deadlines()[GET_STOCK] * 1000, got  # far short of 0.5 s
