"""`holdfast simulate`: seeded runs of the real engine and domain under
injected faults, every invariant checked by the auditor after every step."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

import holdfast.apps.inventory
from holdfast import simulate
from holdfast.simulate import Faults, MemTxn

SEEDS = range(1, 21)
OPS = 10_000


@pytest.mark.parametrize("seed", SEEDS)
def test_every_invariant_holds_under_faults(seed: int) -> None:
    result = simulate.run(seed, OPS)
    assert result.failure is None, f"seed {seed} step {result.failed_step}: {result.failure}"
    assert result.steps == OPS


def test_one_seed_prints_the_same_trace_twice(capsys) -> None:
    outputs = []
    for _ in range(2):
        assert simulate.main(["--seed", "7", "--ops", "2000"]) == 0
        outputs.append(capsys.readouterr().out)
    assert outputs[0] == outputs[1]
    assert "trace=" in outputs[0]


def test_other_seeds_give_other_traces() -> None:
    traces = {simulate.run(seed, 1000).trace for seed in range(5)}
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
    result = simulate.run(9, 2000, Faults(crash=0.05))
    assert result.failure is None, result.failure
    assert result.recovered > 0


def test_faults_off_runs_clean() -> None:
    result = simulate.run(5, 2000, simulate.NO_FAULTS)
    assert result.failure is None, result.failure


def _forget_stock(txn, found, target, sold, why):
    """A broken move: the reservation settles, its stock stays held."""
    done = holdfast.apps.inventory.replace(found, state=target, version=found.version + 1, release_reason=why)
    txn.save_reservation(done, found.version)
    return holdfast.apps.inventory.success(holdfast.apps.inventory._reservation_reply(done))


_take_stock = MemTxn.take_stock


def _stingy_take(self, sku_id, quantity):
    """A broken conditional update (`available > quantity`): it never oversells,
    it undersells, which only a model of the stock can notice."""
    stock = self.stock(sku_id)
    return stock is not None and stock.available > quantity and _take_stock(self, sku_id, quantity)


# (what breaks, the patch): each must be caught, with the seed and step to reproduce it.
BROKEN = [
    ("settling forgets the stock", holdfast.apps.inventory, "_settle", _forget_stock),
    ("idempotency records are never found", MemTxn, "recorded", lambda self, key: None),
    ("the last units are never sold", MemTxn, "take_stock", _stingy_take),
]


@pytest.mark.parametrize(("what", "owner", "name", "patch"), BROKEN, ids=[row[0] for row in BROKEN])
def test_a_broken_move_is_caught_with_its_seed_and_step(monkeypatch, capsys, what, owner, name, patch) -> None:
    monkeypatch.setattr(owner, name, patch)
    assert simulate.main(["--seed", "11", "--ops", "3000"]) == 1
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
        assert simulate.main(["--seed", "1", "--ops", "1", "--faults", spec]) == 2
    else:
        assert Faults.parse(spec) == parsed
