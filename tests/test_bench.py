"""`holdfast bench` end to end, briefly: it starts the servers and the client
in their own processes, reports every target, and cleans up after itself.
Only that it ran is checked, never how fast (DESIGN.md, "Performance rules")."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from collections import Counter
from pathlib import Path

import pytest

from holdfast import bench
from holdfast.bench import (
    HANDWRITTEN,
    MIXES,
    REFUSED_FOR_STOCK,
    REPLAY_KEYS,
    ROLES,
    Backend,
    Result,
    _backend,
    _contract_violations,
    _cpu_between,
    _CpuSample,
    _definite,
    _labels,
    _options,
    _report,
    _role,
    _sku_counts,
    _stock_count,
    _table,
    _tracing_unavailable,
    main,
)
from holdfast.inventory.v1 import inventory_pb2 as pb

SHORT = ["--duration", "1", "--warmup", "0.5", "--json"]
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


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


# -- mixes -----------------------------------------------------------------------------------


def _assert_only_expected_answers(report: dict) -> None:
    """Every answer of every row (echo too) is one the mix expects; none is a contract violation."""
    answers = MIXES[report["mix"]].answers
    for label, row in report["targets"].items():
        assert row["calls"] > 0 and row["calls_per_s"] > 0, (label, row)
        assert set(row["outcomes"]) <= answers, (label, row["outcomes"])
        assert set(row["warmup_outcomes"]) <= answers, (label, row["warmup_outcomes"])
        assert row["contract_violations"] == 0, (label, row)
        assert row["calls_made"] >= row["calls"], (label, row)


@pytest.mark.parametrize(
    ("mix", "held"),
    [
        ("reserve-release", 0),  # every hold released again
        ("replay", REPLAY_KEYS),  # the seeds' holds; the replays took nothing
    ],
)
def test_mix_answers_only_its_reasons_and_its_stock_adds_up(mix, held, capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    assert main([*SHORT, "--in-flight", "8", "--mix", mix]) == 0

    report = json.loads(capsys.readouterr().out)
    assert list(report["targets"]) == ["sqlite+memory", "echo"]
    _assert_only_expected_answers(report)
    assert set(report["targets"]["sqlite+memory"]["outcomes"]) == {"OK"}
    stock = report["targets"]["sqlite+memory"]["stock"]
    assert stock["ok"], stock["problems"]
    assert (stock["sold"], stock["held"]) == (0, held)
    assert report["stock_ok"]


def test_hot_sku_sells_exactly_its_stock_to_200_in_flight(capsys, monkeypatch, tmp_path, postgres_url, redis_url):
    """200 lanes race for 150 units on one SKU, embedded and on PostgreSQL +
    Redis: the first 200 Reserves alone outnumber the stock, so it sells out
    whatever the machine's speed; exactly 150 are sold, each to a Confirm
    answered OK, and the other Reserves are refused for stock."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    argv = [*SHORT, "--mix", "hot-sku", "--in-flight", "200", "--stock", "150",
            "--backend", "sqlite", "--backend", f"{postgres_url},{redis_url}", "--store-pool", "2"]

    assert main(argv) == 0

    report = json.loads(capsys.readouterr().out)
    assert list(report["targets"]) == ["sqlite+memory", "postgres+redis", "echo"]
    _assert_only_expected_answers(report)
    table = _table(report)
    for label in ("sqlite+memory", "postgres+redis"):
        stock = report["targets"][label]["stock"]
        assert stock["ok"], (label, stock["problems"])
        assert not stock["oversold"]
        assert (stock["total"], stock["sold"], stock["held"], stock["available"]) == (150, 150, 0, 0), stock
        assert stock["ok_confirms"] == 150 and stock["unsettled"] == 0
        assert stock["ledger"]["Reserve OK"] == 150
        assert stock["ledger"][f"Reserve {REFUSED_FOR_STOCK}"] >= 50  # the first wave's losers, at least
        assert f"{label}: stock: 150 sold of 150, no oversell" in table
    assert report["stock_ok"]


def test_hot_sku_count_stays_exact_when_answers_are_lost(capsys, monkeypatch, tmp_path):
    """A 5 ms deadline loses most answers on the client: each lost call is sent
    again after the window (same key, so a replay or the call itself) until
    the ledger knows what it did, and the count still adds up exactly."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    argv = ["--duration", "0.5", "--warmup", "0", "--json", "--mix", "hot-sku", "--in-flight", "20", "--stock", "30",
            "--timeout-s", "0.005"]

    assert main(argv) == 0

    stock = json.loads(capsys.readouterr().out)["targets"]["sqlite+memory"]["stock"]
    assert stock["ok"], stock["problems"]
    assert stock["unsettled"] == 0
    assert stock["sold"] + stock["held"] == 30 == stock["ledger"]["Reserve OK"]


def test_workers_reach_every_server_and_the_count_holds_across_them(capsys, monkeypatch, tmp_path, postgres_url, redis_url):
    """`--workers 2` goes to the started server (PostgreSQL + Redis: a store
    and snapshot shared by its processes); two client processes, so two
    connections for the kernel to spread; still exactly the stock sold."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    argv = [*SHORT, "--mix", "hot-sku", "--in-flight", "200", "--clients", "2", "--stock", "150", "--workers", "2",
            "--backend", f"{postgres_url},{redis_url}"]

    assert main(argv) == 0

    report = json.loads(capsys.readouterr().out)
    assert report["workers"] == 2
    row = report["targets"]["postgres+redis"]
    assert row["address"].endswith("--workers 2)")
    assert set(row["outcomes"]) | set(row["warmup_outcomes"]) <= MIXES["hot-sku"].answers
    assert (row["stock"]["sold"], row["stock"]["ok_confirms"], row["stock"]["held"]) == (150, 150, 0)
    assert row["stock"]["ok"], row["stock"]["problems"]


# -- the stock count ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("put", "total", "available", "held", "sold", "ledger", "unsettled", "problems"),
    [
        (10, 10, 3, 2, 5, {"Reserve OK": 7, "Confirm OK": 5}, 0, []),
        (10, 10, 4, 1, 5, {"Reserve OK": 8, "Confirm OK": 5, "Release OK": 2}, 0, []),
        (10, 10, 0, 0, 10, {"Reserve OK": 10, "Confirm OK": 10}, 3, ["3 calls never got a definite answer"]),
        (10, 12, 2, 0, 10, {"Reserve OK": 10, "Confirm OK": 10}, 0, ["total 12 is not the 10 put"]),
        (10, 10, 1, 0, 10, {"Reserve OK": 10, "Confirm OK": 10}, 0, ["available 1 + held 0 + sold 10 != total 10"]),
        (10, 10, -1, 0, 11, {"Reserve OK": 11, "Confirm OK": 11}, 0, ["oversold: 11 sold of 10"]),
        (10, 10, 0, 0, 10, {"Reserve OK": 10, "Confirm OK": 9}, 0,
         ["sold 10 != 9 Confirms answered OK", "held 0 != 1 Reserves answered OK"]),
        (10, 10, 0, 3, 7, {"Reserve OK": 9, "Confirm OK": 7}, 0, ["held 3 != 2 Reserves answered OK"]),
    ],
)
def test_stock_count_names_each_mismatch(put, total, available, held, sold, ledger, unsettled, problems):
    count = _stock_count(put, total, available, held, sold, Counter(ledger), unsettled)
    assert count["ok"] is (not problems)
    assert len(count["problems"]) == len(problems), count["problems"]
    for found, expected in zip(count["problems"], problems):
        assert found.startswith(expected), (found, expected)


def test_a_count_that_does_not_add_up_is_a_failed_line_and_exit_1(capsys, monkeypatch):
    def run(options, tmp, stack):
        served = Result(calls=1, latencies_us=[900], outcomes=Counter(OK=1))
        served.stock = _stock_count(10, 10, -1, 0, 11, Counter({"Reserve OK": 11, "Confirm OK": 11}), 0)
        echo = Result(calls=2, latencies_us=[400, 500], outcomes=Counter(OK=2))
        return _report(options, {"sqlite+memory": ("127.0.0.1:1", served)}, echo, {"sqlite+memory": [1.0], "echo": [2.0]})

    monkeypatch.setattr(bench, "_run", run)

    assert main(["--mix", "hot-sku", "--stock", "10"]) == 1

    out = capsys.readouterr().out
    assert "sqlite+memory: stock: FAILED: oversold: 11 sold of 10" in out


@pytest.mark.parametrize(
    ("outcome", "definite"),
    [
        ("OK", True),
        (REFUSED_FOR_STOCK, True),
        ("DEADLINE_EXCEEDED/BUDGET_EXCEEDED", True),  # the server's: the move never started
        ("DEADLINE_EXCEEDED", False),  # the client's deadline: the answer was lost
        ("CANCELLED", False),
        ("UNAVAILABLE", False),
        ("UNAVAILABLE/DEPENDENCY_UNAVAILABLE", False),  # the store failed under the call: it may have committed
        ("ABORTED/REQUEST_IN_FLIGHT", False),
        ("UNKNOWN/MISMATCHED_STATUS_DETAILS", False),
    ],
)
def test_only_definite_answers_go_into_the_ledger_unsettled(outcome, definite):
    assert _definite(outcome) is definite


# -- the report: contract violations, the plot -----------------------------------------------


def test_contract_violations_count_answers_by_their_reason():
    outcomes = Counter({"OK": 5, "INVALID_ARGUMENT/CONTRACT_VIOLATION": 2, "INVALID_ARGUMENT/INVALID_REQUEST": 1})
    assert _contract_violations(outcomes) == 2


def test_plot_draws_a_png_of_every_target(capsys, monkeypatch, tmp_path):
    pytest.importorskip("matplotlib")
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    picture = tmp_path / "bench.png"

    assert main(["--duration", "0.5", "--warmup", "0.2", "--in-flight", "4", "--json", "--plot", str(picture)]) == 0

    report = json.loads(capsys.readouterr().out)
    assert report["plot"] == str(picture)
    data = picture.read_bytes()
    assert data.startswith(PNG_SIGNATURE)
    assert len(data) > 20_000  # two rows of two panels, not an empty canvas


def test_plot_without_matplotlib_fails_before_running(capsys, monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` raises ImportError

    def run(*args):
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr(bench, "_run", run)

    assert main(["--plot", str(tmp_path / "bench.png")]) == 1

    assert "pip install 'holdfast[plot]'" in capsys.readouterr().err
    assert not (tmp_path / "bench.png").exists()


# -- options -------------------------------------------------------------------------------------


def test_hot_sku_stock_defaults_small_and_stock_option_overrides():
    assert _options(["--mix", "hot-sku"]).total == 1000
    assert _options(["--mix", "hot-sku", "--stock", "5"]).total == 5
    assert _options(["--mix", "reserve"]).total == 10**15


def test_workers_option_is_checked_and_kept():
    assert _options(["--workers", "3"]).workers == 3
    assert _options([]).workers is None
    with pytest.raises(SystemExit) as exited:
        _options(["--workers", "0"])
    assert exited.value.code == 2


def test_rounds_interleave_targets_and_report_each_targets_median_round(capsys, monkeypatch, tmp_path):
    """Three rounds: each target is measured three times, in turn, with new
    requests every round; calls/s is the median round and the stock count
    covers every round."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    assert main(["--duration", "0.5", "--warmup", "0.2", "--in-flight", "8", "--rounds", "3", "--json"]) == 0

    report = json.loads(capsys.readouterr().out)
    assert report["rounds"] == 3
    for label in ("sqlite+memory", "echo"):
        row = report["targets"][label]
        assert len(row["rounds_calls_per_s"]) == 3
        assert row["calls_per_s"] == sorted(row["rounds_calls_per_s"])[1]
    held = report["targets"]["sqlite+memory"]["stock"]
    assert held["ok"], held
    # Every round's Reserves are new ones: the holds add up over all three rounds.
    assert report["targets"]["sqlite+memory"]["outcomes"] == {"OK": report["targets"]["sqlite+memory"]["calls"]}


# -- CPU per call ---------------------------------------------------------------------------------


def _assert_cpu_per_call(label: str, row: dict) -> None:
    """Positive CPU per call for the server and the client, a ratio to echo's,
    and the server's thread roles adding up to at most its total: a role
    misses the threads that ended in the window, and each thread's ticks are
    rounded on their own (so allow a tick per thread and per edge of the window)."""
    cpu = row["cpu"]
    assert cpu["server_us_per_call"] > 0 and cpu["client_us_per_call"] > 0, (label, cpu)
    assert cpu["ratio"] > 0, (label, cpu)
    roles = cpu["roles_us_per_call"]
    assert set(roles) == set(ROLES) and all(value >= 0 for value in roles.values()), (label, roles)
    assert roles["loop"] > 0 and roles["grpc"] > 0, (label, roles)  # the event loop and gRPC's threads both work
    rounding = 2 * cpu["tick_us_per_call"] * sum(cpu["threads"].values())
    assert sum(roles.values()) <= cpu["server_us_per_call"] + rounding, (label, cpu)
    assert cpu["threads"]["loop"] >= 1 and cpu["threads"]["grpc"] >= 1, (label, cpu["threads"])
    assert 0.5 <= cpu["window_s"] <= 2.0, (label, cpu)  # the measured window (1 s), not the warm-up with it


def test_cpu_per_call_of_every_target_and_its_ratio_to_echo(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    assert main([*SHORT, "--in-flight", "8"]) == 0

    report = json.loads(capsys.readouterr().out)
    assert report["clock_ticks_per_s"] == os.sysconf("SC_CLK_TCK")
    for label, row in report["targets"].items():
        _assert_cpu_per_call(label, row)
        assert "postgres_us_per_call" not in row["cpu"] and "redis_us_per_call" not in row["cpu"]
    echo = report["targets"]["echo"]["cpu"]
    assert echo["ratio"] == 1.0
    assert echo["roles_us_per_call"]["store"] == 0 and echo["threads"]["store"] == 0
    served = report["targets"]["sqlite+memory"]["cpu"]
    assert served["threads"]["store"] >= 1 and served["roles_us_per_call"]["store"] > 0  # holdfast-store-0
    assert report["cpu_ratios"] == {"sqlite+memory": served["ratio"]}
    expected = served["server_us_per_call"] / echo["server_us_per_call"]
    assert served["ratio"] == pytest.approx(expected, rel=0.01)
    assert report["ratios"]["sqlite+memory"] == report["targets"]["sqlite+memory"]["ratio"]  # still calls/s
    table = _table(report)
    assert "cpu µs" in table and "cpu µs/call" in table
    assert f"{served['server_us_per_call']:.1f}" in table


@pytest.mark.skipif(not (Path(os.environ.get("HOLDFAST_PG_BINDIR") or bench.PG_BINDIR) / "initdb").exists(),
                    reason="no PostgreSQL binaries to start a throwaway cluster")
def test_with_postgres_redis_reports_their_cpu_and_the_handwritten_row(capsys):
    """The bench's own PostgreSQL and Redis: their CPU per call on the rows
    that use them (holdfast's and the hand-written server's), nowhere else;
    the hand-written row counts its stock like holdfast's. (The temp dirs stay
    the system's: as root, PostgreSQL runs as the postgres user, who must
    reach its directory.)"""
    assert main([*SHORT, "--in-flight", "8", "--mix", "reserve-confirm", "--skus", "5", "--with-postgres-redis"]) == 0

    report = json.loads(capsys.readouterr().out)
    users = ["postgres+redis", *([HANDWRITTEN] if HANDWRITTEN in report["targets"] else [])]
    assert list(report["targets"]) == ["sqlite+memory", *users, "echo"]
    for label, row in report["targets"].items():
        _assert_cpu_per_call(label, row)
        cpu = row["cpu"]
        if label in users:
            _assert_all_ok(row)
            assert cpu["postgres_us_per_call"] > 0 and cpu["redis_us_per_call"] > 0, (label, cpu)
            parts = cpu["server_us_per_call"] + cpu["postgres_us_per_call"] + cpu["redis_us_per_call"]
            assert cpu["service_us_per_call"] == pytest.approx(parts, abs=0.02)
            assert row["stock"]["ok"] and row["stock"]["skus"] == 5, (label, row["stock"])
        else:
            assert "postgres_us_per_call" not in cpu and "redis_us_per_call" not in cpu, (label, cpu)
    assert "postgres" in _table(report)


def test_thread_roles_by_name():
    assert _role(10, 10, "python", "python") == "loop"  # the main thread runs the event loop
    assert _role(10, 11, "holdfast-store-", "python") == "store"  # holdfast-store-0, cut to 15 bytes
    assert _role(10, 12, "holdfast-memory", "python") == "store"
    assert _role(10, 13, "Thread-1 (_poll", "python") == "grpc"  # grpc.aio's poller
    assert _role(10, 14, "event_engine", "python") == "grpc"
    assert _role(10, 15, "grpc_global_tim", "python") == "grpc"
    assert _role(10, 16, "uvloop_0", "python") == "other"
    assert _role(10, 17, "holdfast-worker", "python") == "other"
    assert _role(10, 18, "python", "python") == "other"  # a thread nobody named
    assert _role(10, 19, "OtelBatchSpanRe", "python") == "other"  # a traced server's span exporter


def test_cpu_between_counts_new_threads_from_zero_and_dead_ones_only_in_the_total():
    first = _CpuSample(1.0, {"server": 100, "client": 50},
                       {(1, 1): ("loop", 60), (1, 2): ("store", 20), (1, 3): ("grpc", 10)})
    last = _CpuSample(3.0, {"server": 190, "client": 80},
                      {(1, 1): ("loop", 110), (1, 2): ("store", 40), (1, 4): ("grpc", 5)})

    cpu = _cpu_between(first, last)

    assert cpu.window_s == 2.0
    assert cpu.ticks == {"server": 90, "client": 30, "loop": 50, "store": 20, "grpc": 5, "other": 0}
    assert cpu.threads == {"loop": 1, "store": 1, "grpc": 1, "other": 0}
    assert sum(cpu.ticks[role] for role in ROLES) <= cpu.ticks["server"]


# -- SKUs ------------------------------------------------------------------------------------------


def test_skus_spread_a_reserve_confirm_run_and_each_is_counted_exactly(capsys, monkeypatch, tmp_path):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    assert main([*SHORT, "--in-flight", "8", "--mix", "reserve-confirm", "--skus", "7"]) == 0

    report = json.loads(capsys.readouterr().out)
    assert report["skus"] == 7
    row = report["targets"]["sqlite+memory"]
    _assert_all_ok(row)
    stock = row["stock"]
    assert stock["ok"], stock["problems"]
    assert (stock["skus"], stock["skus_touched"], stock["skus_failed"]) == (7, 7, 0)
    assert stock["total"] == 7 * MIXES["reserve-confirm"].stock
    assert stock["held"] == 0 and stock["sold"] == stock["ok_confirms"] == stock["ledger"]["Confirm OK"] > 0
    assert stock["ledger"]["Reserve OK"] == stock["ledger"]["Confirm OK"]
    assert stock["available"] + stock["sold"] == stock["total"]
    # Unit n on SKU n % 7, units handed out in order: the SKUs' OK Reserves differ by one at most.
    spread = stock["reserves_per_sku"]
    assert 0 < spread["min"] <= spread["max"] <= spread["min"] + 1, spread
    assert "7 SKUs, each counted, 7 touched" in _table(report)


def test_sku_count_names_the_sku_whose_count_fails():
    skus = ["bench-x-0", "bench-x-1", "bench-x-2"]
    result = Result(ledger=Counter({"Reserve OK": 5, "Confirm OK": 3}),
                    sku_ledgers={0: Counter({"Reserve OK": 2, "Confirm OK": 2}),
                                 1: Counter({"Reserve OK": 3, "Confirm OK": 1})})
    stocks = [pb.StockReply(sku_id=skus[0], total=10, available=8, held=0, sold=2),
              pb.StockReply(sku_id=skus[1], total=10, available=6, held=2, sold=2),  # one more sold than confirmed
              pb.StockReply(sku_id=skus[2], total=10, available=10, held=0, sold=0)]

    count = _sku_counts(skus, 10, stocks, result)

    assert not count["ok"] and count["skus_failed"] == 1
    assert count["problems"] == ["bench-x-1: sold 2 != 1 Confirms answered OK"]
    assert (count["total"], count["sold"], count["held"], count["skus_touched"]) == (30, 4, 2, 2)
    assert count["reserves_per_sku"] == {"min": 0, "max": 3}


def test_skus_option_defaults_to_1000_and_hot_sku_keeps_one():
    assert _options([]).sku_count == 1000
    assert _options(["--skus", "7", "--mix", "replay"]).sku_count == 7
    assert _options(["--mix", "hot-sku"]).sku_count == 1
    for argv in (["--mix", "hot-sku", "--skus", "5"], ["--skus", "0"]):
        with pytest.raises(SystemExit) as exited:
            _options(argv)
        assert exited.value.code == 2


# -- the traces' cost (--traced) --------------------------------------------------------------------


@pytest.mark.skipif(_tracing_unavailable() is not None,
                    reason="--traced needs the otel extra: pip install 'holdfast[otel]'")
def test_traced_row_measures_the_backend_with_its_spans_leaving_for_the_sink(capsys, monkeypatch, tmp_path):
    """The embedded backend twice, the second time exporting a span per call
    (and its phases') over OTLP/gRPC to the bench's sink: a row like the
    others (calls/s, CPU per call and its roles, ratios to echo, its own stock
    count), with the spans the sink received, at least one per call the
    clients made, since the server flushes its last batch as it stops."""
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))

    assert main([*SHORT, "--in-flight", "8", "--traced"]) == 0

    report = json.loads(capsys.readouterr().out)
    assert list(report["targets"]) == ["sqlite+memory", "sqlite+memory+traces", "echo"]
    row = report["targets"]["sqlite+memory+traces"]
    _assert_all_ok(row)
    _assert_cpu_per_call("sqlite+memory+traces", row)
    assert row["traced"] is True and row["traces_of"] == "sqlite+memory"
    assert row["spans_received"] >= row["calls_made"] > 0, row
    assert f"--otlp-endpoint {row['otlp_sink']}" in row["address"]
    assert row["stock"]["ok"], row["stock"]["problems"]
    assert row["stock"]["held"] == row["stock"]["ledger"]["Reserve OK"]  # its own SKUs: only its calls on them
    assert report["ratios"]["sqlite+memory+traces"] == row["ratio"]
    assert report["cpu_ratios"]["sqlite+memory+traces"] == row["cpu"]["ratio"]
    assert report["targets"]["sqlite+memory"]["traced"] is False and "spans_received" not in report["targets"]["echo"]
    cost, untraced = row["tracing_cost"], report["targets"]["sqlite+memory"]
    assert cost["server_us_per_call"] == pytest.approx(
        row["cpu"]["server_us_per_call"] - untraced["cpu"]["server_us_per_call"], abs=0.02)
    assert f"sqlite+memory+traces: traces: {row['spans_received']} spans received by the OTLP sink" in _table(report)
    assert not list(tmp_path.glob("holdfast-bench-*")), "temp dir left behind"


def test_traced_without_opentelemetry_is_a_usage_error_naming_the_extra(capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "opentelemetry.sdk.trace", None)  # importing it raises ImportError

    def run(*args):
        raise AssertionError("the benchmark ran")

    monkeypatch.setattr(bench, "_run", run)

    with pytest.raises(SystemExit) as exited:
        main(["--traced"])

    assert exited.value.code == 2
    err = capsys.readouterr().err
    assert "--traced" in err and "opentelemetry-sdk" in err and "pip install 'holdfast[otel]'" in err


def test_traced_does_not_go_with_target():
    with pytest.raises(SystemExit) as exited:
        _options(["--target", "127.0.0.1:1", "--traced"])
    assert exited.value.code == 2


def test_traces_line_says_when_no_span_left():
    served = Result(calls=1, latencies_us=[900], outcomes=Counter(OK=1), calls_made=1)
    echo = Result(calls=2, latencies_us=[400, 500], outcomes=Counter(OK=2))
    rows = {"sqlite+memory": ("127.0.0.1:1", served), "sqlite+memory+traces": ("127.0.0.1:2", served)}
    traced = {"sqlite+memory+traces": {"traces_of": "sqlite+memory", "otlp_sink": "127.0.0.1:3", "spans_received": 0}}
    rates = {"sqlite+memory": [1.0], "sqlite+memory+traces": [1.0], "echo": [2.0]}

    report = _report(_options([]), rows, echo, rates, traced=traced)

    row = report["targets"]["sqlite+memory+traces"]
    assert row["traced"] and row["spans_received"] == 0
    assert row["tracing_cost"] == {"calls_per_s_ratio": 1.0, "server_us_per_call": None, "cpu_ratio": None}
    assert "sqlite+memory+traces: traces: NONE received by the OTLP sink at 127.0.0.1:3" in _table(report)
