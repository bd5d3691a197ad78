"""Prometheus metrics: what proves the service deterministic while it runs."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram

OUTCOMES = Counter("holdfast_outcomes_total", "Answers by method and reason (OK for success).", ["method", "reason"])
REPLAYS = Counter("holdfast_replays_total", "Answers served from a recorded outcome.", ["method"])
COMPENSATIONS = Counter("holdfast_compensations_total", "Snapshot/store version disagreements compensated.")
CONTRACT_VIOLATIONS = Counter("holdfast_contract_violations_total", "Calls rejected by their contract.", ["method"])
TIMEOUT_FALLBACKS = Counter(
    "holdfast_timeout_fallback_total",
    "Calls answered BUDGET_EXCEEDED: the server's budget ran out before the move or read could start, so nothing changed.",
    ["method"],
)
CONSISTENCY = Histogram(
    "holdfast_state_transition_consistency_seconds",
    "From a move's store commit being seen by the engine to its snapshot advance being done.",
    buckets=(0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25),
)
LATENCY = Histogram(
    "holdfast_request_seconds",
    "Server time per call.",
    ["method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)

# The Redis snapshot (service/snapshot.py). One process normally runs one
# snapshot, so these carry no labels.
SNAPSHOT_DEGRADATIONS = Counter(
    "holdfast_snapshot_degradations_total",
    "Snapshot calls answered without Redis (down, timed out, or not yet rebuilt): the move ran on the store's compare-and-set alone.",
)
SNAPSHOT_DEGRADED = Gauge(
    "holdfast_snapshot_degraded",
    "1 while the snapshot is not trusted (Redis unreachable, or being rebuilt from the store), else 0.",
)
SNAPSHOT_REBUILDS = Counter(
    "holdfast_snapshot_rebuilds_total",
    "Completed snapshot rebuilds from the store (at start-up and after each outage).",
)

# Row locks on a shared store (service/postgres.py, docs/locks.md).
MOVES_DEFERRED = Counter(
    "holdfast_store_moves_deferred_total",
    "Moves handed to the store's waiter because a row they name was held by another session, so their batch did not wait.",
)
STALLED_SESSIONS_ENDED = Counter(
    "holdfast_store_stalled_sessions_ended_total",
    "holdfast sessions ended for sitting idle inside a transaction past the bound, holding rows (a frozen or partitioned instance).",
)

# Fault injection (service/faults.py): every call a fault file's table hit,
# so a chaos run or a test can count the attempts that reached the server.
FAULTS_INJECTED = Counter(
    "holdfast_faults_injected_total",
    "Calls given an injected delay or status by the --faults file.",
    ["method"],
)

# -- the deterministic ratio ---------------------------------------------------------
#
# An answer is deterministic when the client can act on it without guessing:
# a success, or any holdfast error that says what happened (nothing changed,
# or a recorded refusal that replays as itself). The one answer that is not
# is DEPENDENCY_UNAVAILABLE: the store failed under the call, so the client
# must retry with the same idempotency key to learn whether it committed.
# BUDGET_EXCEEDED is deterministic (the move never started). The ratio is
# computed at scrape time from the gateway's answer counts (OUTCOMES), so it
# costs the request path nothing; before any answer it reads 1.0.

UNDETERMINED_REASONS = frozenset({"DEPENDENCY_UNAVAILABLE"})


def deterministic_ratio(outcomes: Counter = OUTCOMES) -> float:
    """Deterministic answers / all answers since the process started (1.0 with
    none), from a counter labelled by `reason` like OUTCOMES."""
    total = undetermined = 0.0
    for family in outcomes.collect():
        for sample in family.samples:
            if not sample.name.endswith("_total"):
                continue
            total += sample.value
            if sample.labels.get("reason") in UNDETERMINED_REASONS:
                undetermined += sample.value
    return 1.0 if total == 0 else (total - undetermined) / total


DETERMINISTIC_RATIO = Gauge(
    "holdfast_deterministic_ratio",
    "Share of answers whose outcome the client knows (all but DEPENDENCY_UNAVAILABLE); 1.0 before any answer.",
)
DETERMINISTIC_RATIO.set_function(deterministic_ratio)

# `holdfast verify` (service/verify.py): the inconsistencies a run found, by
# kind (snapshot_ahead, intent_stuck, outcome_orphaned, and the apps' own,
# such as stock_unbalanced). A one-shot command: `--metrics-file` writes it
# for a textfile collector.
VERIFY_FINDINGS = Counter(
    "holdfast_verify_findings_total",
    "Inconsistencies `holdfast verify` found between the store's rows, and between the snapshot and the store, by kind.",
    ["kind"],
)
# Retention (holdfast.retention): what its rounds pruned, by kind: `rows`
# (settled entities and the rows that go with them), `records` (outcome
# records turned into tombstones), `tombstones` (dropped at last).
PRUNED = Counter("holdfast_pruned_total", "Rows, outcome records and tombstones pruned by retention.", ["kind"])
