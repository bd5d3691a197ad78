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
  them as one more backend.

Safety: only loopback targets; every loop is bounded in calls and in time;
every subprocess (PostgreSQL and Redis included) and every temporary
directory are cleaned up on error, on Ctrl-C and on SIGTERM.

Mixes (`--mix`): a mix turns a unit number into the calls of one unit of work
(method name and request bytes, sent in order on one lane; a unit stops at its
first answer that is not OK, since a refused Reserve leaves nothing to
confirm). A unit's later calls name its reservation without reading a reply,
because the reservation id is derived from the Reserve key
(`holdfast.apps.inventory.reservation_id` of `holdfast.gateway.idempotency_key`).

* `reserve`: one Reserve of one unit. Answers: OK.
* `reserve-confirm`: Reserve, then Confirm it. Answers: OK.
* `reserve-release`: Reserve, then Release it; the stock ends where it began.
  Answers: OK.
* `replay`: before the start, each client process commits REPLAY_KEYS (16)
  Reserves and keeps their reply bytes; every measured unit then sends one of
  those same requests again (unit n repeats seed n % 16), so every measured
  answer is a replay of a stored outcome. Answers: OK, and a reply counts as
  OK only if its bytes are the seed's and (holdfast) its trailers say
  `holdfast-replayed: true`; otherwise `OK/REPLY_CHANGED` or `OK/NOT_REPLAYED`.
  Reading trailers costs the client a little; the echo row pays for the same
  byte comparison, not for the trailer.
* `hot-sku`: contention. Every lane Reserves then Confirms on the run's one
  SKU, stocked with only HOT_SKU_STOCK (1000, or `--stock`) units, so 200
  lanes sell it out within a short run. Answers: OK, or
  FAILED_PRECONDITION/INSUFFICIENT_STOCK once it is gone.

The stock count. After each holdfast target's run, the bench reads the SKU
(GetStock) and checks it against every call the run made, warm-up and the
calls finishing after the window included (each client process keeps a
ledger of them): sold == Confirms answered OK, held == Reserves answered OK
and neither confirmed nor released, available + held + sold == total, and
nothing sold past the total. A call whose answer was lost (a client-side
deadline, a broken connection: no holdfast reason) may or may not have moved
stock, so after the window it is sent again with the same bytes until it gets
a definite answer (its key makes that safe: the answer is the stored outcome
or the call itself). A count that does not add up is a `stock: FAILED` line
and exit code 1. The count runs for every mix, not only hot-sku; it assumes
no hold expires during the run (the servers the bench starts hold for 15
minutes; a --target that holds for less would fail it).

Report: per target, calls/s, p50/p99/p99.9 latency, outcomes by
`STATUS/REASON`, the answers whose ErrorInfo reason is CONTRACT_VIOLATION
(warm-up included: any is the bench's own bug), the ratio to echo, and the
stock count; `--json` has the same fields. `--plot FILE.png` (matplotlib,
`pip install 'holdfast[plot]'`) draws per target latency over time, from a
reservoir sample of at most PLOT_POINTS calls, and a histogram of the
measured latencies. On a terminal a progress line is drawn on stderr.
`--workers N` is passed on to every holdfast server the bench starts.

The child processes run this module as `python -m holdfast.bench _worker SPEC`
and `python -m holdfast.bench _echo HOST:PORT LIFETIME_S`.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ipaddress
import itertools
import json
import math
import os
import pwd
import random
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
from holdfast.call import idempotency_key
from holdfast.gateway import REPLAYED
from holdfast.apps.inventory import reservation_id
from holdfast.metrics import UNDETERMINED_REASONS

INVENTORY_PREFIX = "/holdfast.inventory.v1.InventoryService/"
ECHO_SERVICE = "holdfast.bench.v1.Echo"
ECHO_PATH = f"/{ECHO_SERVICE}/Echo"
HOLDFAST, ECHO = "holdfast", "echo"

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
    sku_id: str
    timestamp_ms: int


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
    return pb.ReserveRequest(order_id=order_id, sku_id=ctx.sku_id, quantity=1, timestamp_ms=ctx.timestamp_ms)


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


REPLAY_KEYS = 16  # committed Reserves per client process that the replay mix repeats
HOT_SKU_STOCK = 1000  # small enough for 200 lanes to sell out within a short run
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
    "hot-sku": Mix("hot-sku", stock=HOT_SKU_STOCK, unit=_reserve_confirm_unit,
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

    @property
    def total(self) -> int:
        """The stock the run puts on its SKU."""
        return MIXES[self.mix].stock if self.stock is None else self.stock


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
        help=f"total stock of the run's SKU (default {HOT_SKU_STOCK} for hot-sku, 10^15 for the other mixes)",
    )
    parser.add_argument(
        "--plot",
        type=Path,
        default=None,
        metavar="FILE.png",
        help="also draw latency over time and a latency histogram per target into this PNG (needs matplotlib:"
        " pip install 'holdfast[plot]')",
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
    if args.plot is not None and not args.plot.resolve().parent.is_dir():
        parser.error(f"--plot {args.plot}: no such directory {args.plot.resolve().parent}")
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
    )


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


def _run(options: Options, tmp: Path, stack: contextlib.ExitStack) -> dict:
    run_id = uuid.uuid4().hex[:12]
    sku_id = f"bench-{run_id}"
    lifetime_s = STARTUP_TIMEOUT_S + _worker_limit_s(options) + 60
    backends = list(options.backends)
    if options.with_postgres_redis:
        store = stack.enter_context(_postgres())
    children = stack.enter_context(Children())
    if options.with_postgres_redis:
        backends.append(Backend(store, _start_redis(children, tmp)))
    targets: list[tuple[str, str, str, subprocess.Popen | None]] = []  # label, address, description, server
    if options.target is not None:
        _put_stock(options.target, sku_id, options.total, run_id, None)
        targets.append((HOLDFAST, options.target, f"{options.target} (--target)", None))
    for label, backend in zip(_labels(backends), backends):
        store = f"sqlite:///{tmp.resolve()}/{len(targets)}.db" if backend.store == SQLITE_IN_TMP else backend.store
        argv = ["--store", store, "--snapshot", backend.snapshot, "--store-pool", str(options.store_pool)]
        if options.workers is not None:
            argv += ["--workers", str(options.workers)]
        server, target = _start_holdfast(children, tmp, label, argv)
        _put_stock(target, sku_id, options.total, run_id, server)
        targets.append((label, target, f"{target} (started: {' '.join(argv)})", server))
    # The echo server lives through every round of every target.
    echo_lifetime_s = lifetime_s + _worker_limit_s(options) * (len(targets) + 1) * options.rounds
    echo_server, echo_target = _start_echo(children, tmp, echo_lifetime_s)
    results = {label: Result() for label, *_ in targets} | {ECHO: Result()}
    rates: dict[str, list[float]] = {label: [] for label in results}
    for round_ in range(options.rounds):
        units = run_id if round_ == 0 else f"{run_id}-{round_}"  # each round's requests are new ones
        for label, address in [*((label, address) for label, address, *_ in targets), (ECHO, echo_target)]:
            result = _measure(children, tmp, label, address, options, units, sku_id)
            results[label].absorb(result)
            rates[label].append(result.calls / options.duration_s)
    rows: dict[str, tuple[str, Result]] = {}
    for label, address, description, server in targets:
        results[label].stock = _account(address, sku_id, options.total, results[label])
        if server is not None:
            _stop_server(children, server, label)
        rows[label] = (description, results[label])
    _stop_server(children, echo_server, ECHO)
    if options.plot is not None:
        _plot(options, {label: result for label, (_, result) in rows.items()} | {ECHO: results[ECHO]})
    return _report(options, rows, results[ECHO], rates)


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
    def argv(port: int) -> list[str]:
        return [sys.executable, "-m", "holdfast.cli", "serve", "--listen", f"127.0.0.1:{port}", *backend_argv]

    return _start_server(children, tmp, label, argv)


def _start_echo(children: Children, tmp: Path, lifetime_s: float) -> tuple[subprocess.Popen, str]:
    def argv(port: int) -> list[str]:
        return [sys.executable, "-m", "holdfast.bench", "_echo", f"127.0.0.1:{port}", str(lifetime_s)]

    return _start_server(children, tmp, ECHO, argv)


@contextlib.contextmanager
def _postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a free 127.0.0.1 port, as the postgres
    user (via runuser) when root; yields the URL of its `postgres` database.
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
        yield f"postgresql://postgres@127.0.0.1:{port}/postgres"
    finally:
        if (data / "postmaster.pid").exists():
            with contextlib.suppress(subprocess.TimeoutExpired):
                if pg("pg_ctl", "-D", data, "-m", "fast", "-w", "-t", 15, "stop", timeout=25).returncode != 0:
                    pg("pg_ctl", "-D", data, "-m", "immediate", "-w", "stop")
        shutil.rmtree(root, ignore_errors=True)


def _start_redis(children: Children, tmp: Path) -> str:
    """redis-server on a free 127.0.0.1 port, nothing persisted, stopped with the
    other children; returns its URL once it answers PING."""
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
                    return f"redis://127.0.0.1:{port}/0"
            time.sleep(0.02)
        children.stop(proc)
    raise BenchError(f"redis-server did not start; its log ends with:\n{_tail(log)}")


def _stop_server(children: Children, proc: subprocess.Popen, name: str) -> None:
    """Stops a server we started; one that is already gone died mid-measurement
    and its numbers are not worth reporting."""
    if proc.poll() is not None:
        raise BenchError(f"the {name} server exited (code {proc.returncode}) during the measurement")
    children.stop(proc)


def _put_stock(target: str, sku_id: str, total: int, run_id: str, server: subprocess.Popen | None) -> None:
    """Stocks the bench SKU. PutStock is idempotent under (sku_id, request_id),
    so retrying it while the server finishes starting is safe."""
    request = pb.PutStockRequest(sku_id=sku_id, total=total, request_id=f"bench-{run_id}")
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    with grpc.insecure_channel(target) as channel:
        put = channel.unary_unary(INVENTORY_PREFIX + "PutStock", request_serializer=pb.PutStockRequest.SerializeToString)
        for _attempt in range(100):
            try:
                put(request, timeout=2.0, wait_for_ready=True)
                return
            except grpc.RpcError as error:
                last = f"{error.code().name}: {error.details()}"
            if time.monotonic() >= deadline or (server is not None and server.poll() is not None):
                break
            time.sleep(0.2)
    raise BenchError(f"could not stock {sku_id} at {target}: {last}")


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


@dataclass(slots=True)
class Result:
    """What one target did (merged over client processes): the measured
    window's calls, latencies and outcomes; and, for the stock count, every
    call made in the run (`calls_made`), what each that can move stock
    answered (`ledger`, "Method OUTCOME") and how many never got a definite
    answer (`unsettled`)."""

    calls: int = 0
    latencies_us: list[int] = field(default_factory=list)
    outcomes: Counter = field(default_factory=Counter)
    warmup_outcomes: Counter = field(default_factory=Counter)
    calls_made: int = 0
    ledger: Counter = field(default_factory=Counter)
    unsettled: int = 0
    samples: list[tuple[float, int]] = field(default_factory=list)  # (s since the start, latency µs)
    stock: dict | None = None  # the stock count, for a holdfast target

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

    def merge(self, part: dict) -> None:
        self.calls += part["calls"]
        self.latencies_us.extend(part["latencies_us"])
        self.outcomes.update(part["outcomes"])
        self.warmup_outcomes.update(part["warmup_outcomes"])
        self.calls_made += part["calls_made"]
        self.ledger.update(part["ledger"])
        self.unsettled += part["unsettled"]
        self.samples.extend(map(tuple, part["samples"]))


def _measure(children: Children, tmp: Path, kind: str, target: str, options: Options, run_id: str, sku_id: str) -> Result:
    """Starts the client processes, starts them together, collects their results."""
    timestamp_ms = time.time_ns() // 1_000_000
    samples = PLOT_POINTS // options.clients if options.plot is not None else 0
    workers = []
    for client, lanes in enumerate(_split(options.in_flight, options.clients)):
        spec = WorkerSpec(
            kind, target, options.mix, run_id, client, sku_id, timestamp_ms, lanes,
            options.warmup_s, options.duration_s, options.timeout_s, str(tmp / f"{kind}-client-{client}.json"),
            samples,
        )
        argv = [sys.executable, "-m", "holdfast.bench", "_worker", json.dumps(asdict(spec))]
        workers.append((spec, children.spawn(argv, tmp / f"{kind}-client-{client}.log", cwd=tmp, pipes=True)))
    for spec, proc in workers:
        _await_ready(proc, Path(spec.out).with_suffix(".log"))
    start_at = time.time() + 0.05
    for _, proc in workers:
        proc.stdin.write(f"{start_at!r}\n".encode())
        proc.stdin.close()
    if sys.stderr.isatty():
        _show_progress(kind, [proc for _, proc in workers], start_at, options)
    result = Result()
    for spec, proc in workers:
        result.merge(_collect(children, proc, spec, options))
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


# -- the stock count ---------------------------------------------------------------------------


def _get_stock(target: str, sku_id: str) -> pb.StockReply:
    with grpc.insecure_channel(target) as channel:
        get = channel.unary_unary(
            INVENTORY_PREFIX + "GetStock",
            request_serializer=pb.GetStockRequest.SerializeToString,
            response_deserializer=pb.StockReply.FromString,
        )
        try:
            return get(pb.GetStockRequest(sku_id=sku_id), timeout=STOCK_READ_TIMEOUT_S, wait_for_ready=True)
        except grpc.RpcError as error:
            raise BenchError(f"could not read the stock of {sku_id} at {target}: {error.code().name}: {error.details()}") from None


def _account(target: str, sku_id: str, total: int, result: Result) -> dict:
    """The server's stock of the run's SKU against every call the run made,
    warm-up and the calls finishing after the window included."""
    stock = _get_stock(target, sku_id)
    count = _stock_count(total, stock.total, stock.available, stock.held, stock.sold, result.ledger, result.unsettled)
    return count | {"ledger": dict(sorted(result.ledger.items()))}


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
    }
    if result.stock is not None:
        row["stock"] = result.stock
    return row


def _contract_violations(outcomes: Counter) -> int:
    """Answers whose ErrorInfo reason is CONTRACT_VIOLATION (outcome `STATUS/REASON`):
    the bench itself sent a request its contract refuses."""
    return sum(n for outcome, n in outcomes.items() if outcome.partition("/")[2] == "CONTRACT_VIOLATION")


def _report(options: Options, rows: dict[str, tuple[str, Result]], echo: Result, rates: dict[str, list[float]]) -> dict:
    """`targets`: a row per holdfast (in measuring order), then `echo`; each row's
    `ratio` is its calls/s over echo's, also collected in `ratios`. A holdfast
    row's `stock` is its stock count; `stock_ok` is whether every one held."""
    targets = {label: _summary(result, address, rates[label]) for label, (address, result) in rows.items()}
    targets[ECHO] = _summary(echo, "started (bare grpc.aio echo)", rates[ECHO])
    echo_rate = targets[ECHO]["calls_per_s"]
    for row in targets.values():
        row["ratio"] = row["calls_per_s"] / echo_rate if echo_rate else None
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
        "targets": targets,
        "ratios": {label: targets[label]["ratio"] for label in rows},
        "stock_ok": all(result.stock is None or result.stock["ok"] for _, result in rows.values()),
        "plot": None if options.plot is None else str(options.plot),
    }


def _table(report: dict) -> str:
    header = (
        f"holdfast bench: mix {report['mix']}, {report['in_flight']} in flight from {report['clients']} client"
        f" process{'es' if report['clients'] > 1 else ''}, {report['duration_s']:g} s after {report['warmup_s']:g} s warm-up,"
        f" every process on {report['loop']}"
        + (f"; {report['rounds']} interleaved rounds, calls/s the median round's" if report["rounds"] > 1 else "")
    )
    width = max(10, *(len(name) + 2 for name in report["targets"]))
    columns = (f"{'target':<{width}}{'calls/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'p99.9 ms':>10}{'/ echo':>9}"
               f"{'contract!':>11}  outcomes")
    lines = [header, columns]
    for name, row in report["targets"].items():
        latency = "".join(_ms(row["latency_ms"][p]) for p, _ in PERCENTILES)
        ratio = f"{'-':>9}" if row["ratio"] is None else f"{row['ratio']:>9.3f}"
        outcomes = ", ".join(f"{key} {n}" for key, n in row["outcomes"].items()) or "-"
        lines.append(f"{name:<{width}}{row['calls_per_s']:>10.1f}{latency}{ratio}{row['contract_violations']:>11}  {outcomes}")
    lines.append("  (contract!: answers, warm-up included, whose reason is CONTRACT_VIOLATION)")
    for name, row in report["targets"].items():
        lines.append(f"  {name}: {row['address']}")
        if "stock" in row:
            lines.append(f"  {name}: {_stock_line(row['stock'])}")
    if report["plot"]:
        lines.append(f"  plot: {report['plot']}")
    return "\n".join(lines)


def _stock_line(stock: dict) -> str:
    if not stock["ok"]:
        return "stock: FAILED: " + "; ".join(stock["problems"])
    return (f"stock: {stock['sold']} sold of {stock['total']}, no oversell ({stock['held']} held,"
            f" {stock['available']} available; sold == {stock['ok_confirms']} OK Confirms)")


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
    lost: list[tuple[str, bytes]] = field(default_factory=list)  # calls to settle, at most MAX_LOST
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

    def record(self, method: str, body: bytes, outcome: str) -> None:
        """Into the ledger; a call whose answer was lost is kept to settle later."""
        if _definite(outcome):
            self.ledger[f"{method} {outcome}"] += 1
        elif len(self.lost) < MAX_LOST:
            self.lost.append((method, body))
        else:
            self.unsettled += 1


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
        self.ctx = MixContext(spec.run_id, spec.client, spec.sku_id, spec.timestamp_ms)
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


async def _seed(client: _Client) -> Counter:
    """Commits the mix's seed units (before the start, unmeasured) and keeps
    their replies: the reference a replay must match. Returns their ledger."""
    ledger: Counter = Counter()
    deadline = time.monotonic() + _settle_budget_s(client.spec.timeout_s)
    for n in range(client.mix.seeds):
        for method, body in client.mix.unit(client.ctx, n):
            outcome, reply, _ = await client.send(method, body)
            if not _definite(outcome):
                outcome, reply = await client.settle(method, body, deadline)
            if outcome != "OK" or reply is None:
                raise BenchError(f"seed {method} {n} answered {outcome}")
            ledger[f"{method} {outcome}"] += 1
            client.replies[body] = reply
    return ledger


async def _lane(client: _Client, units: Iterator[int], tally: _Tally) -> None:
    """Keeps one call in flight until the window ends (or the call cap is hit)."""
    replays = client.mix.replays
    for n in units:
        if n >= MAX_CALLS_PER_CLIENT or time.monotonic() >= tally.end:
            return
        for method, body in client.mix.unit(client.ctx, n):
            started = time.monotonic()
            if replays:
                outcome = await client.send_replay(method, body)
            else:
                outcome = (await client.send(method, body))[0]
            tally.add(started, time.monotonic(), outcome)
            if not replays:  # a replay repeats a seed: it moves no stock
                tally.record(method, body, outcome)
            if outcome != "OK":
                break  # e.g. a Reserve refused for stock: there is nothing to confirm


async def _settle_lost(client: _Client, tally: _Tally) -> None:
    """Settles every call whose answer was lost, a few at a time, so the
    ledger knows what each did; bounded by _settle_budget_s."""
    deadline = time.monotonic() + _settle_budget_s(client.spec.timeout_s)
    gate = asyncio.Semaphore(client.spec.in_flight)

    async def settle_one(method: str, body: bytes) -> None:
        async with gate:
            outcome, _ = await client.settle(method, body, deadline)
        if _definite(outcome):
            tally.ledger[f"{method} {outcome}"] += 1
        else:
            tally.unsettled += 1

    lost, tally.lost = tally.lost, []
    await asyncio.gather(*(settle_one(method, body) for method, body in lost))


def _settle_timeout_s(timeout_s: float) -> float:
    return max(timeout_s, SETTLE_TIMEOUT_S)


def _settle_budget_s(timeout_s: float) -> float:
    return SETTLE_ATTEMPTS * (_settle_timeout_s(timeout_s) + SETTLE_DELAY_S)


async def _drive(spec: WorkerSpec) -> dict:
    async with grpc.aio.insecure_channel(spec.target) as channel:
        await asyncio.wait_for(channel.channel_ready(), STARTUP_TIMEOUT_S)
        client = _Client(spec, channel)
        seeded = await _seed(client)
        print("ready", flush=True)
        start = await _start_time()
        tally = _Tally(start, start + spec.warmup_s, start + spec.warmup_s + spec.duration_s, spec.samples,
                       ledger=seeded, rng=random.Random(spec.client))
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
        event_loop.run(_serve_echo(argv[1], float(argv[2])))
        return 0
    return main(argv)


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
