"""The soak test of retention (holdfast.retention): `holdfast serve` as a
real process under steady Reserve + Confirm load with a retention of 1.5 s
(and tombstones of 1.5 s), on SQLite with the in-process snapshot and on
PostgreSQL with Redis. Once the retention has passed, what the server keeps
is flat: the store's rows and bytes, the Redis snapshot's keys, and the
server's RSS grow by a small fraction of what every call left before
retention (2 rows, ~420 bytes of SQLite or ~570 of PostgreSQL, a Redis key
per reservation, ~110 bytes of RSS with the in-process snapshot:
docs/retention.md has the figures, from `python -m tests.soak`).

Flat is asserted as growth per call after the warm-up, against a bound far
below what keeping everything costs; nothing here depends on speed (a slow
machine makes fewer calls, and the bounds are per call)."""

from __future__ import annotations

import asyncio

from tests import soak

RETENTION_MS = 1500
WARM_UP_S = 8.0  # retention + tombstones + the longest hold, and a few rounds
SECONDS = 36.0
EVERY_S = 4.0


def _growth_per_call(samples: list[soak.Sample], field: str) -> float:
    warm = next(s for s in samples if s.at_s >= WARM_UP_S)
    last = samples[-1]
    calls = last.calls - warm.calls
    assert calls > 1000, f"too few calls to tell: {samples}"
    return (getattr(last, field) - getattr(warm, field)) / calls


def _report(samples: list[soak.Sample]) -> str:
    return "\n".join(str(s) for s in samples)


def test_the_embedded_store_and_the_server_stay_flat_under_load(tmp_path):
    path = f"{tmp_path}/soak.db"
    server = soak.serve(f"sqlite:///{path}", "memory://", RETENTION_MS, RETENTION_MS)
    try:
        samples = asyncio.run(soak.soak(server, SECONDS, EVERY_S, sqlite_path=path))
    finally:
        server.stop()
        server.close()
    shown = _report(samples)
    assert _growth_per_call(samples, "store_rows") < 0.1, shown  # keeping everything: 2 rows a call
    assert _growth_per_call(samples, "store_bytes") < 40, shown  # keeping everything: ~420 bytes a call
    assert _growth_per_call(samples, "rss_bytes") < 60, shown  # keeping everything: ~110 bytes a call
    assert "Traceback" not in server.stderr.text(), server.output()


def test_postgres_and_the_redis_snapshot_stay_flat_under_load(postgres_url, redis_url):
    server = soak.serve(postgres_url, redis_url, RETENTION_MS, RETENTION_MS)
    try:
        samples = asyncio.run(soak.soak(server, SECONDS, EVERY_S, postgres_url=postgres_url, redis_url=redis_url))
    finally:
        server.stop()
        server.close()
    shown = _report(samples)
    assert _growth_per_call(samples, "store_rows") < 0.1, shown
    assert _growth_per_call(samples, "store_bytes") < 100, shown  # keeping everything: ~570 bytes a call
    assert _growth_per_call(samples, "redis_keys") < 0.05, shown  # keeping everything: a key per reservation
    # The server's RSS is not asserted here: the snapshot lives in Redis, and
    # keeping everything grew it by ~11 bytes a call, within this run's noise.
    assert "Traceback" not in server.stderr.text(), server.output()

