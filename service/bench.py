"""`holdfast bench`: Reserve throughput of one or more holdfast backends,
measured against a bare grpc.aio echo server in the same run.

Why it is built this way:

* Separate processes. The server under test, the echo baseline and the load
  generator each run in their own process. A client inside the server's
  process would share its event loop and its GIL, so the numbers would measure
  the two fighting over one core rather than the server.
* A same-run baseline. The machine is noisy (few, shared cores), so calls/s
  alone mean little from one run to the next. The same client, with the same
  number of calls in flight for the same duration, also drives a grpc.aio
  server whose only handler returns the request bytes. The ratio of the two
  is the number to compare across runs (DESIGN.md, "Performance rules": speed
  is measured by this benchmark, never by timed tests).
* A closed loop. N lanes each keep one call in flight and send the next call
  when the previous one is answered. After a warm-up, a call counts when it
  completes inside the measured window. Latency is taken per call, on the
  client.
* The client sends the same bytes to both targets: the echo baseline gets the
  serialized ReserveRequest, so serialization and payload size match.
  Replies are never parsed (the replay mix compares their bytes).

* Backends side by side. Each `--backend STORE_URL[,SNAPSHOT_URL]` gets a
  fresh holdfast server of its own (`--store`, `--snapshot`, `--store-pool`),
  measured one after the other with the same client settings; the table has
  a row per backend (labelled by its schemes, e.g. `sqlite+memory`,
  `postgres+redis`) with its ratio to the echo row. `--with-postgres-redis`
  starts a throwaway PostgreSQL cluster and redis-server for the run and adds
  them as one more backend; and, when this holdfast has it, the hand-written
  baseline server (`python -m holdfast.handwritten`: what a team writes
  instead of using holdfast) as a row labelled `handwritten`, on a database
  of its own in that cluster and Redis database 1, with the same client,
  mix, SKUs and stock count. It does not send `holdfast-replayed`, so the
  replay mix leaves it out (a note says so).
* CPU per call. Calls/s depends on how many cores the machine lends each
  process; the CPU a call costs depends much less on that. So for every
  target the bench also reads how much CPU was used in the measured window:
  by the server (all its threads, and its descendants, e.g. --workers'
  processes), by thread role, by the client processes and, when the bench
  started them, by PostgreSQL (the postmaster and all its children) and by
  redis-server, each over the window's measured calls in µs per call; and
  each server's over echo's (`/ echo` beside `cpu µs`).
* The traces' cost (`--traced`, needs `pip install 'holdfast[otel]'`). Each
  holdfast server the bench starts gets a traced twin, measured right after
  it in every round with the same client settings: the same backend (a fresh
  SQLite file of its own for `sqlite`; otherwise the same store and snapshot,
  on SKUs of its own, so each row's stock count stays its own), started with
  `--otlp-endpoint` (service/tracing.py: a span per call and its phases' spans,
  a BatchSpanProcessor exporting over OTLP/gRPC) to an OTLP sink the bench
  runs for it: a real OTLP/gRPC receiver, but cheap, a grpc.aio server in its
  own process whose collector TraceService.Export counts the spans it is sent
  and answers an empty ExportTraceServiceResponse. Its row is labelled by its
  backend's plus `+traces` (`sqlite+memory+traces`, `postgres+redis+traces`)
  and has every column of the others; in --json also `traced: true`,
  `spans_received` (asked of the sink after the server has stopped, so its
  last batch is in: the traces really left) and `tracing_cost` (calls/s and
  server CPU per call against the untraced row), and a `traces:` line under
  the table. The sink stands for a collector elsewhere: its CPU is in no
  column. Not with --target (its tracing is its own).

Safety: only loopback targets; every loop is bounded in calls and in time;
every subprocess (PostgreSQL and Redis included) and every temporary
directory are cleaned up on error, on Ctrl-C and on SIGTERM.

How the CPU is read. From /proc: utime + stime of each process (with cutime
+ cstime, so a child that exits in the window, e.g. a PostgreSQL backend,
still counts in its parent's), and of each server thread in
/proc/PID/task/TID/stat, whose comm field is the thread's name (the same as
/proc/PID/task/TID/comm); clock ticks of os.sysconf('SC_CLK_TCK'). Thread
roles: `loop` each server process's main thread, which runs the event loop;
`store` the store's threads (`holdfast-store-N`, `holdfast-memory-store`);
`grpc` gRPC's own (its C-core threads, `grpc_global_tim`, `event_engine`,
`lifeguard`..., and its aio poller `Thread-N (_poll_wrapper)`); `other` the
rest (a default executor, `uvloop_N` or `asyncio_N`, holdfast's other
threads, a traced server's span exporter `OtelBatchSpanRecordProcessor`, and
unnamed ones). Python before 3.14 leaves a thread's OS name the
process's unless the thread sets it (holdfast's store threads do,
holdfast.store.name_os_thread; gRPC's poller does not), so the bench starts
its servers through `_serve` (holdfast serve itself, plus: each Python
thread gives itself its name with prctl(PR_SET_NAME) as it starts, as 3.14
does; --workers' spawned processes too) and the echo and hand-written
servers likewise. A --target's server was not started so: its unnamed
Python threads (gRPC's poller among them) count as `other`, and its
processes are the ones listening on its port (if this user can see them).

The window. The bench's own process samples all those counters at the
instants the client processes open and close their measured window, from a
thread of its own: the clients turn the start instant they are sent into
CLOCK_MONOTONIC, one clock for every process of the machine, and so does the
sampler, so its two samples are the window's edges (late by the few ms a
sample of /proc takes, and the scheduler's wake-up). The window's calls are
those the clients count, completed inside it. One clock tick (10 ms at 100
Hz) of a thread over those calls is the resolution; `tick_us_per_call`
says how much that is per call. A thread that ends inside the window is in
its process's total but in no role, and each thread's times are rounded
down to ticks on their own, so the roles add up to the total give or take a
tick or so per thread. CPU per call is over every round's windows; a round
that could not be sampled leaves the row without it.

Mixes (`--mix`): a mix turns a unit number into the calls of one unit of work
(method name and request bytes, sent in order on one lane; a unit stops at its
first answer that is not OK, since a refused Reserve leaves nothing to
confirm). A unit's later calls name its reservation without reading a reply,
because the reservation id is derived from the Reserve key
(`holdfast.apps.inventory.reservation_id` of `holdfast.gateway.idempotency_key`).
Every mix but hot-sku spreads its units over `--skus N` SKUs (default 1000),
each stocked before the run (PutStock, 10^15 units each or `--stock`): unit
n is on SKU n % N, in every client process, so every lane moves over all of
them and no one row lock decides the run.

* `reserve`: one Reserve of one unit. Answers: OK.
* `reserve-confirm`: Reserve, then Confirm it. Answers: OK.
* `reserve-release`: Reserve, then Release it; the stock ends where it began.
  Answers: OK.
* `replay`: before the start, each client process commits REPLAY_KEYS (1024)
  Reserves and keeps their reply bytes; every measured unit then sends one of
  those same requests again (unit n repeats seed n % REPLAY_KEYS, on that seed's SKU),
  so every measured answer is a replay of a stored outcome. Answers: OK, and a reply counts as
  OK only if its bytes are the seed's and (holdfast) its trailers say
  `holdfast-replayed: true`; otherwise `OK/REPLY_CHANGED` or `OK/NOT_REPLAYED`.
  Reading trailers costs the client a little; the echo row pays for the same
  byte comparison, not for the trailer.
* `hot-sku`: contention. Every lane Reserves then Confirms on the run's one
  SKU (whatever --skus says), stocked with only HOT_SKU_STOCK (1000, or
  `--stock`) units, so 200 lanes sell it out within a short run. Answers: OK, or
  FAILED_PRECONDITION/INSUFFICIENT_STOCK once it is gone.

The stock count. After each holdfast (and hand-written) target's run, the
bench reads every SKU of the run (GetStock, STOCK_CALLS_IN_FLIGHT at a time)
and checks each against every call the run made on it, warm-up and the
calls finishing after the window included (each client process keeps a
ledger of them, per SKU): sold == Confirms answered OK, held == Reserves
answered OK and neither confirmed nor released, available + held + sold ==
total, and nothing sold past the total, for each SKU on its own; the report
has the sums over the SKUs, how many the run touched and the fewest and most
OK Reserves one SKU got, and names the first SKUs whose count failed. A call whose answer was lost (a client-side
deadline, a broken connection: no holdfast reason) may or may not have moved
stock, so after the window it is sent again with the same bytes until it gets
a definite answer (its key makes that safe: the answer is the stored outcome
or the call itself). A count that does not add up is a `stock: FAILED` line
and exit code 1. The count runs for every mix, not only hot-sku; it assumes
no hold expires during the run (the servers the bench starts hold for 15
minutes; a --target that holds for less would fail it).

Report: per target, calls/s, p50/p99/p99.9 latency, outcomes by
`STATUS/REASON`, the answers whose ErrorInfo reason is CONTRACT_VIOLATION
(warm-up included: any is the bench's own bug), the ratio to echo, the CPU
per call (a second table has its breakdown) and its ratio to echo's, and the
stock count; `--json` has the same fields (a row's `cpu`, and `cpu_ratios`
beside `ratios`). `--plot FILE.png` (matplotlib,
`pip install 'holdfast[plot]'`) draws per target latency over time, from a
reservoir sample of at most PLOT_POINTS calls, and a histogram of the
measured latencies. On a terminal a progress line is drawn on stderr.
`--workers N` is passed on to every holdfast server the bench starts.

The child processes run this module as `python -m holdfast.bench _worker SPEC`,
`python -m holdfast.bench _echo HOST:PORT LIFETIME_S`, `... _serve SERVE_ARGS`
(holdfast serve), `... _module MODULE ARGS` (the hand-written server) and
`... _otlp_sink HOST:PORT LIFETIME_S` (a traced row's OTLP receiver).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.util
import ipaddress
import itertools
import json
import math
import os
import pwd
import random
import runpy
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Iterator

import grpc

from holdfast.inventory.v1 import inventory_pb2 as pb

from holdfast import loop as event_loop
from holdfast import tracing
from holdfast.call import idempotency_key
from holdfast.gateway import REPLAYED
from holdfast.apps.inventory import reservation_id
from holdfast.metrics import UNDETERMINED_REASONS

INVENTORY_PREFIX = "/holdfast.inventory.v1.InventoryService/"
ECHO_SERVICE = "holdfast.bench.v1.Echo"
ECHO_PATH = f"/{ECHO_SERVICE}/Echo"
HOLDFAST, ECHO = "holdfast", "echo"
HANDWRITTEN, HANDWRITTEN_MODULE = "handwritten", "holdfast.handwritten"  # the hand-written baseline server
HANDWRITTEN_REDIS_DB = 1  # its database on the bench's redis-server; holdfast's is 0
TRACED = "+traces"  # a traced twin's label: its backend's, then this (--traced)
OTLP_SINK = "otlp-sink"
OTLP_SINK_SERVICE = "holdfast.bench.v1.OtlpSink"  # the sink's own method: the spans it has received
OTLP_SINK_SPANS = f"/{OTLP_SINK_SERVICE}/Spans"
OTLP_TRACE_SERVICE = "opentelemetry.proto.collector.trace.v1.trace_service_pb2_grpc"  # opentelemetry-proto

STARTUP_TIMEOUT_S = 30.0  # a child process must be serving or connected by then
STOP_GRACE_S = 5.0  # SIGTERM, then this long, then SIGKILL
MAX_CALLS_PER_CLIENT = 10_000_000  # every lane loop stops here at the latest
MAX_PORT_ATTEMPTS = 3  # a free port can be taken between probing and binding
PERCENTILES = (("p50", 0.50), ("p99", 0.99), ("p99.9", 0.999))
SQLITE_IN_TMP = "sqlite"  # as a --backend store: a fresh SQLite file in the run's temp dir
PG_BINDIR = "/usr/lib/postgresql/15/bin"  # unless HOLDFAST_PG_BINDIR says otherwise
STORE_LABELS = {"sqlite": "sqlite", "postgresql": "postgres", "postgres": "postgres"}
STOCK_READ_TIMEOUT_S = 10.0  # GetStock after a run, when the server may still be busy
SETTLE_ATTEMPTS = 5  # sends of a call whose answer was lost, until one is definite
SETTLE_DELAY_S = 0.2  # between those sends
SETTLE_TIMEOUT_S = 10.0  # deadline of a settling send, unless --timeout-s is longer: it must get an answer
MAX_LOST = 10_000  # lost answers a client process keeps to settle; past that, they are counted unsettled
PLOT_POINTS = 20_000  # (time, latency) points per target for --plot, over all client processes
HISTOGRAM_BINS = 60
PROGRESS_WIDTH = 30  # characters of the progress bar
PROGRESS_EVERY_S = 0.2
SNAPSHOT_LABELS = {"memory": "memory", "redis": "redis", "rediss": "redis",
                   "redis+cluster": "redis-cluster", "rediss+cluster": "redis-cluster"}


class BenchError(Exception):
    """The benchmark could not run; the message says why."""


# -- mixes ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class MixContext:
    """What a mix needs to make distinct, valid requests for one client process."""

    run_id: str
    client: int
    sku_id: str  # the SKUs' common prefix, or with one SKU its id (_sku_id)
    timestamp_ms: int
    skus: int = 1  # unit n uses SKU n % skus

    def sku(self, n: int) -> str:
        return _sku_id(self.sku_id, self.skus, n % self.skus)


def _sku_id(base: str, skus: int, index: int) -> str:
    """SKU `index` of a run's `skus`: the base itself when there is one."""
    return base if skus == 1 else f"{base}-{index}"


@dataclass(frozen=True, slots=True)
class Mix:
    """A workload. `unit(ctx, n)` gives unit n's calls as (method, request
    bytes), sent in order on one lane; a unit stops at its first answer that is
    not OK (a refused Reserve leaves nothing to confirm). `stock` is the SKU's
    total unless --stock says otherwise; `answers` are the outcomes a correct
    server gives. Units 0..seeds-1 are sent once before the start, unmeasured;
    with `replays`, every measured call repeats one of them, so its answer must
    be the seed's bytes, flagged `holdfast-replayed: true`, and moves no stock."""

    name: str
    stock: int
    unit: Callable[[MixContext, int], list[tuple[str, bytes]]]
    answers: frozenset[str] = frozenset({"OK"})
    seeds: int = 0
    replays: bool = False


def _reserve_request(ctx: MixContext, n: int) -> pb.ReserveRequest:
    order_id = f"bench-{ctx.run_id}-{ctx.client}-{n}"
    return pb.ReserveRequest(order_id=order_id, sku_id=ctx.sku(n), quantity=1, timestamp_ms=ctx.timestamp_ms)


def _reservation_of(request: pb.ReserveRequest) -> str:
    """The id the server derives from the Reserve key: no reply needs reading."""
    key = idempotency_key(INVENTORY_PREFIX + "Reserve", (request.order_id, request.sku_id, request.timestamp_ms))
    return reservation_id(key)


def _reserve_unit(ctx: MixContext, n: int) -> list[tuple[str, bytes]]:
    return [("Reserve", _reserve_request(ctx, n).SerializeToString())]


def _reserve_confirm_unit(ctx: MixContext, n: int) -> list[tuple[str, bytes]]:
    """Reserve, then Confirm the reservation the server derives from its key."""
    request = _reserve_request(ctx, n)
    confirm = pb.ConfirmRequest(reservation_id=_reservation_of(request))
    return [("Reserve", request.SerializeToString()), ("Confirm", confirm.SerializeToString())]


def _reserve_release_unit(ctx: MixContext, n: int) -> list[tuple[str, bytes]]:
    """Reserve, then Release the same derived reservation: the stock comes back."""
    request = _reserve_request(ctx, n)
    release = pb.ReleaseRequest(reservation_id=_reservation_of(request), reason="bench")
    return [("Reserve", request.SerializeToString()), ("Release", release.SerializeToString())]


def _replay_unit(ctx: MixContext, n: int) -> list[tuple[str, bytes]]:
    """Unit n repeats seed n % REPLAY_KEYS: the same Reserve, byte for byte."""
    return _reserve_unit(ctx, n % REPLAY_KEYS)


# Committed Reserves per client process that the replay mix repeats: far
# more than the lanes in flight, so two lanes rarely send one key at once
# (the second would be refused REQUEST_IN_FLIGHT, not replayed).
REPLAY_KEYS = 1024
HOT_SKU_STOCK = 1000  # small enough for 200 lanes to sell out within a short run
HOT_SKU = "hot-sku"  # the one mix on one SKU
DEFAULT_SKUS = 1000  # the other mixes' units spread over this many SKUs (--skus)
MAX_SKUS = 10_000  # each is stocked before the run and counted after it
STOCK_CALLS_IN_FLIGHT = 64  # PutStock / GetStock calls in flight while stocking and counting
MAX_SKU_PROBLEMS = 10  # SKUs whose failed count is spelled out; the others are counted
REFUSED_FOR_STOCK = "FAILED_PRECONDITION/INSUFFICIENT_STOCK"

MIXES: dict[str, Mix] = {
    # One unit held per call, for 15 minutes (the server's default hold): the
    # stock must outlast every call a run can make.
    "reserve": Mix("reserve", stock=10**15, unit=_reserve_unit),
    # The same holds, each sold at once: two calls per unit, both counted.
    "reserve-confirm": Mix("reserve-confirm", stock=10**15, unit=_reserve_confirm_unit),
    # The same holds, each released at once: the stock ends where it started.
    "reserve-release": Mix("reserve-release", stock=10**15, unit=_reserve_release_unit),
    # Replays of stored outcomes: each client commits REPLAY_KEYS Reserves
    # before the start, then every measured call repeats one of them.
    "replay": Mix("replay", stock=10**15, unit=_replay_unit, seeds=REPLAY_KEYS, replays=True),
    # Contention: every lane Reserves then Confirms on the run's one SKU until
    # it sells out; after that, Reserves are refused and nothing is confirmed.
    HOT_SKU: Mix(HOT_SKU, stock=HOT_SKU_STOCK, unit=_reserve_confirm_unit,
                   answers=frozenset({"OK", REFUSED_FOR_STOCK})),
}


# -- options ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Backend:
    """A holdfast server to start and measure: its --store and --snapshot."""

    store: str  # SQLITE_IN_TMP, or a store URL
    snapshot: str


DEFAULT_BACKENDS = (Backend(SQLITE_IN_TMP, "memory://"),)


@dataclass(frozen=True, slots=True)
class Options:
    duration_s: float
    warmup_s: float
    in_flight: int
    clients: int
    mix: str
    target: str | None
    timeout_s: float
    json: bool
    backends: tuple[Backend, ...] = ()
    with_postgres_redis: bool = False
    store_pool: int = 2
    stock: int | None = None  # None: the mix's
    plot: Path | None = None
    workers: int | None = None  # None: the server's own default
    rounds: int = 1
    skus: int = DEFAULT_SKUS  # hot-sku has one, whatever this says
    traced: bool = False  # a traced twin of each started holdfast server

    @property
    def total(self) -> int:
        """The stock the run puts on each of its SKUs."""
        return MIXES[self.mix].stock if self.stock is None else self.stock

    @property
    def sku_count(self) -> int:
        """The SKUs the run's units spread over: --skus, but one for hot-sku."""
        return 1 if self.mix == HOT_SKU else self.skus


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="holdfast bench",
        description="Reserve throughput of holdfast against a bare grpc.aio echo server, in one run.",
    )
    parser.add_argument("--duration", type=float, default=10.0, help="measured seconds per target (default 10)")
    parser.add_argument("--warmup", type=float, default=2.0, help="unmeasured seconds before that (default 2)")
    parser.add_argument("--in-flight", type=int, default=64, help="calls in flight, over all clients (default 64)")
    parser.add_argument("--clients", type=int, default=1, help="client processes (default 1)")
    parser.add_argument("--mix", choices=sorted(MIXES), default="reserve", help="the workload (default reserve)")
    parser.add_argument(
        "--target",
        default=None,
        help="HOST:PORT of a running holdfast (loopback only) instead of starting one; the run stocks its own"
        " SKU there and leaves its holds to expire",
    )
    parser.add_argument(
        "--backend",
        action="append",
        default=[],
        metavar="STORE_URL[,SNAPSHOT_URL]",
        help="a holdfast server to start and measure (repeatable, one row each); the snapshot defaults to memory://"
        " and a store of just `sqlite` is a fresh SQLite file in the run's temp dir (default: one `sqlite,memory://`)",
    )
    parser.add_argument(
        "--with-postgres-redis",
        action="store_true",
        help="start a throwaway PostgreSQL cluster (as the postgres user when root; binaries in HOLDFAST_PG_BINDIR"
        f" or {PG_BINDIR}) and redis-server for the run, and add them as one more backend",
    )
    parser.add_argument("--store-pool", type=int, default=1, help="--store-pool of every started server (default 1)")
    parser.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="measure every target this many times, interleaved (holdfast rows, echo, holdfast rows, echo...);"
        " calls/s is each target's median round, so a noisy stretch of the machine weighs on every target"
        " alike (default 1)",
    )
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="--workers of every started server (default: not passed); more than 1 needs PostgreSQL + Redis"
        " backends, so with --with-postgres-redis and no --backend the default SQLite row is left out",
    )
    parser.add_argument(
        "--stock",
        type=int,
        default=None,
        help=f"total stock of each of the run's SKUs (default {HOT_SKU_STOCK} for hot-sku, 10^15 for the other"
        " mixes)",
    )
    parser.add_argument(
        "--skus",
        type=int,
        default=None,
        help=f"SKUs the units of reserve, reserve-confirm, reserve-release and replay spread over: unit n uses SKU"
        f" n %% N, each stocked before the run and counted after it (default {DEFAULT_SKUS}); hot-sku has one",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="FILE.png",
        help="also draw latency over time and a latency histogram per target into this PNG (needs matplotlib:"
        " pip install 'holdfast[plot]')",
    )
    parser.add_argument(
        "--traced",
        action="store_true",
        help="also measure each holdfast server the bench starts with tracing on (--otlp-endpoint), exporting to"
        " an OTLP/gRPC sink the bench runs: one more row each, labelled e.g. sqlite+memory+traces (needs"
        " pip install 'holdfast[otel]')",
    )
    parser.add_argument("--timeout-s", type=float, default=5.0, help="deadline of each call (default 5)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    return parser


def _backend(text: str) -> Backend:
    """STORE_URL[,SNAPSHOT_URL]; the split is at the last comma followed by a URL."""
    store, comma, snapshot = text.rpartition(",")
    if not comma or ("://" not in snapshot and snapshot != "memory:"):
        store, snapshot = text, "memory://"
    store, snapshot = store.strip(), snapshot.strip()
    path = store.removeprefix("sqlite:///")
    if store.startswith("sqlite:///") and not path.startswith("/"):
        store = f"sqlite:///{Path.cwd() / path}"  # the server runs in the temp dir
    return Backend(store, snapshot)


def _label(backend: Backend) -> str | None:
    """`store+snapshot` by scheme, e.g. `sqlite+memory`; None for an unknown scheme."""
    store = STORE_LABELS.get(backend.store.partition(":")[0])
    snapshot = SNAPSHOT_LABELS.get(backend.snapshot.partition(":")[0])
    return f"{store}+{snapshot}" if store and snapshot else None


def _options(argv: list[str] | None) -> Options:
    parser = _parser()
    args = parser.parse_args(argv)
    if not 0 < args.duration <= 3600:
        parser.error("--duration must be within (0, 3600] seconds")
    if not 0 <= args.warmup <= 600:
        parser.error("--warmup must be within [0, 600] seconds")
    if not 1 <= args.rounds <= 20:
        parser.error("--rounds must be within 1..20")
    if not 1 <= args.clients <= 64:
        parser.error("--clients must be within 1..64")
    if not args.clients <= args.in_flight <= 10_000:
        parser.error("--in-flight must be at least --clients and at most 10000")
    if not 0 < args.timeout_s <= 60:
        parser.error("--timeout-s must be within (0, 60] seconds")
    if args.target is not None and not _is_loopback(args.target):
        parser.error(f"--target {args.target!r} is not a loopback HOST:PORT (127.0.0.0/8, ::1 or localhost)")
    if args.target is not None and (args.backend or args.with_postgres_redis):
        parser.error("--target measures a running server; it does not go with --backend or --with-postgres-redis")
    if not 1 <= args.store_pool <= 64:
        parser.error("--store-pool must be within 1..64")
    if args.workers is not None and not 1 <= args.workers <= 64:
        parser.error("--workers must be within 1..64")
    if args.stock is not None and not 1 <= args.stock <= 10**15:
        parser.error("--stock must be within 1..10^15")
    if args.skus is not None and not 1 <= args.skus <= MAX_SKUS:
        parser.error(f"--skus must be within 1..{MAX_SKUS}")
    if args.skus not in (None, 1) and args.mix == HOT_SKU:
        parser.error("--skus: hot-sku is the contention case on one SKU")
    if args.plot is not None and not args.plot.resolve().parent.is_dir():
        parser.error(f"--plot {args.plot}: no such directory {args.plot.resolve().parent}")
    if args.traced and args.target is not None:
        parser.error("--traced measures a traced twin of each server the bench starts; a --target's tracing is its own")
    if args.traced and (missing := _tracing_unavailable()) is not None:
        parser.error(missing)
    backends = tuple(map(_backend, args.backend))
    # A server of several workers needs shared backends, so with --workers the
    # implicit SQLite row is left out when PostgreSQL + Redis will be measured.
    multi_process = args.workers is not None and args.workers > 1
    if args.target is None and not backends and not (multi_process and args.with_postgres_redis):
        backends = DEFAULT_BACKENDS
    for backend in backends:
        if _label(backend) is None:
            parser.error(
                f"--backend {backend.store},{backend.snapshot}: expected a sqlite:// or postgresql:// store"
                " and a memory://, redis:// or redis+cluster:// snapshot"
            )
    return Options(
        args.duration, args.warmup, args.in_flight, args.clients, args.mix, args.target, args.timeout_s, args.json,
        backends, args.with_postgres_redis, args.store_pool, args.stock,
        None if args.plot is None else args.plot.resolve(), args.workers, args.rounds,
        DEFAULT_SKUS if args.skus is None else args.skus, args.traced,
    )


def _tracing_unavailable() -> str | None:
    """None when --traced can run: the traced servers' OpenTelemetry
    (holdfast.tracing's packages) and the OTLP sink's opentelemetry-proto
    import; else what to install."""
    missing = tracing.available()
    if missing is not None:
        return f"--traced: the traced servers' {missing}"
    try:
        importlib.import_module(OTLP_TRACE_SERVICE)
    except ImportError:
        return "--traced: the OTLP sink needs OpenTelemetry (opentelemetry-proto missing): pip install 'holdfast[otel]'"
    return None


def _is_loopback(target: str) -> bool:
    host, _, port = target.rpartition(":")
    if not port.isdigit() or not 0 < int(port) < 65536:
        return False
    host = host.removeprefix("[").removesuffix("]")
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


# -- the run ------------------------------------------------------------------------


def main(argv: list[str] | None = None) -> int:
    """Runs the benchmark and prints a table (or JSON). Returns 0 done, 1 failed
    (a stock count that does not add up included, after the report), 130
    interrupted; a usage error exits 2 (argparse)."""
    options = _options(argv)
    try:
        if options.plot is not None:
            _plotting_available()  # before minutes of measuring, not after
        # Unwound in reverse: client and holdfast processes, then PostgreSQL, then the temp dir.
        with _sigterm_raises_interrupt(), contextlib.ExitStack() as stack:
            tmp = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="holdfast-bench-")))
            report = _run(options, tmp, stack)
    except BenchError as error:
        print(f"holdfast bench: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("holdfast bench: interrupted; child processes stopped", file=sys.stderr)
        return 130
    print(json.dumps(report, indent=2) if options.json else _table(report))
    return 0 if report["stock_ok"] else 1


@dataclass(frozen=True, slots=True)
class _Target:
    """A server to measure: where it listens, what the report says of it, and
    whose CPU is its own: `pids`, the server's processes (with their
    descendants: a --workers server's workers), and `deps`, the PostgreSQL
    postmaster and redis-server the bench started, when the target uses them.
    A traced twin (--traced) has SKUs of its own (`sku_base`) and the OTLP
    sink it exports to (`sink`)."""

    label: str
    address: str
    description: str
    server: subprocess.Popen | None  # a server the bench started, stopped after the stock count
    pids: tuple[int, ...] = ()
    deps: tuple[tuple[str, int], ...] = ()  # ("postgres", postmaster pid), ("redis", pid)
    sku_base: str | None = None  # its SKUs' base, when not the run's
    sink: tuple[subprocess.Popen, str] | None = None  # (process, HOST:PORT) of its OTLP sink
    traces_of: str | None = None  # the label of the untraced row it is the twin of


def _run(options: Options, tmp: Path, stack: contextlib.ExitStack) -> dict:
    run_id = uuid.uuid4().hex[:12]
    sku_base = f"bench-{run_id}"

    def skus_of(base: str | None) -> list[str]:
        return [_sku_id(base or sku_base, options.sku_count, i) for i in range(options.sku_count)]

    sku_ids = skus_of(None)
    lifetime_s = STARTUP_TIMEOUT_S + _worker_limit_s(options) + 60
    backends = list(options.backends)
    rows_planned = ((len(backends) + options.with_postgres_redis) * (1 + options.traced)
                    + options.with_postgres_redis + (options.target is not None))  # the hand-written row, --target's
    # The echo server and the OTLP sinks live through every round of every target.
    run_lifetime_s = lifetime_s + _worker_limit_s(options) * (rows_planned + 1) * options.rounds
    if options.with_postgres_redis:
        postgres = stack.enter_context(_postgres())
    children = stack.enter_context(Children())
    ours: Backend | None = None  # the PostgreSQL + Redis backend the bench started
    deps: tuple[tuple[str, int], ...] = ()
    if options.with_postgres_redis:
        redis_url, redis = _start_redis(children, tmp)
        ours = Backend(postgres.url, redis_url)
        backends.append(ours)
        deps = (*((("postgres", postgres.pid),) if postgres.pid else ()), ("redis", redis.pid))
    targets: list[_Target] = []
    notes: list[str] = []
    if options.target is not None:
        _put_stock(options.target, sku_ids, options.total, run_id, None)
        pids = _listening_pids(options.target)
        if not pids:
            notes.append(f"{HOLDFAST}: no process of this machine found listening on {options.target}: no server CPU")
        targets.append(_Target(HOLDFAST, options.target, f"{options.target} (--target)", None, pids))
    for label, backend in zip(_labels(backends), backends):
        for twin in (False, True)[: 1 + options.traced]:  # the backend, then (--traced) its traced twin
            store = f"sqlite:///{tmp.resolve()}/{len(targets)}.db" if backend.store == SQLITE_IN_TMP else backend.store
            argv = ["--store", store, "--snapshot", backend.snapshot, "--store-pool", str(options.store_pool)]
            if options.workers is not None:
                argv += ["--workers", str(options.workers)]
            name, base, sink = label, None, None
            if twin:
                # SKUs of its own (named as long as the run's): on a store it shares, each row's count stays its own.
                name, base = label + TRACED, f"bench-{uuid.uuid4().hex[:12]}"
                sink = _start_otlp_sink(children, tmp, f"{name}-{OTLP_SINK}", run_lifetime_s)
                argv += ["--otlp-endpoint", sink[1]]
            server, target = _start_holdfast(children, tmp, name, argv)
            _put_stock(target, skus_of(base), options.total, run_id, server)
            targets.append(_Target(name, target, f"{target} (started: {' '.join(argv)})", server, (server.pid,),
                                   deps if backend is ours else (), base, sink, label if twin else None))
    if ours is not None:
        handwritten = _handwritten_target(children, tmp, options, postgres, ours, deps, sku_ids, run_id)
        if isinstance(handwritten, str):
            notes.append(handwritten)
        elif handwritten is not None:
            targets.append(handwritten)
    echo_server, echo_address = _start_echo(children, tmp, run_lifetime_s)
    echo = _Target(ECHO, echo_address, "started (bare grpc.aio echo)", echo_server, (echo_server.pid,))
    results = {target.label: Result() for target in targets} | {ECHO: Result()}
    rates: dict[str, list[float]] = {label: [] for label in results}
    for round_ in range(options.rounds):
        units = run_id if round_ == 0 else f"{run_id}-{round_}"  # each round's requests are new ones
        for target in [*targets, echo]:
            result = _measure(children, tmp, target, options, units, target.sku_base or sku_base)
            results[target.label].absorb(result)
            rates[target.label].append(result.calls / options.duration_s)
    rows: dict[str, tuple[str, Result]] = {}
    traced: dict[str, dict] = {}
    for target in targets:
        results[target.label].stock = _account(target.address, skus_of(target.sku_base), options.total,
                                               results[target.label])
        if target.server is not None:
            _stop_server(children, target.server, target.label)
        if target.sink is not None:  # asked once its server has stopped: the last batch of spans is in
            sink, address = target.sink
            traced[target.label] = {"traces_of": target.traces_of, "otlp_sink": address,
                                    "spans_received": _spans_received(address)}
            _stop_server(children, sink, f"{target.label} OTLP sink")
        rows[target.label] = (target.description, results[target.label])
    _stop_server(children, echo_server, ECHO)
    if options.plot is not None:
        _plot(options, {label: result for label, (_, result) in rows.items()} | {ECHO: results[ECHO]})
    return _report(options, rows, results[ECHO], rates, notes, traced)


def _labels(backends: list[Backend]) -> list[str]:
    """One distinct label per backend: `sqlite+memory`, `postgres+redis`, `sqlite+memory#2`..."""
    seen: Counter = Counter()
    labels = []
    for backend in backends:
        label = _label(backend) or "holdfast"
        seen[label] += 1
        labels.append(label if seen[label] == 1 else f"{label}#{seen[label]}")
    return labels


# -- child processes ---------------------------------------------------------------------


class Children:
    """Every subprocess of the run; all are stopped on exit, whatever happened."""

    def __init__(self) -> None:
        self._procs: list[subprocess.Popen] = []

    def __enter__(self) -> Children:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.stop_all()

    def spawn(self, argv: list[str], log: Path, cwd: Path, pipes: bool = False) -> subprocess.Popen:
        # The children import holdfast as this process does (installed, or
        # the checkout's editable install): no path of the checkout is needed.
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                stdin=subprocess.PIPE if pipes else subprocess.DEVNULL,
                stdout=subprocess.PIPE if pipes else err,
                stderr=err,
            )
        self._procs.append(proc)
        return proc

    def stop(self, proc: subprocess.Popen) -> None:
        _terminate([proc])
        self._procs.remove(proc)

    def stop_all(self) -> None:
        procs, self._procs = self._procs, []
        _terminate(procs)


def _terminate(procs: list[subprocess.Popen]) -> None:
    """SIGTERM, a bounded grace, then SIGKILL; always reaps and closes pipes."""
    try:
        for proc in procs:
            if proc.poll() is None:
                proc.terminate()
        deadline = time.monotonic() + STOP_GRACE_S
        for proc in procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                proc.wait(max(0.0, deadline - time.monotonic()))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
            for pipe in (proc.stdin, proc.stdout):
                if pipe is not None:
                    with contextlib.suppress(OSError):
                        pipe.close()


@contextlib.contextmanager
def _sigterm_raises_interrupt() -> Iterator[None]:
    """SIGTERM would end the process without running cleanup; make it a Ctrl-C."""
    if sys.platform == "win32" or threading.current_thread() is not threading.main_thread():
        yield
        return

    def interrupt(signum, frame):
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _tail(path: Path, lines: int = 15) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError:
        return ""
    return "\n".join(text.splitlines()[-lines:])


def _start_server(children: Children, tmp: Path, name: str, argv_for: Callable[[int], list[str]]) -> tuple[subprocess.Popen, str]:
    """Starts a server on a free loopback port and waits until it accepts
    connections; retries on a new port if the process dies while starting."""
    for attempt in range(1, MAX_PORT_ATTEMPTS + 1):
        port = _free_port()
        log = tmp / f"{name}-{attempt}.log"
        proc = children.spawn(argv_for(port), log, cwd=tmp)
        target = f"127.0.0.1:{port}"
        if _wait_serving(proc, target):
            return proc, target
        children.stop(proc)
    raise BenchError(f"{name} server did not start; its log ends with:\n{_tail(log)}")


def _wait_serving(proc: subprocess.Popen, target: str) -> bool:
    """True once `target` accepts a gRPC connection; False if the process exits
    first. Bounded by STARTUP_TIMEOUT_S."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    with grpc.insecure_channel(target) as channel:
        ready = grpc.channel_ready_future(channel)
        try:
            while time.monotonic() < deadline:
                if proc.poll() is not None:
                    return False
                with contextlib.suppress(grpc.FutureTimeoutError):
                    ready.result(timeout=0.25)
                    return True
        finally:
            ready.cancel()
    raise BenchError(f"server at {target} not ready after {STARTUP_TIMEOUT_S:.0f} s")


def _start_holdfast(
    children: Children, tmp: Path, label: str, backend_argv: list[str]
) -> tuple[subprocess.Popen, str]:
    """`holdfast serve`, by way of `_serve`: the same server, its threads named
    for the CPU roles (_name_os_threads)."""
    def argv(port: int) -> list[str]:
        return [sys.executable, "-m", "holdfast.bench", "_serve", "--listen", f"127.0.0.1:{port}", *backend_argv]

    return _start_server(children, tmp, label, argv)


def _start_echo(children: Children, tmp: Path, lifetime_s: float) -> tuple[subprocess.Popen, str]:
    def argv(port: int) -> list[str]:
        return [sys.executable, "-m", "holdfast.bench", "_echo", f"127.0.0.1:{port}", str(lifetime_s)]

    return _start_server(children, tmp, ECHO, argv)


def _start_otlp_sink(children: Children, tmp: Path, name: str, lifetime_s: float) -> tuple[subprocess.Popen, str]:
    """The OTLP/gRPC receiver a traced twin exports to (_serve_otlp_sink)."""
    def argv(port: int) -> list[str]:
        return [sys.executable, "-m", "holdfast.bench", "_otlp_sink", f"127.0.0.1:{port}", str(lifetime_s)]

    return _start_server(children, tmp, name, argv)


def _spans_received(sink: str) -> int | None:
    """How many spans the OTLP sink at `sink` has received; None if it does not say."""
    try:
        with grpc.insecure_channel(sink) as channel:
            return int(channel.unary_unary(OTLP_SINK_SPANS)(b"", timeout=STOCK_READ_TIMEOUT_S))
    except (grpc.RpcError, ValueError):
        return None


@dataclass(frozen=True, slots=True)
class _Postgres:
    """The throwaway cluster: the URL of its `postgres` database, its
    postmaster's pid (None if unreadable) and a way to make it a new database."""

    url: str
    pid: int | None
    createdb: Callable[[str], str]  # database name -> its URL


@contextlib.contextmanager
def _postgres() -> Iterator[_Postgres]:
    """A throwaway PostgreSQL cluster on a free 127.0.0.1 port, as the postgres
    user (via runuser) when root; yields its URL and postmaster.
    Stopped (fast, then immediate) and its directory removed on the way out."""
    bindir = Path(os.environ.get("HOLDFAST_PG_BINDIR") or PG_BINDIR)
    if not (bindir / "initdb").exists():
        raise BenchError(f"no PostgreSQL binaries in {bindir} (set HOLDFAST_PG_BINDIR)")
    root = Path(tempfile.mkdtemp(prefix="holdfast-bench-pg-"))
    data, log = root / "data", root / "postgres.log"

    def pg(*args: object, timeout: float = STARTUP_TIMEOUT_S) -> subprocess.CompletedProcess:
        argv = [str(bindir / str(args[0])), *map(str, args[1:])]
        if os.geteuid() == 0:
            argv = ["runuser", "-u", "postgres", "--", *argv]
        return subprocess.run(argv, cwd=root, stdin=subprocess.DEVNULL, capture_output=True, text=True,
                              timeout=timeout, env={**os.environ, "LC_ALL": "C"})

    try:
        if os.geteuid() == 0:
            try:
                user = pwd.getpwnam("postgres")
            except KeyError:
                raise BenchError("running as root, but there is no postgres user to run PostgreSQL as") from None
            os.chown(root, user.pw_uid, user.pw_gid)
        done = pg("initdb", "-D", data, "-U", "postgres", "-A", "trust", "-E", "UTF8", "--locale=C", "--no-sync",
                  "--no-instructions", timeout=120)
        if done.returncode != 0:
            raise BenchError(f"initdb failed ({done.returncode}):\n{done.stdout}{done.stderr}")
        with open(data / "postgresql.conf", "a") as conf:  # appending keeps the owner
            conf.write("\nlisten_addresses = '127.0.0.1'\nunix_socket_directories = ''\n")
        for _attempt in range(MAX_PORT_ATTEMPTS):  # the port is free when probed, maybe not when bound
            port = _free_port()
            if pg("pg_ctl", "-D", data, "-l", log, "-o", f"-p {port}", "-w", "-t", int(STARTUP_TIMEOUT_S), "start",
                  timeout=STARTUP_TIMEOUT_S + 10).returncode == 0:
                break
        else:
            raise BenchError(f"PostgreSQL did not start; its log ends with:\n{_tail(log)}")

        def createdb(name: str) -> str:
            done = pg("createdb", "-h", "127.0.0.1", "-p", port, "-U", "postgres", name)
            if done.returncode != 0:
                raise BenchError(f"createdb {name} failed ({done.returncode}):\n{done.stdout}{done.stderr}")
            return f"postgresql://postgres@127.0.0.1:{port}/{name}"

        yield _Postgres(f"postgresql://postgres@127.0.0.1:{port}/postgres", _postmaster_pid(data), createdb)
    finally:
        if (data / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.TimeoutExpired):
                if pg("pg_ctl", "-D", data, "-m", "fast", "-w", "-t", 15, "stop", timeout=25).returncode != 0:
                    pg("pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def _postmaster_pid(data: Path) -> int | None:
    """The first line of postmaster.pid; None if it cannot be read."""
    try:
        return int((data / "postmaster.pid").read_text().split("\n", 1)[0])
    except (OSError, ValueError):
        return None


def _start_redis(children: Children, tmp: Path) -> tuple[str, subprocess.Popen]:
    """redis-server on a free 127.0.0.1 port, nothing persisted, stopped with the
    other children; returns its URL (database 0) and process once it answers PING."""
    binary = shutil.which("redis-server")
    if binary is None:
        raise BenchError("redis-server not found on PATH")
    (tmp / "redis").mkdir(exist_ok=True)
    for attempt in range(1, MAX_PORT_ATTEMPTS + 1):
        port, log = _free_port(), tmp / f"redis-{attempt}.log"
        argv = [binary, "--bind", "127.0.0.1", "--port", str(port), "--save", "", "--appendonly", "no",
                "--dir", str(tmp / "redis"), "--daemonize", "no"]
        proc = children.spawn(argv, log, cwd=tmp)
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        while proc.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
                sock.sendall(b"PING\r\n")
                if sock.recv(16).startswith(b"+PONG"):
                    return f"redis://127.0.0.1:{port}/0", proc
            time.sleep(0.02)
        children.stop(proc)
    raise BenchError(f"redis-server did not start; its log ends with:\n{_tail(log)}")


def _handwritten_target(
    children: Children, tmp: Path, options: Options, postgres: _Postgres, ours: Backend,
    deps: tuple[tuple[str, int], ...], sku_ids: list[str], run_id: str,
) -> _Target | str | None:
    """The hand-written baseline server (`python -m holdfast.handwritten`), on
    a database of its own in the bench's PostgreSQL and Redis database 1 of
    the bench's redis-server, stocked like the holdfast rows. None if this
    holdfast has no such module; a note (str) if it cannot serve the mix or
    does not start."""
    if importlib.util.find_spec(HANDWRITTEN_MODULE) is None:
        return None
    if MIXES[options.mix].replays:
        return (f"{HANDWRITTEN}: not measured: the {options.mix} mix needs the {REPLAYED} trailer, which only holdfast"
                " sends")
    database = postgres.createdb(f"{HANDWRITTEN}_{run_id}")
    redis = ours.snapshot.rpartition("/")[0] + f"/{HANDWRITTEN_REDIS_DB}"
    backend_argv = ["--postgres", database, "--redis", redis]

    def argv(port: int) -> list[str]:
        return [sys.executable, "-m", "holdfast.bench", "_module", HANDWRITTEN_MODULE, "--listen", f"127.0.0.1:{port}",
                *backend_argv]

    try:
        server, target = _start_server(children, tmp, HANDWRITTEN, argv)
    except BenchError as error:
        return f"{HANDWRITTEN}: not measured: {error}"
    _put_stock(target, sku_ids, options.total, run_id, server)
    description = f"{target} (started: python -m {HANDWRITTEN_MODULE} {' '.join(backend_argv)})"
    return _Target(HANDWRITTEN, target, description, server, (server.pid,), deps)


def _stop_server(children: Children, proc: subprocess.Popen, name: str) -> None:
    """Stops a server we started; one that is already gone died mid-measurement
    and its numbers are not worth reporting."""
    if proc.poll() is not None:
        raise BenchError(f"the {name} server exited (code {proc.returncode}) during the measurement")
    children.stop(proc)


def _put_stock(target: str, sku_ids: list[str], total: int, run_id: str, server: subprocess.Popen | None) -> None:
    """Stocks the run's SKUs, `total` each: the first until the server answers
    (it may still be starting), then the others STOCK_CALLS_IN_FLIGHT at a
    time. PutStock is idempotent under (sku_id, request_id), so retrying is safe."""
    requests = [pb.PutStockRequest(sku_id=sku_id, total=total, request_id=f"bench-{run_id}") for sku_id in sku_ids]
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    with grpc.insecure_channel(target) as channel:
        put = channel.unary_unary(INVENTORY_PREFIX + "PutStock", request_serializer=pb.PutStockRequest.SerializeToString)
        for _attempt in range(100):
            try:
                put(requests[0], timeout=2.0, wait_for_ready=True)
                break
            except grpc.RpcError as error:
                last = f"{error.code().name}: {error.details()}"
            if time.monotonic() >= deadline or (server is not None and server.poll() is not None):
                raise BenchError(f"could not stock {sku_ids[0]} at {target}: {last}")
            time.sleep(0.2)
        else:
            raise BenchError(f"could not stock {sku_ids[0]} at {target}: {last}")
        _call_many(put, requests[1:], lambda i: f"stock {sku_ids[i + 1]} at {target}")


def _call_many(call: grpc.UnaryUnaryMultiCallable, requests: list, what: Callable[[int], str]) -> list:
    """Every request's reply, in order, STOCK_CALLS_IN_FLIGHT in flight; a call
    that fails is sent again (the stock calls are safe to repeat), at most
    SETTLE_ATTEMPTS times, each within STOCK_READ_TIMEOUT_S."""
    replies: list = [None] * len(requests)
    waiting = list(range(len(requests) - 1, -1, -1))  # popped from the end: first request first
    tries: Counter = Counter()
    running: dict[int, grpc.Future] = {}
    try:
        while waiting or running:
            while waiting and len(running) < STOCK_CALLS_IN_FLIGHT:
                i = waiting.pop()
                tries[i] += 1
                running[i] = call.future(requests[i], timeout=STOCK_READ_TIMEOUT_S, wait_for_ready=True)
            i = next(iter(running))  # the oldest
            future = running.pop(i)
            try:
                replies[i] = future.result()
            except grpc.RpcError as error:
                if tries[i] >= SETTLE_ATTEMPTS:
                    raise BenchError(f"could not {what(i)}: {error.code().name}: {error.details()}") from None
                waiting.append(i)
    finally:
        for future in running.values():
            future.cancel()
    return replies


# -- measuring one target -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """One client process's share of a measurement (passed as JSON in argv)."""

    kind: str
    target: str
    mix: str
    run_id: str
    client: int
    sku_id: str
    timestamp_ms: int
    in_flight: int
    warmup_s: float
    duration_s: float
    timeout_s: float
    out: str
    samples: int = 0  # (time, latency) points kept for --plot, at most
    skus: int = 1  # unit n uses SKU n % skus (sku_id is then their prefix)


@dataclass(slots=True)
class Result:
    """What one target did (merged over client processes): the measured
    window's calls, latencies and outcomes; and, for the stock count, every
    call made in the run (`calls_made`), what each that can move stock
    answered (`ledger`, "Method OUTCOME"; `sku_ledgers`, the same per SKU
    index) and how many never got a definite answer (`unsettled`); and the
    CPU its processes used in the measured window (`cpu`, None when a round
    could not be sampled)."""

    calls: int = 0
    latencies_us: list[int] = field(default_factory=list)
    outcomes: Counter = field(default_factory=Counter)
    warmup_outcomes: Counter = field(default_factory=Counter)
    calls_made: int = 0
    ledger: Counter = field(default_factory=Counter)
    unsettled: int = 0
    samples: list[tuple[float, int]] = field(default_factory=list)  # (s since the start, latency µs)
    stock: dict | None = None  # the stock count, for a holdfast target
    sku_ledgers: dict[int, Counter] = field(default_factory=dict)
    cpu: Cpu | None = None
    measured: int = 0  # rounds absorbed

    def absorb(self, other: Result) -> None:
        """Adds another measurement of the same target (a later round)."""
        self.calls += other.calls
        self.latencies_us.extend(other.latencies_us)
        self.outcomes.update(other.outcomes)
        self.warmup_outcomes.update(other.warmup_outcomes)
        self.calls_made += other.calls_made
        self.ledger.update(other.ledger)
        self.unsettled += other.unsettled
        self.samples.extend(other.samples)
        for sku, ledger in other.sku_ledgers.items():
            self.sku_ledgers.setdefault(sku, Counter()).update(ledger)
        # CPU per call is over every round's window, or none: a round without it would skew the rest.
        self.cpu = None if self.measured and self.cpu is None else Cpu.sum(self.cpu, other.cpu)
        self.measured += 1

    def merge(self, part: dict) -> None:
        self.calls += part["calls"]
        self.latencies_us.extend(part["latencies_us"])
        self.outcomes.update(part["outcomes"])
        self.warmup_outcomes.update(part["warmup_outcomes"])
        self.calls_made += part["calls_made"]
        self.ledger.update(part["ledger"])
        self.unsettled += part["unsettled"]
        self.samples.extend(map(tuple, part["samples"]))
        for sku, ledger in part["sku_ledgers"].items():
            self.sku_ledgers.setdefault(int(sku), Counter()).update(ledger)


def _measure(children: Children, tmp: Path, target: _Target, options: Options, run_id: str, sku_id: str) -> Result:
    """Starts the client processes, starts them together, samples the CPU of
    every process involved as the measured window opens and closes, collects
    the clients' results."""
    kind = target.label
    timestamp_ms = time.time_ns() // 1_000_000
    samples = PLOT_POINTS // options.clients if options.plot is not None else 0
    workers = []
    for client, lanes in enumerate(_split(options.in_flight, options.clients)):
        spec = WorkerSpec(
            kind, target.address, options.mix, run_id, client, sku_id, timestamp_ms, lanes,
            options.warmup_s, options.duration_s, options.timeout_s, str(tmp / f"{kind}-client-{client}.json"),
            samples, options.sku_count,
        )
        argv = [sys.executable, "-m", "holdfast.bench", "_worker", json.dumps(asdict(spec))]
        workers.append((spec, children.spawn(argv, tmp / f"{kind}-client-{client}.log", cwd=tmp, pipes=True)))
    for spec, proc in workers:
        _await_ready(proc, Path(spec.out).with_suffix(".log"))
    start_at = time.time() + 0.05
    # The clients turn start_at into monotonic time the same way (one clock for every process).
    opens_at = time.monotonic() + (start_at - time.time()) + options.warmup_s
    watch = _Watch(target.pids, target.deps, tuple(proc.pid for _, proc in workers))
    window = _CpuWindow(watch, opens_at, opens_at + options.duration_s)
    window.start()
    try:
        for _, proc in workers:
            proc.stdin.write(f"{start_at!r}\n".encode())
            proc.stdin.close()
        if sys.stderr.isatty():
            _show_progress(kind, [proc for _, proc in workers], start_at, options)
        result = Result()
        for spec, proc in workers:
            result.merge(_collect(children, proc, spec, options))
        result.cpu = window.result()
    finally:
        window.stop()
    return result


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _await_ready(proc: subprocess.Popen, log: Path) -> None:
    """Waits (bounded) for the worker's `ready` line: connected (and seeded),
    about to wait for the start."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([proc.stdout], [], [], left)
        if readable:
            line = proc.stdout.readline()
            if line.strip() == b"ready":
                return
            raise BenchError(f"client process failed to connect; its log ends with:\n{_tail(log)}")
    raise BenchError(f"client process not ready after {STARTUP_TIMEOUT_S:.0f} s")


def _show_progress(kind: str, procs: list[subprocess.Popen], start_at: float, options: Options) -> None:
    """A one-line bar on stderr (a terminal's) until the client processes are
    done or their time is up; erased afterwards, so the report stands alone."""
    span_s = options.warmup_s + options.duration_s
    deadline = time.monotonic() + _worker_limit_s(options)
    line = ""
    try:
        while any(proc.poll() is None for proc in procs) and time.monotonic() < deadline:
            elapsed_s = max(0.0, time.time() - start_at)
            phase = "warm-up" if elapsed_s < options.warmup_s else "measuring" if elapsed_s < span_s else "finishing"
            filled = round(PROGRESS_WIDTH * min(1.0, elapsed_s / span_s))
            line = (f"\r{kind} [{'#' * filled}{'.' * (PROGRESS_WIDTH - filled)}]"
                    f" {min(elapsed_s, span_s):5.1f}/{span_s:g} s {phase}")
            sys.stderr.write(line)
            sys.stderr.flush()
            time.sleep(PROGRESS_EVERY_S)
    finally:
        sys.stderr.write("\r" + " " * len(line) + "\r")
        sys.stderr.flush()


def _worker_limit_s(options: Options) -> float:
    """How long client processes may take from the start: the run, the last
    units' calls, settling lost answers, and slack for a slow machine."""
    return STARTUP_TIMEOUT_S + options.warmup_s + options.duration_s + 2 * options.timeout_s + _settle_budget_s(options.timeout_s)


def _collect(children: Children, proc: subprocess.Popen, spec: WorkerSpec, options: Options) -> dict:
    limit = _worker_limit_s(options)
    try:
        code = proc.wait(limit)
    except subprocess.TimeoutExpired:
        raise BenchError(f"client process still running after {limit:.0f} s") from None
    log = Path(spec.out).with_suffix(".log")
    if code != 0:
        raise BenchError(f"client process exited with {code}; its log ends with:\n{_tail(log)}")
    children.stop(proc)  # reaps and closes its pipes
    return json.loads(Path(spec.out).read_text())


# -- CPU per call ------------------------------------------------------------------------------

CLK_TCK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100  # the unit of /proc's utime and stime
ROLES = ("loop", "store", "grpc", "other")
STORE_THREADS = ("holdfast-store", "holdfast-memory")  # comm keeps 15 bytes: holdfast-store-0 is holdfast-store-
# Other threads of holdfast's; default executors; OpenTelemetry's span exporter (OtelBatchSpanRecordProcessor).
OTHER_THREADS = ("holdfast-", "asyncio_", "uvloop_", "OtelBatch")
PR_SET_NAME = 15  # <linux/prctl.h>
COMM_BYTES = 15


@dataclass(slots=True)
class Cpu:
    """CPU used over measured windows, in clock ticks: `ticks` per process
    group (server, client, postgres, redis: whichever were watched) and per
    server thread role (ROLES); `threads` counts the server's threads per
    role (the most any window saw); `window_s` is the windows' total length."""

    ticks: dict[str, int]
    threads: dict[str, int]
    window_s: float

    @staticmethod
    def sum(a: Cpu | None, b: Cpu | None) -> Cpu | None:
        """Two rounds' CPU; None if the later one has none, the later one if it is the first."""
        if a is None or b is None:
            return b if a is None else None
        return Cpu(
            {key: a.ticks[key] + b.ticks[key] for key in a.ticks if key in b.ticks},
            {role: max(a.threads.get(role, 0), b.threads.get(role, 0)) for role in {*a.threads, *b.threads}},
            a.window_s + b.window_s,
        )


@dataclass(frozen=True, slots=True)
class _Watch:
    """The processes whose CPU a measurement samples: the server's (roots whose
    descendants are its too), its dependencies' and the client processes."""

    server: tuple[int, ...]
    deps: tuple[tuple[str, int], ...]
    clients: tuple[int, ...]


@dataclass(frozen=True, slots=True)
class _CpuSample:
    at: float  # monotonic
    groups: dict[str, int]  # group -> ticks of its processes and their reaped children
    threads: dict[tuple[int, int], tuple[str, int]]  # (pid, tid) of the server's -> (role, ticks)


class _CpuWindow(threading.Thread):
    """Samples the watched processes' CPU at `opens_at` and `closes_at`
    (monotonic): the instants the clients open and close their measured window.
    A thread of the bench's own process, so that the bench's main thread can
    draw progress and wait for the clients meanwhile."""

    def __init__(self, watch: _Watch, opens_at: float, closes_at: float) -> None:
        super().__init__(name="holdfast-bench-cpu", daemon=True)
        self.watch, self.opens_at, self.closes_at = watch, opens_at, closes_at
        self.cancelled = threading.Event()
        self.samples: list[_CpuSample] = []

    def run(self) -> None:
        try:
            for at in (self.opens_at, self.closes_at):
                if self.cancelled.wait(max(0.0, at - time.monotonic())):
                    return
                self.samples.append(_cpu_sample(self.watch))
        except (OSError, ValueError, IndexError):
            self.samples.clear()  # /proc unreadable: no CPU for this window rather than a wrong one

    def result(self) -> Cpu | None:
        """Once the window has closed (bounded wait): the CPU used in it, or None."""
        self.join(max(0.0, self.closes_at - time.monotonic()) + STARTUP_TIMEOUT_S)
        return _cpu_between(*self.samples) if len(self.samples) == 2 and not self.is_alive() else None

    def stop(self) -> None:
        self.cancelled.set()
        self.join(STARTUP_TIMEOUT_S)


def _stat(path: str) -> tuple[str, list[bytes]] | None:
    """A /proc stat file: the comm, and the fields after it (state first); None
    once the process or thread is gone. The comm is the one /proc/.../comm
    shows, read in the same read as the times."""
    try:
        with open(path, "rb") as file:
            data = file.read()
    except OSError:
        return None
    head, _, tail = data.rpartition(b")")
    return head.partition(b"(")[2].decode(errors="replace"), tail.split()


def _ticks(fields: list[bytes], children: bool) -> int:
    """utime + stime (fields 14 and 15 of stat); with `children`, also the
    cutime + cstime of reaped children (16 and 17)."""
    return sum(int(value) for value in fields[11:15 if children else 13])


def _processes() -> dict[int, tuple[int, int]]:
    """Every process: pid -> (ppid, ticks of it and of its reaped children)."""
    processes = {}
    for name in os.listdir("/proc"):
        if name.isdigit() and (stat := _stat(f"/proc/{name}/stat")) is not None:
            processes[int(name)] = (int(stat[1][1]), _ticks(stat[1], children=True))
    return processes


def _tree(processes: dict[int, tuple[int, int]], roots: tuple[int, ...]) -> list[int]:
    """The roots that still run, and all their descendants."""
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in processes.items():
        children.setdefault(ppid, []).append(pid)
    found, todo = [], [pid for pid in roots if pid in processes]
    while todo:
        pid = todo.pop()
        found.append(pid)
        todo.extend(children.get(pid, ()))
    return found


def _role(pid: int, tid: int, comm: str, main_comm: str) -> str:
    """A server thread's role by its name: `loop` the main thread (which runs
    the event loop), `store` the store's threads, `other` holdfast's other
    threads, default executors', OpenTelemetry's span exporter and unnamed
    ones (the main thread's name: a server whose threads the bench did not
    name), `grpc` the rest, gRPC's own (its C-core threads and its aio
    poller, `Thread-N (_poll_wrapper)`)."""
    if tid == pid:
        return "loop"
    if comm.startswith(STORE_THREADS):
        return "store"
    if comm.startswith(OTHER_THREADS) or comm == main_comm:
        return "other"
    return "grpc"


def _cpu_sample(watch: _Watch) -> _CpuSample:
    """The ticks of every watched group, and of each server thread, now. A
    group's ticks include its reaped children's, so a PostgreSQL backend that
    exits within the window still counts (in its postmaster's cutime)."""
    processes = _processes()
    groups = {name: sum(processes[pid][1] for pid in _tree(processes, (root,))) for name, root in watch.deps}
    groups["client"] = sum(processes[pid][1] for pid in watch.clients if pid in processes)
    threads: dict[tuple[int, int], tuple[str, int]] = {}
    if watch.server:
        server = _tree(processes, watch.server)
        groups["server"] = sum(processes[pid][1] for pid in server)
        for pid in server:
            main = _stat(f"/proc/{pid}/stat")
            try:
                tids = os.listdir(f"/proc/{pid}/task")
            except OSError:
                continue
            for tid in map(int, tids):
                if (stat := _stat(f"/proc/{pid}/task/{tid}/stat")) is not None:
                    role = _role(pid, tid, stat[0], main[0] if main else "")
                    threads[(pid, tid)] = (role, _ticks(stat[1], children=False))
    return _CpuSample(time.monotonic(), groups, threads)


def _cpu_between(first: _CpuSample, last: _CpuSample) -> Cpu:
    """The ticks used between two samples. A thread that started in between
    counts from zero; one that ended in between is missing from its role but
    not from the server's total (a process's times keep its dead threads'),
    so the roles add up to at most the total."""
    ticks = {name: last.groups[name] - first.groups[name] for name in last.groups if name in first.groups}
    threads = dict.fromkeys(ROLES, 0)
    if "server" in ticks:
        ticks |= dict.fromkeys(ROLES, 0)
        for key, (role, used) in last.threads.items():
            ticks[role] += used - first.threads.get(key, (role, 0))[1]
            threads[role] += 1
    return Cpu(ticks, threads, last.at - first.at)


def _listening_pids(target: str) -> tuple[int, ...]:
    """The processes with a socket listening on the target's port (a --target
    the bench did not start); () if none can be seen (another user's)."""
    port = int(target.rpartition(":")[2])
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        with contextlib.suppress(OSError), open(table) as lines:
            for line in itertools.islice(lines, 1, None):
                fields = line.split()
                if len(fields) > 9 and fields[3] == "0A" and int(fields[1].rpartition(":")[2], 16) == port:
                    inodes.add(f"socket:[{fields[9]}]")
    pids = []
    for name in os.listdir("/proc") if inodes else ():
        if name.isdigit():
            with contextlib.suppress(OSError):
                if any(os.readlink(f"/proc/{name}/fd/{fd}") in inodes for fd in os.listdir(f"/proc/{name}/fd")):
                    pids.append(int(name))
    return tuple(pids)


def _name_os_threads() -> None:
    """From now on every Python thread of this process starts by giving itself
    its Python name as its OS name (what /proc/PID/task/TID/comm shows, 15
    bytes), as Python 3.14 does of itself: the server's threads are told apart
    by these names. Linux only; anything else leaves the threads as they are."""
    if not sys.platform.startswith("linux") or sys.version_info >= (3, 14):
        return
    bootstrap = getattr(threading.Thread, "_bootstrap_inner", None)
    try:
        import ctypes

        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError, ImportError):
        return
    if bootstrap is None:
        return

    def named(thread: threading.Thread) -> None:
        prctl(PR_SET_NAME, thread.name.encode(errors="replace")[:COMM_BYTES], 0, 0, 0)
        bootstrap(thread)

    threading.Thread._bootstrap_inner = named  # type: ignore[attr-defined]


# -- the stock count ---------------------------------------------------------------------------


def _get_stocks(target: str, sku_ids: list[str]) -> list[pb.StockReply]:
    """GetStock of every SKU, STOCK_CALLS_IN_FLIGHT at a time."""
    with grpc.insecure_channel(target) as channel:
        get = channel.unary_unary(
            INVENTORY_PREFIX + "GetStock",
            request_serializer=pb.GetStockRequest.SerializeToString,
            response_deserializer=pb.StockReply.FromString,
        )
        requests = [pb.GetStockRequest(sku_id=sku_id) for sku_id in sku_ids]
        return _call_many(get, requests, lambda i: f"read the stock of {sku_ids[i]} at {target}")


def _account(target: str, sku_ids: list[str], total: int, result: Result) -> dict:
    """The server's stock of each of the run's SKUs against every call the run
    made on it, warm-up and the calls finishing after the window included."""
    return _sku_counts(sku_ids, total, _get_stocks(target, sku_ids), result)


def _sku_counts(sku_ids: list[str], put: int, stocks: list[pb.StockReply], result: Result) -> dict:
    """Each SKU counted on its own (_stock_count with its ledger), then summed:
    `total`, `available`, `held`, `sold`, `ok_confirms` and `expected_held` are
    over every SKU, `ok` only if each SKU's count holds; `problems` names the
    first MAX_SKU_PROBLEMS SKUs whose count does not. `reserves_per_sku`: the
    fewest and most Reserves answered OK on one SKU, to show the spread."""
    counts = [
        _stock_count(put, stock.total, stock.available, stock.held, stock.sold, result.sku_ledgers.get(i, Counter()), 0)
        for i, stock in enumerate(stocks)
    ]
    problems = []
    if result.unsettled:
        problems.append(f"{result.unsettled} calls never got a definite answer, so the count cannot be exact")
    if strays := sorted(set(result.sku_ledgers) - set(range(len(sku_ids)))):
        problems.append(f"calls counted on {len(strays)} SKUs the run did not stock")  # the bench's own bug
    failed = [(sku_ids[i], count) for i, count in enumerate(counts) if not count["ok"]]
    for sku_id, count in failed[:MAX_SKU_PROBLEMS]:
        problems.extend(problem if len(sku_ids) == 1 else f"{sku_id}: {problem}" for problem in count["problems"])
    if len(failed) > MAX_SKU_PROBLEMS:
        problems.append(f"and {len(failed) - MAX_SKU_PROBLEMS} more SKUs whose count does not add up")
    reserves = [result.sku_ledgers.get(i, Counter())["Reserve OK"] for i in range(len(sku_ids))]
    summed = {key: sum(count[key] for count in counts)
              for key in ("total", "available", "held", "sold", "ok_confirms", "expected_held")}
    return summed | {
        "unsettled": result.unsettled,
        "oversold": any(count["oversold"] for count in counts),
        "ok": not problems,
        "problems": problems,
        "skus": len(sku_ids),
        "skus_touched": sum(1 for i in range(len(sku_ids)) if result.sku_ledgers.get(i)),
        "skus_failed": len(failed),
        "reserves_per_sku": {"min": min(reserves), "max": max(reserves)},
        "ledger": dict(sorted(result.ledger.items())),
    }


def _stock_count(
    put: int, total: int, available: int, held: int, sold: int, ledger: Counter, unsettled: int
) -> dict:
    """A Confirm answered OK sold one unit; a Reserve answered OK holds one
    until it is confirmed or released. So the server must say: sold == OK
    Confirms, held == OK Reserves - OK Confirms - OK Releases, and
    available + held + sold == total, with nothing sold past the total."""
    expected_sold = ledger["Confirm OK"]
    expected_held = ledger["Reserve OK"] - ledger["Confirm OK"] - ledger["Release OK"]
    problems = []
    if unsettled:
        problems.append(f"{unsettled} calls never got a definite answer, so the count cannot be exact")
    if total != put:
        problems.append(f"total {total} is not the {put} put")
    if available + held + sold != total:
        problems.append(f"available {available} + held {held} + sold {sold} != total {total}")
    if sold > total or available < 0:
        problems.append(f"oversold: {sold} sold of {total}, {available} available")
    if sold != expected_sold:
        problems.append(f"sold {sold} != {expected_sold} Confirms answered OK")
    if held != expected_held:
        problems.append(f"held {held} != {expected_held} Reserves answered OK and not confirmed or released")
    return {
        "total": total, "available": available, "held": held, "sold": sold,
        "ok_confirms": expected_sold, "expected_held": expected_held, "unsettled": unsettled,
        "oversold": sold > total or available < 0, "ok": not problems, "problems": problems,
    }


# -- the report -------------------------------------------------------------------------------


def _percentile(ordered: list[int], q: float) -> float | None:
    """Nearest rank, in milliseconds."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] / 1000.0


def _summary(result: Result, target: str, rates: list[float]) -> dict:
    """`calls_per_s` is the median round's; latency percentiles are over every round's calls."""
    ordered = sorted(result.latencies_us)
    row = {
        "address": target,
        "calls": result.calls,
        "calls_per_s": statistics.median(rates),
        "rounds_calls_per_s": rates,
        "latency_ms": {name: _percentile(ordered, q) for name, q in PERCENTILES},
        "outcomes": dict(result.outcomes.most_common()),
        "warmup_outcomes": dict(result.warmup_outcomes.most_common()),
        "contract_violations": _contract_violations(result.outcomes + result.warmup_outcomes),
        "calls_made": result.calls_made,
        "cpu": _cpu_summary(result),
    }
    if result.stock is not None:
        row["stock"] = result.stock
    return row


def _cpu_summary(result: Result) -> dict:
    """µs of CPU per measured call, over the measured windows: the server's
    (every thread of its processes) and by thread role, the client
    processes', and PostgreSQL's and Redis's when the bench started them for
    this target; `service_us_per_call` is the server's and theirs together.
    `ratio` (set by _report) is the server's over echo's. None where unknown."""
    cpu = result.cpu
    ticks = {} if cpu is None or not result.calls else cpu.ticks

    def per_call(key: str) -> float | None:
        return round(ticks[key] * 1e6 / CLK_TCK / result.calls, 2) if key in ticks else None

    summary = {
        "server_us_per_call": per_call("server"),
        "roles_us_per_call": {role: per_call(role) for role in ROLES},
        "client_us_per_call": per_call("client"),
    }
    for dep in ("postgres", "redis"):
        if dep in ticks:
            summary[f"{dep}_us_per_call"] = per_call(dep)
    if "server" in ticks:
        summary["service_us_per_call"] = round(sum(summary[f"{key}_us_per_call"] for key in ("server", "postgres", "redis")
                                                   if key in ticks), 2)
    summary["ratio"] = None
    summary["threads"] = None if cpu is None else cpu.threads
    summary["window_s"] = None if cpu is None else round(cpu.window_s, 3)
    summary["tick_us_per_call"] = round(1e6 / CLK_TCK / result.calls, 2) if result.calls else None
    return summary


def _tracing_cost(traced: dict, untraced: dict) -> dict:
    """A traced row against its untraced twin: calls/s over the twin's, and
    the server's CPU per call added and over the twin's. None where unknown."""
    rate = untraced["calls_per_s"]
    cpu, untraced_cpu = traced["cpu"]["server_us_per_call"], untraced["cpu"]["server_us_per_call"]
    known = cpu is not None and untraced_cpu is not None
    return {
        "calls_per_s_ratio": round(traced["calls_per_s"] / rate, 3) if rate else None,
        "server_us_per_call": round(cpu - untraced_cpu, 2) if known else None,
        "cpu_ratio": round(cpu / untraced_cpu, 3) if known and untraced_cpu else None,
    }


def _contract_violations(outcomes: Counter) -> int:
    """Answers whose ErrorInfo reason is CONTRACT_VIOLATION (outcome `STATUS/REASON`):
    the bench itself sent a request its contract refuses."""
    return sum(n for outcome, n in outcomes.items() if outcome.partition("/")[2] == "CONTRACT_VIOLATION")


def _report(
    options: Options, rows: dict[str, tuple[str, Result]], echo: Result, rates: dict[str, list[float]],
    notes: list[str] | None = None, traced: dict[str, dict] | None = None,
) -> dict:
    """`targets`: a row per holdfast (in measuring order), then `echo`; each row's
    `ratio` is its calls/s over echo's, also collected in `ratios`, and its
    `cpu.ratio` its server's CPU per call over echo's, collected in
    `cpu_ratios`. A holdfast row's `stock` is its stock count; `stock_ok` is
    whether every one held. `notes`: targets left out or measured in part.
    `traced`: per traced twin, `traces_of` (its untraced row), `otlp_sink`
    and `spans_received`; such a row has `traced: true` (every other row
    `traced: false`), those, and `tracing_cost` against its untraced row."""
    targets = {label: _summary(result, address, rates[label]) for label, (address, result) in rows.items()}
    targets[ECHO] = _summary(echo, "started (bare grpc.aio echo)", rates[ECHO])
    echo_rate = targets[ECHO]["calls_per_s"]
    echo_cpu = targets[ECHO]["cpu"]["server_us_per_call"]
    for row in targets.values():
        row["ratio"] = row["calls_per_s"] / echo_rate if echo_rate else None
        cpu = row["cpu"]["server_us_per_call"]
        row["cpu"]["ratio"] = round(cpu / echo_cpu, 3) if cpu is not None and echo_cpu else None
    for label, row in targets.items():
        row["traced"] = label in (traced or {})
        if row["traced"]:
            row |= traced[label]
            untraced = targets.get(row["traces_of"])
            if untraced is not None:
                row["tracing_cost"] = _tracing_cost(row, untraced)
    return {
        "mix": options.mix,
        "in_flight": options.in_flight,
        "clients": options.clients,
        "warmup_s": options.warmup_s,
        "duration_s": options.duration_s,
        "rounds": options.rounds,
        "store_pool": options.store_pool,
        "workers": options.workers,
        "loop": event_loop.name(),  # every server and client of the run, echo included
        "stock": options.total,
        "skus": options.sku_count,
        "clock_ticks_per_s": CLK_TCK,
        "targets": targets,
        "ratios": {label: targets[label]["ratio"] for label in rows},
        "cpu_ratios": {label: targets[label]["cpu"]["ratio"] for label in rows},
        "stock_ok": all(result.stock is None or result.stock["ok"] for _, result in rows.values()),
        "plot": None if options.plot is None else str(options.plot),
        "notes": list(notes or ()),
    }


def _table(report: dict) -> str:
    skus = report.get("skus", 1)
    header = (
        f"holdfast bench: mix {report['mix']}{f' over {skus} SKUs' if skus > 1 else ''}, {report['in_flight']} in"
        f" flight from {report['clients']} client"
        f" process{'es' if report['clients'] > 1 else ''}, {report['duration_s']:g} s after {report['warmup_s']:g} s warm-up,"
        f" every process on {report['loop']}"
        + (f"; {report['rounds']} interleaved rounds, calls/s the median round's" if report["rounds"] > 1 else "")
    )
    width = max(10, *(len(name) + 2 for name in report["targets"]))
    columns = (f"{'target':<{width}}{'calls/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'p99.9 ms':>10}{'/ echo':>9}"
               f"{'cpu µs':>9}{'/ echo':>8}{'contract!':>11}  outcomes")
    lines = [header, columns]
    for name, row in report["targets"].items():
        latency = "".join(_ms(row["latency_ms"][p]) for p, _ in PERCENTILES)
        ratio = f"{'-':>9}" if row["ratio"] is None else f"{row['ratio']:>9.3f}"
        cpu = row["cpu"]
        cpu_columns = _number(cpu["server_us_per_call"], 9, 1) + _number(cpu["ratio"], 8, 2)
        outcomes = ", ".join(f"{key} {n}" for key, n in row["outcomes"].items()) or "-"
        lines.append(f"{name:<{width}}{row['calls_per_s']:>10.1f}{latency}{ratio}{cpu_columns}"
                     f"{row['contract_violations']:>11}  {outcomes}")
    lines.append("  (cpu µs: the server's CPU per measured call, all its threads; contract!: answers, warm-up"
                 " included, whose reason is CONTRACT_VIOLATION)")
    lines.extend(_cpu_table(report, width))
    for name, row in report["targets"].items():
        lines.append(f"  {name}: {row['address']}")
        if "stock" in row:
            lines.append(f"  {name}: {_stock_line(row['stock'])}")
        if row.get("traced"):
            lines.append(f"  {name}: {_traces_line(row)}")
    for note in report.get("notes", ()):
        lines.append(f"  note: {note}")
    if report["plot"]:
        lines.append(f"  plot: {report['plot']}")
    return "\n".join(lines)


def _cpu_table(report: dict, width: int) -> list[str]:
    """CPU per measured call, µs: the server's by thread role, then the
    client processes', PostgreSQL's and Redis's (when the bench started them)."""
    deps = [dep for dep in ("postgres", "redis")
            if any(f"{dep}_us_per_call" in row["cpu"] for row in report["targets"].values())]
    lines = [f"{'cpu µs/call':<{width}}{'server':>9}" + "".join(f"{role:>8}" for role in ROLES)
             + f"{'client':>9}" + "".join(f"{dep:>10}" for dep in deps) + (f"{'service':>10}" if deps else "")]
    for name, row in report["targets"].items():
        cpu = row["cpu"]
        line = f"{name:<{width}}{_number(cpu['server_us_per_call'], 9, 1)}"
        line += "".join(_number(cpu["roles_us_per_call"][role], 8, 1) for role in ROLES)
        line += _number(cpu["client_us_per_call"], 9, 1)
        line += "".join(_number(cpu.get(f"{dep}_us_per_call"), 10, 1) for dep in deps)
        if deps:
            line += _number(cpu.get("service_us_per_call") if any(f"{dep}_us_per_call" in cpu for dep in deps)
                            else None, 10, 1)
        lines.append(line)
    ticks = sorted(tick for row in report["targets"].values() if (tick := row["cpu"]["tick_us_per_call"]))
    resolution = f"; a clock tick is {ticks[0]:g}..{ticks[-1]:g} µs per call" if ticks else ""
    lines.append("  (server threads by role: loop the main thread, store the store's, grpc gRPC's own, other the"
                 f" rest{'; service: server + ' + ' + '.join(deps) if deps else ''}{resolution})")
    return lines


def _number(value: float | None, width: int, digits: int) -> str:
    return f"{'-':>{width}}" if value is None else f"{value:>{width}.{digits}f}"


def _stock_line(stock: dict) -> str:
    if not stock["ok"]:
        return "stock: FAILED: " + "; ".join(stock["problems"])
    skus = stock.get("skus", 1)
    spread = ""
    if skus > 1:
        reserves = stock["reserves_per_sku"]
        spread = (f"; {skus} SKUs, each counted, {stock['skus_touched']} touched by"
                  f" {reserves['min']}..{reserves['max']} OK Reserves each")
    return (f"stock: {stock['sold']} sold of {stock['total']}, no oversell ({stock['held']} held,"
            f" {stock['available']} available; sold == {stock['ok_confirms']} OK Confirms{spread})")


def _traces_line(row: dict) -> str:
    spans = row["spans_received"]
    if spans is None:
        sent = f"traces: the OTLP sink at {row['otlp_sink']} did not say how many spans it received"
    elif spans == 0:
        sent = f"traces: NONE received by the OTLP sink at {row['otlp_sink']}: this row was not traced"
    else:
        sent = (f"traces: {spans} spans received by the OTLP sink at {row['otlp_sink']}"
                f" ({row['calls_made']} calls made by the clients, besides stocking and counting)")
    cost = row.get("tracing_cost")
    if cost is None:
        return sent
    parts = []
    if cost["server_us_per_call"] is not None:
        ratio = "" if cost["cpu_ratio"] is None else f", {cost['cpu_ratio']:.2f}×"
        parts.append(f"server CPU {cost['server_us_per_call']:+.1f} µs per call{ratio}")
    if cost["calls_per_s_ratio"] is not None:
        parts.append(f"calls/s {cost['calls_per_s_ratio']:.2f}×")
    return f"{sent}; against {row['traces_of']}: {', '.join(parts)}" if parts else sent


def _ms(value: float | None) -> str:
    return f"{'-':>10}" if value is None else f"{value:>10.2f}"


# -- the picture (--plot) --------------------------------------------------------------------


def _plotting_available() -> None:
    try:
        import matplotlib  # noqa: F401
        from matplotlib.backends.backend_agg import FigureCanvasAgg  # noqa: F401
    except ImportError:
        raise BenchError("--plot needs matplotlib, which is not installed: pip install 'holdfast[plot]'") from None


def _plot(options: Options, results: dict[str, Result]) -> None:
    """A row per target: latency over time (a bounded sample of every call,
    warm-up shaded) and a histogram of the measured window's latencies.
    Drawn on an Agg canvas of its own, so no display and no pyplot state."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(12, 3.2 * len(results)), layout="constrained")
    FigureCanvasAgg(figure)
    figure.suptitle(f"holdfast bench: mix {options.mix}, {options.in_flight} in flight")
    axes = figure.subplots(len(results), 2, squeeze=False)
    for (over_time, histogram), (label, result) in zip(axes, results.items()):
        _plot_over_time(over_time, label, result, options)
        _plot_histogram(histogram, label, result)
    try:
        figure.savefig(options.plot, format="png", dpi=100)
    except OSError as error:
        raise BenchError(f"could not write the plot {options.plot}: {error}") from None


def _plot_over_time(ax, label: str, result: Result, options: Options) -> None:
    ax.axvspan(0, options.warmup_s, color="0.9", label="warm-up")
    if result.samples:
        seconds, latencies_us = zip(*sorted(result.samples))
        ax.scatter(seconds, [us / 1000 for us in latencies_us], s=2, alpha=0.4, linewidths=0)
        ax.set_yscale("log")
        _label_ticks_125(ax.yaxis)
    ax.set_xlim(0, options.warmup_s + options.duration_s)
    ax.set_title(f"{label}: latency over time ({len(result.samples)} calls sampled)", fontsize=10)
    ax.set_xlabel("s since the start")
    ax.set_ylabel("latency, ms")
    ax.legend(loc="upper right", fontsize=8)


def _plot_histogram(ax, label: str, result: Result) -> None:
    latencies_ms = [us / 1000 for us in result.latencies_us if us > 0]
    if latencies_ms:
        low, high = min(latencies_ms), max(latencies_ms)
        bins = [low * (high / low) ** (i / HISTOGRAM_BINS) for i in range(HISTOGRAM_BINS + 1)] if high > low else 10
        ax.hist(latencies_ms, bins=bins, color="tab:blue")
        ax.set_xscale("log")
        _label_ticks_125(ax.xaxis)
    ordered = sorted(result.latencies_us)
    for (name, q), style in zip(PERCENTILES, ("-", "--", ":")):
        value = _percentile(ordered, q)
        if value:
            ax.axvline(value, color="black", linestyle=style, linewidth=1, label=f"{name} {value:.2f} ms")
    if ordered:
        ax.legend(loc="upper left", fontsize=8)
    ax.set_title(f"{label}: latency of the {result.calls} measured calls", fontsize=10)
    ax.set_xlabel("latency, ms")
    ax.set_ylabel("calls")


def _label_ticks_125(axis) -> None:
    """On a log axis, labels 1, 2, 5, 10, 20, 50...: readable over one decade or many."""
    from matplotlib.ticker import FuncFormatter

    def label(value: float, _position: object) -> str:
        mantissa = f"{value:.0e}"[0]
        return f"{value:g}" if mantissa in "125" else ""

    axis.set_major_formatter(FuncFormatter(label))
    axis.set_minor_formatter(FuncFormatter(label))


# -- child: the load generator ------------------------------------------------------------------


@dataclass(slots=True)
class _Tally:
    start: float
    measure_from: float
    end: float
    sample_cap: int = 0
    calls: int = 0
    latencies_us: list[int] = field(default_factory=list)
    outcomes: Counter = field(default_factory=Counter)
    warmup_outcomes: Counter = field(default_factory=Counter)
    ledger: Counter = field(default_factory=Counter)
    sku_ledgers: dict[int, Counter] = field(default_factory=dict)  # the ledger per SKU index
    lost: list[tuple[str, bytes, int]] = field(default_factory=list)  # calls to settle (and SKU), at most MAX_LOST
    unsettled: int = 0
    samples: list[tuple[float, int]] = field(default_factory=list)
    sampled_from: int = 0
    rng: random.Random = field(default_factory=random.Random)

    def add(self, started: float, done: float, outcome: str) -> None:
        if done > self.end:
            return  # calls that complete after the window are not measured (their effects are in the ledger)
        latency_us = round((done - started) * 1e6)
        if done < self.measure_from:
            self.warmup_outcomes[outcome] += 1
        else:
            self.calls += 1
            self.latencies_us.append(latency_us)
            self.outcomes[outcome] += 1
        if self.sample_cap:
            self._sample((round(done - self.start, 4), latency_us))

    def _sample(self, point: tuple[float, int]) -> None:
        """Reservoir sampling: every call so far equally likely to be kept, at most sample_cap."""
        self.sampled_from += 1
        if len(self.samples) < self.sample_cap:
            self.samples.append(point)
        elif (slot := self.rng.randrange(self.sampled_from)) < self.sample_cap:
            self.samples[slot] = point

    def record(self, method: str, body: bytes, outcome: str, sku: int) -> None:
        """Into the ledger; a call whose answer was lost is kept to settle later."""
        if _definite(outcome):
            self.count(f"{method} {outcome}", sku)
        elif len(self.lost) < MAX_LOST:
            self.lost.append((method, body, sku))
        else:
            self.unsettled += 1

    def count(self, entry: str, sku: int) -> None:
        self.ledger[entry] += 1
        ledger = self.sku_ledgers.get(sku)
        if ledger is None:
            ledger = self.sku_ledgers[sku] = Counter()
        ledger[entry] += 1


def _definite(outcome: str) -> bool:
    """OK, or an answer of the server's (with an ErrorInfo reason) that says
    what the call did. Without a reason (a client-side deadline, a broken
    connection) the call may or may not have moved stock; nor does an
    undetermined reason (DEPENDENCY_UNAVAILABLE: the store failed under the
    call, which may have committed); REQUEST_IN_FLIGHT means it still runs."""
    reason = outcome.partition("/")[2]
    return outcome == "OK" or reason not in {"", "MISMATCHED_STATUS_DETAILS", "REQUEST_IN_FLIGHT", *UNDETERMINED_REASONS}


def _outcome_of(error: grpc.aio.AioRpcError) -> str:
    """`STATUS` or `STATUS/REASON` (holdfast's ErrorInfo reason)."""
    from google.rpc import error_details_pb2
    from grpc_status import rpc_status

    code = error.code().name
    try:
        status = rpc_status.from_call(error)
    except ValueError:
        return f"{code}/MISMATCHED_STATUS_DETAILS"
    for detail in status.details if status else ():
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            return f"{code}/{info.reason}"
    return code


class _Client:
    """One worker's channel, its multicallables, and the replies to replay."""

    def __init__(self, spec: WorkerSpec, channel: grpc.aio.Channel) -> None:
        self.spec = spec
        self.channel = channel
        self.mix = MIXES[spec.mix]
        self.ctx = MixContext(spec.run_id, spec.client, spec.sku_id, spec.timestamp_ms, spec.skus)
        self.replies: dict[bytes, bytes] = {}  # a seed's request bytes -> its first reply's
        self.sent = 0  # every call, whatever its phase: they all may move stock
        self._calls: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {}

    async def send(
        self, method: str, body: bytes, read_replayed: bool = False, timeout_s: float | None = None
    ) -> tuple[str, bytes | None, bool]:
        """(outcome, reply bytes, holdfast-replayed); the trailers are read only when asked."""
        path = ECHO_PATH if self.spec.kind == ECHO else INVENTORY_PREFIX + method
        multicallable = self._calls.get(path) or self._calls.setdefault(path, self.channel.unary_unary(path))
        self.sent += 1
        try:
            call = multicallable(body, timeout=timeout_s or self.spec.timeout_s)
            reply = await call
            replayed = read_replayed and (await call.trailing_metadata()).get(REPLAYED) == "true"
            return "OK", reply, replayed
        except grpc.aio.AioRpcError as error:
            return _outcome_of(error), None, False

    async def send_replay(self, method: str, body: bytes) -> str:
        """OK only if the answer is the seed's bytes, and (from holdfast) says it is a replay."""
        outcome, reply, replayed = await self.send(method, body, read_replayed=self.spec.kind != ECHO)
        if outcome != "OK":
            return outcome
        if reply != self.replies[body]:
            return "OK/REPLY_CHANGED"
        return "OK" if replayed or self.spec.kind == ECHO else "OK/NOT_REPLAYED"

    async def settle(self, method: str, body: bytes, deadline: float) -> tuple[str, bytes | None]:
        """Sends a call again, same bytes, until its answer is definite: the
        key makes a repeat safe, and its answer is the first call's stored
        outcome, or the call itself if the first never ran."""
        for _attempt in range(SETTLE_ATTEMPTS):
            outcome, reply, _ = await self.send(method, body, timeout_s=_settle_timeout_s(self.spec.timeout_s))
            if _definite(outcome) or time.monotonic() >= deadline:
                break
            await asyncio.sleep(SETTLE_DELAY_S)
        return outcome, reply


async def _seed(client: _Client, tally: _Tally) -> None:
    """Commits the mix's seed units (before the start, unmeasured) and keeps
    their replies: the reference a replay must match. Counts them in the ledger."""
    deadline = time.monotonic() + _settle_budget_s(client.spec.timeout_s)
    for n in range(client.mix.seeds):
        for method, body in client.mix.unit(client.ctx, n):
            outcome, reply, _ = await client.send(method, body)
            if not _definite(outcome):
                outcome, reply = await client.settle(method, body, deadline)
            if outcome != "OK" or reply is None:
                raise BenchError(f"seed {method} {n} answered {outcome}")
            tally.count(f"{method} {outcome}", n % client.ctx.skus)
            client.replies[body] = reply


async def _lane(client: _Client, units: Iterator[int], tally: _Tally) -> None:
    """Keeps one call in flight until the window ends (or the call cap is hit)."""
    replays, skus = client.mix.replays, client.ctx.skus
    for n in units:
        if n >= MAX_CALLS_PER_CLIENT or time.monotonic() >= tally.end:
            return
        sku = n % skus  # the unit's SKU (a replay's is its seed's, but a replay records nothing)
        for method, body in client.mix.unit(client.ctx, n):
            started = time.monotonic()
            if replays:
                outcome = await client.send_replay(method, body)
            else:
                outcome = (await client.send(method, body))[0]
            tally.add(started, time.monotonic(), outcome)
            if not replays:  # a replay repeats a seed: it moves no stock
                tally.record(method, body, outcome, sku)
            if outcome != "OK":
                break  # e.g. a Reserve refused for stock: there is nothing to confirm


async def _settle_lost(client: _Client, tally: _Tally) -> None:
    """Settles every call whose answer was lost, a few at a time, so the
    ledger knows what each did; bounded by _settle_budget_s."""
    deadline = time.monotonic() + _settle_budget_s(client.spec.timeout_s)
    gate = asyncio.Semaphore(client.spec.in_flight)

    async def settle_one(method: str, body: bytes, sku: int) -> None:
        async with gate:
            outcome, _ = await client.settle(method, body, deadline)
        if _definite(outcome):
            tally.count(f"{method} {outcome}", sku)
        else:
            tally.unsettled += 1

    lost, tally.lost = tally.lost, []
    await asyncio.gather(*(settle_one(method, body, sku) for method, body, sku in lost))


def _settle_timeout_s(timeout_s: float) -> float:
    return max(timeout_s, SETTLE_TIMEOUT_S)


def _settle_budget_s(timeout_s: float) -> float:
    return SETTLE_ATTEMPTS * (_settle_timeout_s(timeout_s) + SETTLE_DELAY_S)


async def _drive(spec: WorkerSpec) -> dict:
    async with grpc.aio.insecure_channel(spec.target) as channel:
        await asyncio.wait_for(channel.channel_ready(), STARTUP_TIMEOUT_S)
        client = _Client(spec, channel)
        seeded = _Tally(0.0, 0.0, 0.0)
        await _seed(client, seeded)
        print("ready", flush=True)
        start = await _start_time()
        tally = _Tally(start, start + spec.warmup_s, start + spec.warmup_s + spec.duration_s, spec.samples,
                       ledger=seeded.ledger, sku_ledgers=seeded.sku_ledgers, rng=random.Random(spec.client))
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        units = itertools.count()  # shared by the lanes: every unit number is used once
        await asyncio.gather(*(_lane(client, units, tally) for _ in range(spec.in_flight)))
        if spec.kind != ECHO:  # echo has no stock to count
            await _settle_lost(client, tally)
    return {
        "calls": tally.calls,
        "latencies_us": tally.latencies_us,
        "outcomes": tally.outcomes,
        "warmup_outcomes": tally.warmup_outcomes,
        "calls_made": client.sent,
        "ledger": tally.ledger,
        "sku_ledgers": tally.sku_ledgers,
        "unsettled": tally.unsettled,
        "samples": tally.samples,
    }


async def _start_time() -> float:
    """Reads the shared start instant (wall clock) from stdin; as monotonic time."""
    loop = asyncio.get_running_loop()
    reader = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(reader), sys.stdin)
    line = await asyncio.wait_for(reader.readline(), STARTUP_TIMEOUT_S)
    if not line:
        raise BenchError("the bench process went away before the start")
    return time.monotonic() + (float(line) - time.time())


def _worker(spec_json: str) -> int:
    spec = WorkerSpec(**json.loads(spec_json))
    try:
        result = event_loop.run(_drive(spec))
    except KeyboardInterrupt:
        return 130
    except (BenchError, TimeoutError, grpc.RpcError) as error:
        print(f"holdfast bench client: {type(error).__name__}: {error}", file=sys.stderr)
        return 1
    Path(spec.out).write_text(json.dumps(result))
    return 0


# -- child: the echo baseline --------------------------------------------------------------------


async def _echo(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
    return request


async def _serve_echo(listen: str, lifetime_s: float) -> None:
    """A bare grpc.aio server: one generic unary handler returning the request
    bytes. Stops on SIGTERM/SIGINT, or after `lifetime_s` in case nobody asks."""
    server = grpc.aio.server()
    handler = grpc.method_handlers_generic_handler(ECHO_SERVICE, {"Echo": grpc.unary_unary_rpc_method_handler(_echo)})
    server.add_generic_rpc_handlers((handler,))
    await _serve_until_stopped(server, listen, lifetime_s)


# -- child: the OTLP sink (--traced) -------------------------------------------------------------


async def _serve_otlp_sink(listen: str, lifetime_s: float) -> None:
    """A real OTLP/gRPC trace receiver that keeps nothing: the collector's
    TraceService.Export counts the spans of each request and answers an empty
    ExportTraceServiceResponse, and OTLP_SINK_SPANS answers the count so far
    (decimal, as bytes). A grpc.aio server like the echo server; stops on
    SIGTERM/SIGINT, or after `lifetime_s` in case nobody asks."""
    from opentelemetry.proto.collector.trace.v1 import trace_service_pb2, trace_service_pb2_grpc

    received = 0

    class Sink(trace_service_pb2_grpc.TraceServiceServicer):
        async def Export(self, request, context):  # noqa: N802 (the proto's name)
            nonlocal received
            received += sum(len(scope.spans) for resource in request.resource_spans for scope in resource.scope_spans)
            return trace_service_pb2.ExportTraceServiceResponse()

    async def spans(request: bytes, context: grpc.aio.ServicerContext) -> bytes:
        return str(received).encode()

    server = grpc.aio.server()
    trace_service_pb2_grpc.add_TraceServiceServicer_to_server(Sink(), server)
    handler = grpc.method_handlers_generic_handler(
        OTLP_SINK_SERVICE, {"Spans": grpc.unary_unary_rpc_method_handler(spans)}
    )
    server.add_generic_rpc_handlers((handler,))
    await _serve_until_stopped(server, listen, lifetime_s)


async def _serve_until_stopped(server: grpc.aio.Server, listen: str, lifetime_s: float) -> None:
    """Serves on `listen` until SIGTERM/SIGINT, or for `lifetime_s` at most."""
    if server.add_insecure_port(listen) == 0:
        raise OSError(f"cannot listen on {listen}")
    await server.start()
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stopping.wait(), lifetime_s)
    await server.stop(0)


def _child(argv: list[str]) -> int:
    if len(argv) == 2 and argv[0] == "_worker":
        return _worker(argv[1])
    if len(argv) == 3 and argv[0] == "_echo":
        _name_os_threads()
        event_loop.run(_serve_echo(argv[1], float(argv[2])))
        return 0
    if len(argv) == 3 and argv[0] == "_otlp_sink":
        _name_os_threads()
        event_loop.run(_serve_otlp_sink(argv[1], float(argv[2])))
        return 0
    if argv[:1] == ["_serve"]:  # `holdfast serve ARGS`, its threads named
        from holdfast.cli import main as holdfast

        _name_os_threads()
        return holdfast(["serve", *argv[1:]])
    if len(argv) >= 2 and argv[0] == "_module":  # `python -m MODULE ARGS`, its threads named
        _name_os_threads()
        sys.argv = [argv[1], *argv[2:]]
        runpy.run_module(argv[1], run_name="__main__", alter_sys=True)
        return 0
    return main(argv)


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
elif __name__ == "__mp_main__":
    # A worker process that a `_serve` server with --workers spawned: spawn
    # imports the parent's main module under this name before anything else,
    # so the worker's threads are named as its parent's are.
    _name_os_threads()
