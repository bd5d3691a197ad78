"""`holdfast serve --workers N`: N server processes on one port, and the
supervisor that starts, watches and stops them.

Each worker is a whole server (service/server.py): its own store connections,
snapshot client, reaper and gRPC server, bound with SO_REUSEPORT so that the
kernel spreads new connections over the workers. Workers share state only
through the backends, which is why some backends are refused:

* The snapshot must be shared (redis:// or redis+cluster://). With memory://
  each worker would keep a snapshot of its own, and its version double-check
  would answer false VERSION_CONFLICTs for moves another worker made.
* The store must be PostgreSQL. SQLite in WAL mode does allow several
  processes (the stores set a busy timeout), so it would not be wrong, but it
  admits one writer per file: workers would only queue on its file lock,
  already held across each batch's fsync, where one process's group commit
  shares that fsync instead. Worse, a move waiting on that lock has already
  started, so one that waits past its budget answers DEPENDENCY_UNAVAILABLE,
  the one answer that leaves the client guessing, where one process answers
  a clean BUDGET_EXCEEDED. Contention must never surface as an error, so
  SQLite stays a single process.
* No --journal: a journal is one process's calls in their order, which N
  processes cannot write.

The port is the group's, never shared with anyone else (SO_REUSEPORT alone
would let a second group join the first silently). Before any worker
starts, the supervisor binds and listens on the address without SO_REUSEPORT,
as a lone server would: if that fails, the port is taken and the group
refuses to start. It also claims the port for its lifetime under an abstract
Unix socket name (per network namespace, gone when the supervisor dies), so
that two groups starting at once cannot both pass that check. The claim is by
port alone, so two groups on one port of different addresses are refused too.
A port of 0 is resolved by that same probe: the workers share the free port
it found (`--listen 127.0.0.1:0` works, and the start-up line names the port).

Workers are `spawn`ed, never forked: gRPC does not survive a fork once
initialised. They die with their supervisor (PR_SET_PDEATHSIG on Linux).

Metrics: with `--metrics-listen HOST:PORT` (or --metrics-port) worker i
(1..N) serves its own /metrics on HOST:PORT+i-1; scrape them all and sum. That
keeps every metric exact (prometheus_client's multiprocess mode would need its
own directory and cannot serve the scrape-time deterministic ratio).

Stopping: SIGTERM or SIGINT to the supervisor sends SIGTERM to every worker,
which drains its calls and stops; the supervisor exits 0 once all have. A
worker that dies on its own stops the whole group, exit 1: the state lives in
the backends, so a restart loses nothing, and the orchestrator that restarts
the group (systemd, Kubernetes) sees the failure, where a quiet in-place
restart would hide a crash loop. Exit 2: refused or failed to start.
"""

from __future__ import annotations

import ctypes
import errno
import logging
import multiprocessing
import os
import signal
import socket
import sys
import time
from dataclasses import dataclass, replace
from multiprocessing.connection import Connection
from multiprocessing.connection import wait as wait_for
from multiprocessing.context import SpawnContext
from types import FrameType
from typing import TypedDict

from holdfast.loop import run
from holdfast.server import Config, Running, serve
from holdfast.store import StoreUnavailable

WORKERS_MAX = 64
START_TIMEOUT_S = 120.0  # every worker serving by then, or the group stops
STOP_TIMEOUT_S = 30.0  # every worker drained by then, or it is killed
POLL_S = 0.5  # how often the supervisor looks at its deadlines
PR_SET_PDEATHSIG = 1  # <linux/prctl.h>

log = logging.getLogger("holdfast.workers")


# -- checks: what N processes cannot share --------------------------------------


def check(config: Config, workers: int) -> None:
    """Raises ValueError, saying why, for a configuration N workers cannot run."""
    if not 1 < workers <= WORKERS_MAX:
        raise ValueError(f"--workers must be within 2..{WORKERS_MAX} for a group, got {workers}")
    if config.snapshot.partition(":")[0] == "memory":
        raise ValueError(
            f"--workers {workers} needs a shared snapshot (redis:// or redis+cluster://): with {config.snapshot}"
            " each worker would keep its own, and its version double-check would answer false VERSION_CONFLICTs"
            " for moves made by another worker"
        )
    if config.store.startswith("sqlite:"):
        raise ValueError(
            f"--workers {workers} needs a PostgreSQL store (postgresql://): SQLite has one writer per file, so"
            " workers would only queue on its lock, and a move waiting there past its budget would answer"
            " DEPENDENCY_UNAVAILABLE; serve SQLite from one process"
        )
    if config.journal:
        raise ValueError(f"--journal records one process's calls in order; it does not go with --workers {workers}")
    if config.metrics_listen and _split(config.metrics_listen)[1] == 0:
        raise ValueError(
            f"--metrics-listen {config.metrics_listen} with --workers {workers} needs a port: worker i serves"
            " its /metrics on that port + i - 1"
        )


def _split(listen: str) -> tuple[str, int]:
    host, colon, port = listen.rpartition(":")
    if not colon or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"expected HOST:PORT, got {listen!r}")
    return host, int(port)


# -- the port: free, claimed, resolved -------------------------------------------


def claim_port(listen: str) -> tuple[str, int, socket.socket]:
    """Makes sure nobody listens on `listen` and claims its port for this
    group; returns the host, the port (resolved if 0) and the claim, which
    holds the port for as long as it is open."""
    host, port = _split(listen)
    port = _probe(host, port)
    claim = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        claim.bind(f"\0holdfast-serve-workers:{port}")
    except OSError:
        claim.close()
        raise OSError(f"cannot listen on {host}:{port}: another holdfast serve --workers group holds port {port}") from None
    return host, port, claim


def _probe(host: str, port: int) -> int:
    """Binds and listens on every address of `host` as a lone server would
    (SO_REUSEADDR, so connections in TIME_WAIT do not count; no SO_REUSEPORT);
    returns the port, the one picked by the first bind when `port` is 0."""
    name = host.removeprefix("[").removesuffix("]") or None
    try:
        addresses = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise OSError(f"cannot listen on {host}:{port}: {error.strerror}") from None
    probes: list[socket.socket] = []
    bound = 0
    unique = {(family, address[0]): (family, kind, proto, address) for family, kind, proto, _, address in addresses}
    try:
        for family, kind, proto, address in unique.values():
            probe = socket.socket(family, kind, proto)
            probes.append(probe)
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6:  # the IPv4 probe covers IPv4; do not collide with it
                probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
            try:
                probe.bind((address[0], port, *address[2:]))
            except OSError as error:
                if error.errno == errno.EADDRNOTAVAIL and len(unique) > 1:
                    continue  # e.g. localhost's ::1 on a host without IPv6; grpc skips it too
                raise OSError(f"cannot listen on {host}:{port}: {error.strerror}") from None
            probe.listen(1)
            port = probe.getsockname()[1]
            bound += 1
    finally:
        for probe in probes:
            probe.close()
    if not bound:
        raise OSError(f"cannot listen on {host}:{port}: no address of {host or 'this host'} can be bound")
    return port


# -- the supervisor ---------------------------------------------------------------


class _Ready(TypedDict):
    """The message a worker sends its supervisor once it serves."""

    pid: int
    store: str
    snapshot: str
    services: list[str]


@dataclass(slots=True)
class _Worker:
    index: int  # 1..N
    process: multiprocessing.process.BaseProcess
    reports: Connection  # the worker sends one message once it serves
    ready: _Ready | None = None
    gone: bool = False  # its exit has been seen by the supervisor


class _Group:
    """The running workers, and the supervisor's view of them."""

    def __init__(self, workers: list[_Worker]) -> None:
        self.workers = workers
        self.stop_requested = False
        self.failed = 0  # the exit code the group owes: 1 a worker died, 2 one could not start

    def alive(self) -> list[_Worker]:
        return [w for w in self.workers if w.process.exitcode is None]

    def stop(self) -> None:
        """SIGTERM to every worker still running: each drains its calls and stops."""
        for worker in self.alive():
            pid = worker.process.pid
            assert pid is not None, "a worker joins the group started (_spawn)"
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                pass

    def on_signal(self, signum: int, frame: FrameType | None) -> None:
        self.stop_requested = True
        self.stop()

    def wait(self, timeout_s: float) -> list[_Worker]:
        """Waits up to `timeout_s` for a worker to exit or report; returns the
        workers whose exit is news (each is returned once)."""
        live = [w for w in self.workers if not w.gone]
        waiting = [w.reports for w in live if w.ready is None and not w.reports.closed]
        wait_for([*(w.process.sentinel for w in live), *waiting], timeout_s)
        for worker in live:
            if worker.ready is None and not worker.reports.closed and worker.reports.poll():
                try:
                    worker.ready = worker.reports.recv()
                except EOFError:  # it died before reporting: its sentinel says so
                    pass
                worker.reports.close()
        exited = [w for w in live if w.process.exitcode is not None]
        for worker in exited:
            worker.gone = True
        return exited


def supervise(config: Config, workers: int) -> int:
    """Runs N workers on one port until SIGTERM or SIGINT; returns the exit
    code (0 stopped cleanly, 1 a worker died, 2 refused or failed to start).
    Raises ValueError or OSError, saying why, when the group is refused."""
    check(config, workers)
    host, port, claim = claim_port(config.listen)
    assert port > 0, "the probe resolves a port of 0"
    with claim:
        context = multiprocessing.get_context("spawn")  # gRPC does not survive fork
        group = _Group([])
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, group.on_signal)
        try:
            for index in range(1, workers + 1):
                group.workers.append(_spawn(context, _worker_config(config, host, port, index), index))
            if _await_ready(group):
                print(_startup_line(config, host, port, group), flush=True)
                _await_exit(group, deadline=None)
            group.stop()
            _await_exit(group, deadline=time.monotonic() + STOP_TIMEOUT_S)
        finally:
            for worker in group.alive():  # only on a failure of the supervisor itself
                worker.process.kill()
    if not group.failed:
        print("holdfast stopped", flush=True)
    return group.failed


def _worker_config(config: Config, host: str, port: int, index: int) -> Config:
    metrics = ""
    if config.metrics_listen:
        metrics_host, metrics_port = _split(config.metrics_listen)
        metrics = f"{metrics_host}:{metrics_port + index - 1}"
    return replace(config, listen=f"{host}:{port}", so_reuseport=True, metrics_listen=metrics)


def _spawn(context: SpawnContext, config: Config, index: int) -> _Worker:
    reports, report = context.Pipe(duplex=False)
    process = context.Process(
        target=work, args=(config, index, os.getpid(), report), name=f"holdfast-worker-{index}", daemon=True
    )
    # A terminal's Ctrl-C reaches the whole process group, workers still
    # importing included; the supervisor alone answers it, with a SIGTERM to
    # each. So workers start with SIGINT ignored (kept through exec, and kept
    # by Python) until a serving worker's own handlers replace that.
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        process.start()
    finally:
        signal.signal(signal.SIGINT, previous)
    report.close()  # the worker holds the sending end; its death closes the pipe
    return _Worker(index, process, reports)


def _await_ready(group: _Group) -> bool:
    """Until every worker serves (True), or one exits or a stop is asked (False)."""
    deadline = time.monotonic() + START_TIMEOUT_S
    while any(w.ready is None for w in group.workers):
        if group.stop_requested:
            return False
        for worker in group.wait(POLL_S):
            if not group.stop_requested:
                print(
                    f"holdfast: worker {worker.index} (pid {worker.process.pid}) exited with"
                    f" {_exit_text(worker.process.exitcode)} before it served; stopping the group",
                    file=sys.stderr, flush=True,
                )
                group.failed = 2
                return False
        if time.monotonic() > deadline:
            print(f"holdfast: not every worker served within {START_TIMEOUT_S:.0f} s; stopping the group",
                  file=sys.stderr, flush=True)
            group.failed = 2
            return False
    return True


def _await_exit(group: _Group, deadline: float | None) -> None:
    """While workers run: a stop asked, or a worker gone on its own, stops them
    all; past `deadline` (a stop under way) the rest are killed."""
    while not all(w.gone for w in group.workers):
        if deadline is not None and time.monotonic() > deadline:
            for worker in group.alive():
                print(f"holdfast: worker {worker.index} (pid {worker.process.pid}) did not stop within"
                      f" {STOP_TIMEOUT_S:.0f} s; killed", file=sys.stderr, flush=True)
                worker.process.kill()
                worker.process.join()
            group.failed = group.failed or 1
            return
        for worker in group.wait(POLL_S):
            code = worker.process.exitcode
            if not group.stop_requested and group.failed == 0:
                print(
                    f"holdfast: worker {worker.index} (pid {worker.process.pid}) exited with {_exit_text(code)}"
                    " while serving; stopping the group", file=sys.stderr, flush=True,
                )
                group.failed = 1
            elif code not in (0, -signal.SIGTERM):  # a SIGTERM before a worker's handlers: it never served
                group.failed = group.failed or 1
        if deadline is None and (group.stop_requested or group.failed):
            return


def _exit_text(code: int | None) -> str:
    if code is not None and code < 0:
        return f"signal {signal.Signals(-code).name}"
    return f"code {code}"


def _startup_line(config: Config, host: str, port: int, group: _Group) -> str:
    ready = [w.ready for w in group.workers if w.ready is not None]
    assert len(ready) == len(group.workers), "the line is printed once every worker serves"
    first = ready[0]
    pids = ", ".join(str(r["pid"]) for r in ready)
    metrics = ""
    if config.metrics_listen:
        metrics_host, metrics_port = _split(config.metrics_listen)
        last = metrics_port + len(group.workers) - 1
        metrics = f", metrics on http://{metrics_host}:{{{metrics_port}..{last}}}/metrics (one port per worker)"
    return (
        f"holdfast serving {', '.join(first['services'])} on {host}:{port} with {len(group.workers)} workers"
        f" (pids {pids}; store {first['store']}, snapshot {first['snapshot']}{metrics})"
    )


# -- a worker ----------------------------------------------------------------------


def work(config: Config, index: int, supervisor_pid: int, report: Connection) -> None:
    """A worker process: one whole server, until SIGTERM (its supervisor's)."""
    _die_with(supervisor_pid)
    logging.basicConfig(level=logging.INFO, format=f"%(asctime)s worker {index} %(name)s %(levelname)s %(message)s")

    def ready(running: Running) -> None:
        engine = running.engine
        message: _Ready = {"pid": os.getpid(), "store": engine.store.describe(), "snapshot": engine.snapshot.describe(),
                           "services": list(running.services)}
        report.send(message)
        report.close()

    try:
        run(serve(config, ready))
    except (OSError, ValueError, StoreUnavailable) as error:
        print(f"holdfast: worker {index}: {error}", file=sys.stderr, flush=True)
        sys.exit(2)


def _die_with(supervisor_pid: int) -> None:
    """SIGTERM this worker when its supervisor dies, however it dies (Linux)."""
    if sys.platform.startswith("linux"):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0) != 0:
            log.warning("prctl(PR_SET_PDEATHSIG) failed: errno %d", ctypes.get_errno())
    if os.getppid() != supervisor_pid:  # it died before the line above took effect
        sys.exit(1)
