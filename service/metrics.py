"""Prometheus metrics: what proves the service deterministic while it runs."""

from __future__ import annotations

from prometheus_client import Counter, Histogram

OUTCOMES = Counter("holdfast_outcomes_total", "Answers by method and reason (OK for success).", ["method", "reason"])
REPLAYS = Counter("holdfast_replays_total", "Answers served from a recorded outcome.", ["method"])
COMPENSATIONS = Counter("holdfast_compensations_total", "Snapshot/store version disagreements compensated.")
CONTRACT_VIOLATIONS = Counter("holdfast_contract_violations_total", "Calls rejected by their contract.", ["method"])
TIMEOUT_FALLBACKS = Counter("holdfast_timeout_fallback_total", "Moves refused because their budget ran out first.", ["method"])
LATENCY = Histogram(
    "holdfast_request_seconds",
    "Server time per call.",
    ["method"],
    buckets=(0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
