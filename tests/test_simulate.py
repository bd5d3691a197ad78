"""`holdfast simulate`: seeded runs of the real engine and an app's services
under injected faults, every invariant checked by the app's auditor after
every answer and every step: inventory (the default, whose runs are the same
seed for seed as before apps shipped workloads) and dispatch here, the
tables example in examples/tables/test_workload.py. The built-in apps go by
name through the CLI (`cli.main(["simulate", ...])`), which hands their
table down: holdfast.simulate names no app."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import holdfast
import holdfast.apps.fulfillment
import holdfast.apps.inventory
from holdfast import cli, simulate
from holdfast.apps.fulfillment_workload import LEASE_MS, CarrierWorkload, DispatchWorkload
from holdfast.apps.inventory_workload import InventoryWorkload
from holdfast.simulate import Faults, MemTxn
from holdfast.apps import inventory_store
from holdfast.apps.inventory_store import save_reservation

SEEDS = range(1, 21)
OPS = 10_000


@pytest.mark.parametrize("seed", SEEDS)
def test_every_invariant_holds_under_faults(seed: int) -> None:
    result = simulate.run(seed, OPS, workload=InventoryWorkload)
    assert result.failure is None, f"seed {seed} step {result.failed_step}: {result.failure}"
    assert result.steps == OPS


def test_one_seed_prints_the_same_trace_twice(capsys) -> None:
    outputs = []
    for _ in range(2):
        assert cli.main(["simulate", "--seed", "7", "--ops", "2000"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    assert "trace=" in outputs[0]


def test_other_seeds_give_other_traces() -> None:
    traces = {simulate.run(seed, 1000, workload=InventoryWorkload).trace for seed in range(5)}
    assert len(traces) == 5


def test_the_trace_does_not_depend_on_the_process() -> None:
    """No set order, no hash seed and no wall clock may reach a choice."""
    outputs = set()
    for hash_seed in ("1", "2"):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        done = subprocess.run(
            [sys.executable, "-m", "holdfast.cli", "simulate", "--seed", "3", "--ops", "1500"],
            env=env, capture_output=True, text=True, check=True,
        )
        outputs.add(done.stdout)
    assert len(outputs) == 1


def test_torn_crashes_are_recovered() -> None:
    """Crashes that leave intents behind: recovery settles them, and the
    auditor follows the recovery moves like any other answer."""
    result = simulate.run(9, 2000, Faults(crash=0.05), workload=InventoryWorkload)
    assert result.failure is None, result.failure
    assert result.recovered > 0


def test_faults_off_runs_clean() -> None:
    result = simulate.run(5, 2000, simulate.NO_FAULTS, workload=InventoryWorkload)
    assert result.failure is None, result.failure


def _forget_stock(txn, found, target, sold, why):
    """A broken move: the reservation settles, its stock stays held."""
    done = holdfast.apps.inventory.replace(found, state=target, version=found.version + 1, release_reason=why)
    save_reservation(txn, done, found.version)
    return holdfast.apps.inventory.success(holdfast.apps.inventory._reservation_reply(done))


def _stingy_take(txn, sku_id, quantity):
    """A broken conditional hold (`available > quantity`): it never oversells,
    it undersells, which only a model of the stock can notice."""
    found = inventory_store.stock(txn, sku_id)
    return found is not None and found.available > quantity and inventory_store.take_stock(txn, sku_id, quantity)


_REAL_RESERVE_ORDER = holdfast.apps.inventory._reserve_order


def _second_line_free(txn, *args):
    """A broken order: it holds every line, but its second line's stock is
    never taken (each SKU's figures still add up; only the model sees it)."""
    taken = 0

    def take(txn, sku_id, quantity):
        nonlocal taken
        taken += 1
        return True if taken == 2 else inventory_store.take_stock(txn, sku_id, quantity)

    real, holdfast.apps.inventory.take_stock = holdfast.apps.inventory.take_stock, take
    try:
        return _REAL_RESERVE_ORDER(txn, *args)
    finally:
        holdfast.apps.inventory.take_stock = real


def _sell_the_whole_hold(txn, sku_id, quantity, sold):
    """A broken partial confirm: the units it should return are sold too."""
    inventory_store.split_stock(txn, sku_id, quantity, quantity if sold else 0)


# (what breaks, the patch): each must be caught, with the seed and step to reproduce it.
BROKEN = [
    ("settling forgets the stock", holdfast.apps.inventory, "_settle", _forget_stock),
    ("idempotency records are never found", MemTxn, "recorded", lambda self, key: None),
    ("the last units are never sold", holdfast.apps.inventory, "take_stock", _stingy_take),
    ("an order's second line takes no stock", holdfast.apps.inventory, "_reserve_order", _second_line_free),
    ("a partial confirm sells the whole hold", holdfast.apps.inventory, "split_stock", _sell_the_whole_hold),
]


@pytest.mark.parametrize(("what", "owner", "name", "patch"), BROKEN, ids=[row[0] for row in BROKEN])
def test_a_broken_move_is_caught_with_its_seed_and_step(monkeypatch, capsys, what, owner, name, patch) -> None:
    monkeypatch.setattr(owner, name, patch)
    assert cli.main(["simulate", "--seed", "11", "--ops", "3000"]) == 1
    out = capsys.readouterr().out
    assert "FAILED seed=11 step=" in out
    assert "reproduce: holdfast simulate --seed 11 --ops 3000 --faults " in out


# (spec, parsed or None for refused)
SPECS = [
    ("default", Faults()),
    ("none", Faults(0, 0, 0, 0, 0, 0, 0)),
    ("lost=0.5,crash=0", Faults(lost=0.5, crash=0.0)),
    ("lost=2", None),
    ("flood=0.1", None),
]


@pytest.mark.parametrize(("spec", "parsed"), SPECS, ids=[row[0] for row in SPECS])
def test_fault_specs(spec: str, parsed: Faults | None) -> None:
    if parsed is None:
        with pytest.raises(ValueError):
            Faults.parse(spec)
        assert cli.main(["simulate", "--seed", "1", "--ops", "1", "--faults", spec]) == 2
    else:
        assert Faults.parse(spec) == parsed


# -- every app that ships a workload: dispatch's, and `--app` ---------------------------------

DISPATCH_SEEDS = range(1, 6)
DISPATCH_OPS = 5000


@pytest.fixture(scope="module")
def dispatch_runs() -> dict[int, simulate.Result]:
    workload = simulate.load_workload("dispatch", cli.SIMULATED)
    return {seed: simulate.run(seed, DISPATCH_OPS, workload=workload) for seed in DISPATCH_SEEDS}


@pytest.mark.parametrize("seed", DISPATCH_SEEDS)
def test_dispatch_books_hold_under_faults(dispatch_runs, seed: int) -> None:
    result = dispatch_runs[seed]
    assert result.failure is None, f"seed {seed} step {result.failed_step}: {result.failure}"
    assert result.steps == DISPATCH_OPS


def test_dispatch_runs_reach_every_part_of_an_attempt(dispatch_runs) -> None:
    """Not vacuous: the runs claimed, were refused, shipped, ran into the
    contract's delay and attempt bound, and the reaper ended abandoned leases."""
    seen = {answer for result in dispatch_runs.values() for answer in result.answers}
    assert {
        "CreateWaybill OK", "Dispatch OK", "Dispatch CARRIER_REFUSED", "Dispatch RETRY_TOO_SOON",
        "Dispatch CONTRACT_VIOLATION", "Dispatch LOST", "Acknowledge OK", "Fail OK", "GetWaybill OK",
        "CreateWaybill IDEMPOTENCY_KEY_REUSED", "holdfast.timeout/fulfillment OK",
    } <= seen, sorted(seen)


@pytest.mark.parametrize("app", ["inventory", "dispatch"])
def test_a_built_in_app_prints_the_same_trace_twice_in_any_process(capsys, app: str) -> None:
    assert cli.main(["simulate", "--seed", "7", "--ops", "1500", "--app", app]) == 0
    first = capsys.readouterr().out
    assert first.startswith(f"seed=7 ops=1500 app={app} faults=") and "trace=" in first
    env = {**os.environ, "PYTHONHASHSEED": "3"}
    done = subprocess.run(
        [sys.executable, "-m", "holdfast.cli", "simulate", "--seed", "7", "--ops", "1500", "--app", app],
        env=env, capture_output=True, text=True, check=True,
    )
    assert done.stdout == first


def test_inventory_is_the_default_app(capsys) -> None:
    outputs = []
    for argv in (["--seed", "4", "--ops", "500"], ["--seed", "4", "--ops", "500", "--app", "inventory"]):
        assert cli.main(["simulate", *argv]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]


class _BeyondContract(holdfast.apps.fulfillment.Dispatch):
    """Allows one attempt more than Dispatch's contract."""

    def __init__(self, *args) -> None:
        super().__init__(*args)
        self.max_attempts += 1


class _BeyondContractWorkload(DispatchWorkload):
    SERVICE = _BeyondContract


def _timeout_before_the_lease_ends(*args, **fields):
    """A claim whose timeout falls due before its lease ends: the reaper
    would end an attempt that still holds the waybill."""
    if fields.get("lease_owner"):
        fields["due_at_ms"] -= LEASE_MS // 2
    return holdfast.Change(*args, **fields)


def test_a_dispatch_beyond_the_contracts_attempts_is_caught() -> None:
    result = simulate.run(1, 3000, workload=_BeyondContractWorkload)
    assert result.failure is not None and "CONTRACT_VIOLATION" in result.failure, result.failure


def test_a_lease_whose_timeout_comes_early_is_caught(monkeypatch) -> None:
    monkeypatch.setattr(holdfast.apps.fulfillment, "Change", _timeout_before_the_lease_ends)
    result = simulate.run(1, 3000, workload=DispatchWorkload)
    assert result.failure is not None and "is DISPATCHING with lease" in result.failure, result.failure


def test_the_carrier_is_handed_each_parcel_once() -> None:
    """An attempt the carrier accepted whose settlement failed is recorded
    accepted by whoever ends it (holdfast.apps.carrier: asked what it
    answered, never asked again after the lease), so no later attempt hands
    the carrier the parcel a second time."""
    result = simulate.run(1, 3000, workload=CarrierWorkload)
    assert result.failure is None, f"step {result.failed_step}: {result.failure}"


# `--app` spec -> what the refusal says (exit 2, nothing run)
class _Unsimulated(holdfast.apps.fulfillment.Dispatch):
    """An app that ships no workload."""

    workload = None


def test_an_app_is_simulated_by_the_workload_it_names() -> None:
    """`--app MODULE:ATTR` naming a Service runs the workload its `workload`
    names; a built-in app's name is the CLI's name for the same."""
    assert simulate.load_workload("holdfast.apps.inventory:Inventory") is InventoryWorkload
    assert simulate.load_workload("holdfast.apps.fulfillment:Dispatch") is DispatchWorkload
    assert simulate.load_workload("dispatch", cli.SIMULATED) is DispatchWorkload
    assert simulate.load_workload("holdfast.apps.fulfillment_workload:CarrierWorkload") is CarrierWorkload


def test_without_the_clis_table_simulate_knows_no_app_by_name(capsys) -> None:
    assert simulate.main(["--seed", "1", "--ops", "10", "--app", "inventory"]) == 2
    assert "--app inventory: expected MODULE:ATTR naming an app or a workload class" in capsys.readouterr().err


BAD_APPS = [
    ("nope", "expected inventory or dispatch, or MODULE:ATTR"),
    ("holdfast.apps.inventory:Holds", "Holds is not a workload class"),
    ("tests.test_simulate:_Unsimulated", "_Unsimulated names no workload (its Service.workload is None)"),
    ("no_such_module_here:Workload", "cannot load 'no_such_module_here:Workload'"),
    ("holdfast.apps.fulfillment_workload:Nope", "has no attribute Nope"),
]


@pytest.mark.parametrize(("app", "said"), BAD_APPS, ids=[row[0] for row in BAD_APPS])
def test_an_app_that_is_no_workload_is_refused(capsys, app: str, said: str) -> None:
    assert cli.main(["simulate", "--seed", "1", "--ops", "10", "--app", app]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.startswith(f"holdfast simulate: --app {app}: ") and said in captured.err, captured.err
