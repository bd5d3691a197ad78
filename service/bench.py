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
  Replies are never parsed.

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

Mixes: a mix turns a unit number into the calls of one unit of work (method
name and request bytes, sent in order): `reserve` and `reserve-confirm`;
`reserve-release`, `replay` and `hot-sku` would go into `MIXES` too. A
unit's later calls name its reservation without reading a reply, because the
reservation id is derived from the Reserve key
(`service.inventory.reservation_id` of `service.gateway.idempotency_key`).

The child processes run this module as `python -m service.bench _worker SPEC`
and `python -m service.bench _echo HOST:PORT LIFETIME_S`.
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
import select
import shutil
import signal
import socket
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

import service.generated  # noqa: F401  (puts the generated `holdfast` tree on sys.path)
from holdfast.inventory.v1 import inventory_pb2 as pb

from service.gateway import idempotency_key
from service.inventory import reservation_id

INVENTORY_PREFIX = "/holdfast.inventory.v1.InventoryService/"
ECHO_SERVICE = "holdfast.bench.v1.Echo"
ECHO_PATH = f"/{ECHO_SERVICE}/Echo"
HOLDFAST, ECHO = "holdfast", "echo"

STARTUP_TIMEOUT_S = 30.0  # a child process must be serving or connected by then
STOP_GRACE_S = 5.0  # SIGTERM, then this long, then SIGKILL
MAX_CALLS_PER_CLIENT = 10_000_000  # every lane loop stops here at the latest
MAX_PORT_ATTEMPTS = 3  # a free port can be taken between probing and binding
PERCENTILES = (("p50", 0.50), ("p99", 0.99), ("p99.9", 0.999))
ROOT = Path(__file__).resolve().parent.parent  # the directory holding `service/`
SQLITE_IN_TMP = "sqlite"  # as a --backend store: a fresh SQLite file in the run's temp dir
PG_BINDIR = "/usr/lib/postgresql/15/bin"  # unless HOLDFAST_PG_BINDIR says otherwise
STORE_LABELS = {"sqlite": "sqlite", "postgresql": "postgres", "postgres": "postgres"}
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
    bytes), sent in order on one lane. `stock` is the SKU's total."""

    name: str
    stock: int
    unit: Callable[[MixContext, int], list[tuple[str, bytes]]]


def _reserve_request(ctx: MixContext, n: int) -> pb.ReserveRequest:
    order_id = f"bench-{ctx.run_id}-{ctx.client}-{n}"
    return pb.ReserveRequest(order_id=order_id, sku_id=ctx.sku_id, quantity=1, timestamp_ms=ctx.timestamp_ms)


def _reserve_unit(ctx: MixContext, n: int) -> list[tuple[str, bytes]]:
    return [("Reserve", _reserve_request(ctx, n).SerializeToString())]


def _reserve_confirm_unit(ctx: MixContext, n: int) -> list[tuple[str, bytes]]:
    """Reserve, then Confirm the reservation the server derives from its key."""
    request = _reserve_request(ctx, n)
    key = idempotency_key(INVENTORY_PREFIX + "Reserve", (request.order_id, request.sku_id, request.timestamp_ms))
    confirm = pb.ConfirmRequest(reservation_id=reservation_id(key))
    return [("Reserve", request.SerializeToString()), ("Confirm", confirm.SerializeToString())]


MIXES: dict[str, Mix] = {
    # One unit held per call, for 15 minutes (the server's default hold): the
    # stock must outlast every call a run can make.
    "reserve": Mix("reserve", stock=10**15, unit=_reserve_unit),
    # The same holds, each sold at once: two calls per unit, both counted.
    "reserve-confirm": Mix("reserve-confirm", stock=10**15, unit=_reserve_confirm_unit),
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
    backends = tuple(map(_backend, args.backend)) or DEFAULT_BACKENDS if args.target is None else ()
    for backend in backends:
        if _label(backend) is None:
            parser.error(
                f"--backend {backend.store},{backend.snapshot}: expected a sqlite:// or postgresql:// store"
                " and a memory://, redis:// or redis+cluster:// snapshot"
            )
    return Options(
        args.duration, args.warmup, args.in_flight, args.clients, args.mix, args.target, args.timeout_s, args.json,
        backends, args.with_postgres_redis, args.store_pool,
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
    """Runs the benchmark and prints a table (or JSON). Returns 0 done, 1 failed,
    130 interrupted; a usage error exits 2 (argparse)."""
    options = _options(argv)
    try:
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
    return 0


def _run(options: Options, tmp: Path, stack: contextlib.ExitStack) -> dict:
    run_id = uuid.uuid4().hex[:12]
    mix = MIXES[options.mix]
    sku_id = f"bench-{run_id}"
    lifetime_s = STARTUP_TIMEOUT_S + options.warmup_s + options.duration_s + options.timeout_s + 60
    backends = list(options.backends)
    if options.with_postgres_redis:
        store = stack.enter_context(_postgres())
    children = stack.enter_context(Children())
    if options.with_postgres_redis:
        backends.append(Backend(store, _start_redis(children, tmp)))
    rows: dict[str, tuple[str, Result]] = {}

    if options.target is not None:
        _put_stock(options.target, sku_id, mix.stock, run_id, None)
        result = _measure(children, tmp, HOLDFAST, options.target, options, run_id, sku_id)
        rows[HOLDFAST] = (f"{options.target} (--target)", result)
    for label, backend in zip(_labels(backends), backends):
        store = f"sqlite:///{tmp.resolve()}/{len(rows)}.db" if backend.store == SQLITE_IN_TMP else backend.store
        argv = ["--store", store, "--snapshot", backend.snapshot, "--store-pool", str(options.store_pool)]
        server, target = _start_holdfast(children, tmp, label, argv)
        _put_stock(target, sku_id, mix.stock, run_id, server)
        result = _measure(children, tmp, label, target, options, run_id, sku_id)
        _stop_server(children, server, label)
        rows[label] = (f"{target} (started: {' '.join(argv)})", result)

    echo_server, echo_target = _start_echo(children, tmp, lifetime_s)
    echo = _measure(children, tmp, ECHO, echo_target, options, run_id, sku_id)
    _stop_server(children, echo_server, ECHO)
    return _report(options, rows, echo)


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
        env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])))
        with open(log, "wb") as err:
            proc = subprocess.Popen(
                argv,
                cwd=cwd,
                env=env,
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
        return [sys.executable, "-m", "service.cli", "serve", "--listen", f"127.0.0.1:{port}", *backend_argv]

    return _start_server(children, tmp, label, argv)


def _start_echo(children: Children, tmp: Path, lifetime_s: float) -> tuple[subprocess.Popen, str]:
    def argv(port: int) -> list[str]:
        return [sys.executable, "-m", "service.bench", "_echo", f"127.0.0.1:{port}", str(lifetime_s)]

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


@dataclass(slots=True)
class Result:
    """What one target did in the measured window (merged over client processes)."""

    calls: int = 0
    latencies_us: list[int] = field(default_factory=list)
    outcomes: Counter = field(default_factory=Counter)
    warmup_outcomes: Counter = field(default_factory=Counter)

    def merge(self, part: dict) -> None:
        self.calls += part["calls"]
        self.latencies_us.extend(part["latencies_us"])
        self.outcomes.update(part["outcomes"])
        self.warmup_outcomes.update(part["warmup_outcomes"])


def _measure(children: Children, tmp: Path, kind: str, target: str, options: Options, run_id: str, sku_id: str) -> Result:
    """Starts the client processes, starts them together, collects their results."""
    timestamp_ms = time.time_ns() // 1_000_000
    workers = []
    for client, lanes in enumerate(_split(options.in_flight, options.clients)):
        spec = WorkerSpec(
            kind, target, options.mix, run_id, client, sku_id, timestamp_ms, lanes,
            options.warmup_s, options.duration_s, options.timeout_s, str(tmp / f"{kind}-client-{client}.json"),
        )
        argv = [sys.executable, "-m", "service.bench", "_worker", json.dumps(asdict(spec))]
        workers.append((spec, children.spawn(argv, tmp / f"{kind}-client-{client}.log", cwd=tmp, pipes=True)))
    for spec, proc in workers:
        _await_ready(proc, Path(spec.out).with_suffix(".log"))
    start_at = f"{time.time() + 0.05!r}\n".encode()
    for _, proc in workers:
        proc.stdin.write(start_at)
        proc.stdin.close()
    result = Result()
    for spec, proc in workers:
        result.merge(_collect(children, proc, spec, options))
    return result


def _split(total: int, parts: int) -> list[int]:
    return [total // parts + (1 if i < total % parts else 0) for i in range(parts)]


def _await_ready(proc: subprocess.Popen, log: Path) -> None:
    """Waits (bounded) for the worker's `ready` line: connected, about to wait for the start."""
    deadline = time.monotonic() + STARTUP_TIMEOUT_S
    while (left := deadline - time.monotonic()) > 0:
        readable, _, _ = select.select([proc.stdout], [], [], left)
        if readable:
            line = proc.stdout.readline()
            if line.strip() == b"ready":
                return
            raise BenchError(f"client process failed to connect; its log ends with:\n{_tail(log)}")
    raise BenchError(f"client process not ready after {STARTUP_TIMEOUT_S:.0f} s")


def _collect(children: Children, proc: subprocess.Popen, spec: WorkerSpec, options: Options) -> dict:
    limit = STARTUP_TIMEOUT_S + options.warmup_s + options.duration_s + 2 * options.timeout_s
    try:
        code = proc.wait(limit)
    except subprocess.TimeoutExpired:
        raise BenchError(f"client process still running after {limit:.0f} s") from None
    log = Path(spec.out).with_suffix(".log")
    if code != 0:
        raise BenchError(f"client process exited with {code}; its log ends with:\n{_tail(log)}")
    children.stop(proc)  # reaps and closes its pipes
    return json.loads(Path(spec.out).read_text())


# -- the report -------------------------------------------------------------------------------


def _percentile(ordered: list[int], q: float) -> float | None:
    """Nearest rank, in milliseconds."""
    if not ordered:
        return None
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)] / 1000.0


def _summary(result: Result, target: str, duration_s: float) -> dict:
    ordered = sorted(result.latencies_us)
    return {
        "address": target,
        "calls": result.calls,
        "calls_per_s": result.calls / duration_s,
        "latency_ms": {name: _percentile(ordered, q) for name, q in PERCENTILES},
        "outcomes": dict(result.outcomes.most_common()),
        "warmup_outcomes": dict(result.warmup_outcomes.most_common()),
    }


def _report(options: Options, rows: dict[str, tuple[str, Result]], echo: Result) -> dict:
    """`targets`: a row per holdfast (in measuring order), then `echo`; each row's
    `ratio` is its calls/s over echo's, also collected in `ratios`."""
    targets = {label: _summary(result, address, options.duration_s) for label, (address, result) in rows.items()}
    targets[ECHO] = _summary(echo, "started (bare grpc.aio echo)", options.duration_s)
    echo_rate = targets[ECHO]["calls_per_s"]
    for row in targets.values():
        row["ratio"] = row["calls_per_s"] / echo_rate if echo_rate else None
    return {
        "mix": options.mix,
        "in_flight": options.in_flight,
        "clients": options.clients,
        "warmup_s": options.warmup_s,
        "duration_s": options.duration_s,
        "store_pool": options.store_pool,
        "targets": targets,
        "ratios": {label: targets[label]["ratio"] for label in rows},
    }


def _table(report: dict) -> str:
    header = (
        f"holdfast bench: mix {report['mix']}, {report['in_flight']} in flight from {report['clients']} client"
        f" process{'es' if report['clients'] > 1 else ''}, {report['duration_s']:g} s after {report['warmup_s']:g} s warm-up"
    )
    width = max(10, *(len(name) + 2 for name in report["targets"]))
    columns = f"{'target':<{width}}{'calls/s':>10}{'p50 ms':>10}{'p99 ms':>10}{'p99.9 ms':>10}{'/ echo':>9}  outcomes"
    lines = [header, columns]
    for name, row in report["targets"].items():
        latency = "".join(_ms(row["latency_ms"][p]) for p, _ in PERCENTILES)
        ratio = f"{'-':>9}" if row["ratio"] is None else f"{row['ratio']:>9.3f}"
        outcomes = ", ".join(f"{key} {n}" for key, n in row["outcomes"].items()) or "-"
        lines.append(f"{name:<{width}}{row['calls_per_s']:>10.1f}{latency}{ratio}  {outcomes}")
    for name, row in report["targets"].items():
        lines.append(f"  {name}: {row['address']}")
    return "\n".join(lines)


def _ms(value: float | None) -> str:
    return f"{'-':>10}" if value is None else f"{value:>10.2f}"


# -- child: the load generator ------------------------------------------------------------------


@dataclass(slots=True)
class _Tally:
    measure_from: float
    end: float
    calls: int = 0
    latencies_us: list[int] = field(default_factory=list)
    outcomes: Counter = field(default_factory=Counter)
    warmup_outcomes: Counter = field(default_factory=Counter)

    def add(self, started: float, done: float, outcome: str) -> None:
        if done < self.measure_from:
            self.warmup_outcomes[outcome] += 1
        elif done <= self.end:
            self.calls += 1
            self.latencies_us.append(round((done - started) * 1e6))
            self.outcomes[outcome] += 1
        # Calls that complete after the window are not counted.


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


async def _lane(
    spec: WorkerSpec, channel: grpc.aio.Channel, mix: Mix, ctx: MixContext, units: Iterator[int], tally: _Tally
) -> None:
    """Keeps one call in flight until the window ends (or the call cap is hit)."""
    calls: dict[str, grpc.aio.UnaryUnaryMultiCallable] = {}
    for n in units:
        if n >= MAX_CALLS_PER_CLIENT or time.monotonic() >= tally.end:
            return
        for method, body in mix.unit(ctx, n):
            path = ECHO_PATH if spec.kind == ECHO else INVENTORY_PREFIX + method
            call = calls.get(path) or calls.setdefault(path, channel.unary_unary(path))
            started = time.monotonic()
            try:
                await call(body, timeout=spec.timeout_s)
                outcome = "OK"
            except grpc.aio.AioRpcError as error:
                outcome = _outcome_of(error)
            tally.add(started, time.monotonic(), outcome)


async def _drive(spec: WorkerSpec) -> dict:
    mix = MIXES[spec.mix]
    ctx = MixContext(spec.run_id, spec.client, spec.sku_id, spec.timestamp_ms)
    async with grpc.aio.insecure_channel(spec.target) as channel:
        await asyncio.wait_for(channel.channel_ready(), STARTUP_TIMEOUT_S)
        print("ready", flush=True)
        start = await _start_time()
        tally = _Tally(start + spec.warmup_s, start + spec.warmup_s + spec.duration_s)
        await asyncio.sleep(max(0.0, start - time.monotonic()))
        units = itertools.count()  # shared by the lanes: every unit number is used once
        await asyncio.gather(*(_lane(spec, channel, mix, ctx, units, tally) for _ in range(spec.in_flight)))
    return {
        "calls": tally.calls,
        "latencies_us": tally.latencies_us,
        "outcomes": tally.outcomes,
        "warmup_outcomes": tally.warmup_outcomes,
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
        result = asyncio.run(_drive(spec))
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
        asyncio.run(_serve_echo(argv[1], float(argv[2])))
        return 0
    return main(argv)


if __name__ == "__main__":
    sys.exit(_child(sys.argv[1:]))
