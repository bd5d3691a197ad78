"""`holdfast bench` end to end, briefly: it starts both servers and the client
in their own processes, reports both targets, and cleans up after itself.
Only that it ran is checked, never how fast (DESIGN.md, "Performance rules")."""

from __future__ import annotations

import json
import tempfile

from service.bench import main


def test_bench_reports_both_targets_and_only_ok_reserves(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))  # the bench's temp dir goes here

    assert main(["--duration", "1", "--warmup", "0.5", "--in-flight", "16", "--json"]) == 0

    report = json.loads(capsys.readouterr().out)
    holdfast, echo = report["targets"]["holdfast"], report["targets"]["echo"]
    assert holdfast["calls_per_s"] > 0 and echo["calls_per_s"] > 0
    assert set(holdfast["outcomes"]) == {"OK"}, holdfast["outcomes"]
    assert set(holdfast["warmup_outcomes"]) <= {"OK"}, holdfast["warmup_outcomes"]
    assert holdfast["outcomes"]["OK"] == holdfast["calls"]
    assert report["ratio"] > 0
    assert not list(tmp_path.glob("holdfast-bench-*")), "temp dir left behind"
