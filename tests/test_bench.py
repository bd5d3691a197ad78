"""`holdfast bench` end to end, briefly: it starts the servers and the client
in their own processes, reports every target, and cleans up after itself.
Only that it ran is checked, never how fast (DESIGN.md, "Performance rules")."""

from __future__ import annotations

import json
import tempfile

import pytest

from service.bench import Backend, _backend, _labels, main


def _assert_all_ok(row: dict) -> None:
    assert row["calls_per_s"] > 0 and row["ratio"] > 0, row
    assert set(row["outcomes"]) == {"OK"}, row["outcomes"]
    assert set(row["warmup_outcomes"]) <= {"OK"}, row["warmup_outcomes"]
    assert row["outcomes"]["OK"] == row["calls"]


def test_bench_reports_both_targets_and_only_ok_reserves(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the bench's temp dir goes here

    assert main(["--duration", "1", "--warmup", "0.5", "--in-flight", "16", "--json"]) == 0

    report = json.loads(capsys.readouterr().out)
    assert list(report["targets"]) == ["sqlite+memory", "echo"]
    _assert_all_ok(report["targets"]["sqlite+memory"])
    assert report["targets"]["echo"]["calls_per_s"] > 0
    assert report["ratios"]["sqlite+memory"] > 0
    assert not list(tmp_path.glob("holdfast-bench-*")), "temp dir left behind"


def test_bench_measures_two_backends_side_by_side(capsys, monkeypatch, tmp_path, postgres_url, redis_url):
    """SQLite + memory and PostgreSQL + Redis in one run, Reserve then Confirm of
    the derived reservation id: every call of both rows answers OK."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    argv = ["--duration", "1", "--warmup", "0.5", "--in-flight", "16", "--mix", "reserve-confirm", "--json",
            "--backend", "sqlite", "--backend", f"{postgres_url},{redis_url}", "--store-pool", "2"]

    assert main(argv) == 0

    report = json.loads(capsys.readouterr().out)
    assert list(report["targets"]) == ["sqlite+memory", "postgres+redis", "echo"]
    for label in ("sqlite+memory", "postgres+redis"):
        _assert_all_ok(report["targets"][label])
    assert "--store-pool 2" in report["targets"]["postgres+redis"]["address"]
    assert not list(tmp_path.glob("holdfast-bench-*")), "temp dir left behind"


@pytest.mark.parametrize(
    ("text", "store", "snapshot"),
    [
        ("sqlite", "sqlite", "memory://"),
        ("postgresql://u@h:1/db,redis://h:2/0", "postgresql://u@h:1/db", "redis://h:2/0"),
        ("postgresql://h/db?options=a,b", "postgresql://h/db?options=a,b", "memory://"),
    ],
)
def test_backend_option_splits_at_the_last_comma_before_a_url(text, store, snapshot):
    assert _backend(text) == Backend(store, snapshot)


def test_labels_name_the_schemes_and_stay_distinct():
    backends = [Backend("sqlite", "memory://"), Backend("postgres://h/d", "redis+cluster://h:1"),
                Backend("sqlite:////x.db", "memory://")]
    assert _labels(backends) == ["sqlite+memory", "postgres+redis-cluster", "sqlite+memory#2"]


def test_target_does_not_go_with_backends():
    with pytest.raises(SystemExit) as exited:
        main(["--target", "127.0.0.1:1", "--backend", "sqlite"])
    assert exited.value.code == 2
