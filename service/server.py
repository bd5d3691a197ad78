"""Assembles and runs the server: backends, engine, gateway, servicer,
health, reflection, recovery, reaper; TLS, tokens and limits around them."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
import logging
import os
import signal
import sys
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import quote

import grpc
import prometheus_client
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from holdfast.contracts import contract
from holdfast import recorder, redaction, security, tracing
from holdfast.clock import Clock, SystemClock
from holdfast.engine import Engine
from holdfast.faults import FaultInjector, FaultPlan
from holdfast.faults import load as load_faults
from holdfast.gateway import Gateway
from holdfast.framework import Service
from holdfast.limits import Admission, Limits
from holdfast.reaper import Reaper
from holdfast.retention import Policy, Retention
from holdfast.backends import open_snapshot, open_store
from holdfast.store import version_pages
from holdfast.table import Table

log = logging.getLogger("holdfast")


@dataclass(frozen=True, slots=True)
class Config:
    listen: str = "127.0.0.1:50051"
    store: str = "sqlite:///./holdfast.db"
    snapshot: str = "memory://"
    store_pool: int = 1  # connections (and worker threads) of a server-based store
    metrics_listen: str = ""  # HOST:PORT for Prometheus' /metrics; empty serves none
    reaper_interval_ms: int = 100
    faults: str = ""  # a fault injection file (service/faults.py); empty injects none
    journal: str = ""  # a JSON-lines journal of every call (service/recorder.py); empty records none
    # Share the port with other servers of this user (SO_REUSEPORT): only the
    # workers of `holdfast serve --workers N`, after their supervisor has made
    # sure the port is free (service/workers.py). Alone, a taken port fails.
    so_reuseport: bool = False
    # The services to host, sharing the store and the snapshot: each
    # `MODULE:ATTR` naming a Service subclass (made with `from_settings`) or
    # a factory `engine -> Service` (load_app). None by default: the server
    # knows no app, so whoever starts it names them (`holdfast serve` hosts
    # holdfast's built-in ones, cli.BUILT_IN, when none is named).
    apps: tuple[str, ...] = ()
    # What the apps read when they are made (Service.from_settings): names
    # and JSON values, recorded in the journal so a replay makes them alike.
    settings: Mapping[str, Any] = field(default_factory=dict)
    # TLS (service/security.py): PEM files; a client CA makes it mutual TLS.
    tls_cert: str = ""
    tls_key: str = ""
    tls_client_ca: str = ""
    auth_tokens: str = ""  # a token file (service/security.py); empty: no authentication
    # A backend's password apart from its URL (merged into it at start):
    # from the environment, or from a file. Never in a repr.
    store_password: str = field(default="", repr=False)
    store_password_file: str = ""
    snapshot_password: str = field(default="", repr=False)
    snapshot_password_file: str = ""
    limits: Limits = field(default_factory=Limits)
    # How long settled rows and outcome records are kept (holdfast.retention).
    retention: Policy = field(default_factory=Policy)
    # HOST:PORT of an OTLP/gRPC receiver for the calls' traces (service/tracing.py,
    # needs `pip install 'holdfast[otel]'`); empty traces nothing.
    otlp_endpoint: str = ""

# A service of the user's own, built on holdfast: made once the engine (store
# and snapshot) is open.
ServiceFactory = Callable[[Engine], Service]


def load_app(spec: str, settings: Mapping[str, Any] | None = None) -> ServiceFactory:
    """The factory `MODULE:ATTR` names: a Service subclass (made with its
    `from_settings(engine, settings)`) or a callable `engine -> Service`.
    Raises ValueError, saying what is wrong with the spec, so `holdfast
    serve` exits with it."""
    found = load_attribute(spec)
    if isinstance(found, type):
        if not issubclass(found, Service):
            raise ValueError(f"--app {spec}: {found.__name__} is a class but not a holdfast.Service")
        return _Made(found, dict(settings or {}))
    if not callable(found):
        raise ValueError(f"--app {spec}: a {type(found).__name__}, not a Service class or a factory")
    return found


@dataclass(frozen=True, slots=True)
class _Made:
    """A Service class as a factory: `service(engine, settings)`."""

    service: type[Service]
    settings: Mapping[str, Any]

    def __call__(self, engine: Engine) -> Service:
        return self.service.from_settings(engine, self.settings)


def importable_from_here() -> None:
    """A team's modules (`--app tables:Tables`, `graph tables:BOOKING`, a
    journal's or a workload's app) import from the folder the command runs
    in, as with `python -m`; console scripts do not put it on sys.path."""
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())


def load_attribute(spec: str) -> object:
    """The object `package.module:ATTRIBUTE` names, imported as Python
    would from the current sys.path; ValueError with a one-line reason."""
    module_name, colon, attribute = spec.partition(":")
    if not colon or not module_name or not attribute:
        raise ValueError(f"{spec!r}: expected MODULE:ATTRIBUTE, such as tables:Tables")
    try:
        module = importlib.import_module(module_name)
    except ImportError as error:
        raise ValueError(f"cannot load {spec!r}: {error}") from None
    found = module
    for part in attribute.split("."):
        try:
            found = getattr(found, part)
        except AttributeError:
            raise ValueError(f"cannot load {spec!r}: {module_name} has no attribute {attribute}") from None
    return found


@dataclass(slots=True)
class Running:
    """A started server; `port` is the bound port (useful with `:0`)."""

    server: grpc.aio.Server
    port: int
    engine: Engine
    services: dict[str, Service]  # by full proto name
    reaper_task: asyncio.Task[None]
    health: health.aio.HealthServicer
    journal: recorder.JournalWriter | None = None  # closed after the last call has answered
    admission: Admission | None = None  # the bound on calls in flight: its `in_flight` and `refused` counts
    retention: Retention | None = None  # what prunes the store (its rounds run on the reaper's task)

    async def stop(self, grace_s: float = 5.0) -> None:
        await self.health.enter_graceful_shutdown()
        self.reaper_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self.reaper_task
        await self.server.stop(grace_s)
        if self.journal is not None:
            self.journal.close()
        await self.engine.store.close()
        await self.engine.snapshot.close()
        tracing.shutdown()  # the spans of the last calls leave; the hooks are off for a next server


async def start(config: Config, clock: Clock | None = None, services: Sequence[ServiceFactory] = ()) -> Running:
    """Opens the backends, resolves left-over intents, then starts serving
    `config.services` and `services` (a user's own), all on one store and
    one snapshot."""
    if not config.apps and not services:
        raise ValueError("no service to host")
    services = [*(load_app(spec, config.settings) for spec in config.apps), *services]
    # Read first: a bad fault, TLS, token or password file must stop the start before any backend opens.
    faults = load_faults(config.faults) if config.faults else None
    tls, tokens, (store_url, snapshot_url) = _secured(config)
    store = open_store(store_url, pool_size=config.store_pool, tables=tables_of_apps(services))
    snapshot = open_snapshot(snapshot_url)
    await store.open()
    try:
        await snapshot.open(lambda: version_pages(store))
        engine = Engine(store, snapshot, clock or SystemClock())
        return await _start(config, engine, faults, services, tls, tokens)
    except BaseException:
        await store.close()
        await snapshot.close()
        raise


async def _start(
    config: Config, engine: Engine, faults: FaultPlan | None = None, extra: Sequence[ServiceFactory] = (),
    tls: grpc.ServerCredentials | None = None, tokens: Sequence[security.Token] | None = None,
) -> Running:
    hosted = [make(engine) for make in extra]
    names = [service.name for service in hosted]
    if len(set(names)) != len(names):
        raise ValueError(f"a service is hosted twice: {', '.join(names)}")
    admin = admin_methods(hosted)  # checked with tokens off too: a misspelt name is wrong either way
    contracts = {path: c for service in hosted for path, c in service.contracts.items()}
    if faults is not None:
        faults.require_known(contracts)
    retention = Retention(engine, hosted, config.retention)
    reaper = Reaper(engine, hosted, config.reaper_interval_ms, retention=retention)
    recovered = await reaper.recover()
    if recovered:
        log.info("recovered %d intents left in the store", recovered)

    # Tokens are checked first, before a refused caller costs anything or
    # learns whether the server is busy; then the bound on calls in flight,
    # which counts the time every layer inside it spends.
    interceptors: list[grpc.aio.ServerInterceptor] = []
    # Tracing outermost: each call's span covers every layer, a refusal too.
    if config.otlp_endpoint:
        interceptors.append(tracing.install(config.otlp_endpoint, names))
    if tokens is not None:
        interceptors.append(security.Authenticator(tokens, security.Policy(admin), counted=contracts))
    admission = Admission(config.limits, contracts)
    interceptors.append(admission)
    # Faults come next: a delay spends the client's deadline before the
    # gateway sets the budget, as a slow network would.
    if faults is not None:
        log.warning("injecting faults from %s into %s", faults.source, ", ".join(sorted(faults.faults)))
        interceptors.append(FaultInjector(faults))
    # The journal sits inside faults (an injected error never ran) and outside
    # the gateway, whose exact answer it records; recovery above is not journaled.
    writer = None
    if config.journal:
        writer, journaling = recorder.install(
            config.journal, engine, hosted, contracts, recorder.start_line(config, names), retention
        )
        interceptors.append(journaling)
    # No SO_REUSEPORT unless asked: a second instance on a taken port must fail, not share it.
    server = grpc.aio.server(
        interceptors=interceptors,
        options=[("grpc.so_reuseport", int(config.so_reuseport)), *config.limits.server_options()],
        maximum_concurrent_rpcs=config.limits.backstop,
    )
    # The gateway wraps each handler once, here; registered (not generic)
    # handlers are found by grpc without a Python look-up per call.
    gateway = Gateway(contracts)
    for service in hosted:
        server.add_registered_method_handlers(service.name, gateway.guard(service.name, service.method_handlers()))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*names, reflection.SERVICE_NAME, health.SERVICE_NAME), server)
    try:
        port = server.add_insecure_port(config.listen) if tls is None else server.add_secure_port(config.listen, tls)
    except RuntimeError as error:  # grpc reports a port it cannot bind this way
        if writer is not None:
            writer.close()
        raise OSError(f"cannot listen on {config.listen}: {error}") from None
    await server.start()
    await health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    for name in names:
        await health_servicer.set(name, health_pb2.HealthCheckResponse.SERVING)
    services = {service.name: service for service in hosted}
    return Running(
        server, port, engine, services, asyncio.create_task(reaper.run()), health_servicer, writer, admission,
        retention,
    )


def admin_methods(hosted: Sequence[Service]) -> frozenset[str]:
    """The gRPC paths only `admin` tokens may call: each hosted service's
    `admin_methods`. A name its service does not have is refused (ValueError),
    since a misspelt one would leave that RPC open to every `client`."""
    paths = set()
    for service in hosted:
        known = {method.name for method in service.DESCRIPTOR.methods}
        for name in service.admin_methods:
            if name not in known:
                raise ValueError(f"{type(service).__name__}.admin_methods names {name!r}, an RPC {service.name} does not have")
            paths.add(f"/{service.name}/{name}")
    return frozenset(paths)


def check(config: Config) -> None:
    """Reads and checks every file `start` reads before it opens anything
    (apps, faults, TLS, tokens, passwords); raises OSError or ValueError, saying why."""
    apps = [load_app(spec, config.settings) for spec in config.apps]
    if config.faults:
        load_faults(config.faults, _known_methods(apps))
    _secured(config)


def tables_of_apps(apps: Sequence[ServiceFactory]) -> tuple[Table[Any], ...]:
    """The tables the apps declare (`Service.tables`; a factory that is no
    Service class may carry a `tables` attribute), in the order hosted."""
    found: list[Table[Any]] = []
    for app in apps:
        declared = app.service.tables if isinstance(app, _Made) else getattr(app, "tables", ())
        found += [table for table in declared if table not in found]
    return tuple(found)


def _known_methods(apps: Sequence[ServiceFactory]) -> frozenset[str] | None:
    """The gRPC paths the apps will host, when they are known before they
    are made (an app given as a factory is known only then)."""
    descriptors = []
    for app in apps:
        if not isinstance(app, _Made):
            return None
        descriptors.append(app.service.DESCRIPTOR)
    return frozenset(contract.method_path(method) for service in descriptors for method in service.methods)


def _secured(config: Config) -> tuple[grpc.ServerCredentials | None, tuple[security.Token, ...] | None, tuple[str, str]]:
    """The TLS credentials, the tokens and the backend URLs with their passwords."""
    files = security.TlsFiles(config.tls_cert, config.tls_key, config.tls_client_ca)
    tls = files.server_credentials() if files.enabled else None
    tokens = security.load_tokens(config.auth_tokens) if config.auth_tokens else None
    return tls, tokens, backend_urls(config)


def backend_urls(config: Config) -> tuple[str, str]:
    """The store and snapshot URLs with their passwords merged in (from the
    environment or a file); raises OSError or ValueError, saying why."""
    store = security.password_for("store", config.store, config.store_password, config.store_password_file)
    snapshot = security.password_for(
        "snapshot", config.snapshot, config.snapshot_password, config.snapshot_password_file
    )
    return security.with_password(config.store, store), security.with_password(config.snapshot, snapshot)


def secrets(config: Config) -> tuple[str, ...]:
    """Every string that would give a backend's password away, as far as it
    can be known (an unreadable password file gives none)."""
    found = [*redaction.secrets_of(config.store), *redaction.secrets_of(config.snapshot)]
    found += [config.store_password, config.snapshot_password]
    for path in (config.store_password_file, config.snapshot_password_file):
        if path:
            try:
                found.append(security.read_password_file(path, "backend"))
            except (OSError, ValueError):
                pass
    expanded = [variant for secret in found if secret for variant in (secret, quote(secret, safe=""))]
    return tuple(dict.fromkeys(expanded))


def _security_note(config: Config) -> str:
    """What the start-up line says of TLS and tokens; nothing when neither is on."""
    notes = []
    if config.tls_cert:
        notes.append("mutual TLS" if config.tls_client_ca else "TLS")
    if config.auth_tokens:
        notes.append(f"bearer tokens from {config.auth_tokens}")
    return "".join(f", {note}" for note in notes)


async def serve(
    config: Config, ready: Callable[[Running], None] | None = None, services: Sequence[ServiceFactory] = ()
) -> None:
    """Runs until SIGTERM or SIGINT, then drains in-flight calls and stops.

    `ready`, when given, is called once serving instead of printing the
    start-up and stop lines: a worker tells its supervisor, which prints one
    line for the group (service/workers.py)."""
    # Before anything can print: a password quoted in any log line is scrubbed.
    security.guard_logs(secrets(config))
    # Metrics first: a taken metrics port (worker i of a group uses port + i - 1)
    # must stop the start before the backends open and calls arrive.
    metrics_note = ""
    if config.metrics_listen:
        metrics_host, _, metrics_port = config.metrics_listen.rpartition(":")
        try:
            prometheus_client.start_http_server(int(metrics_port), addr=metrics_host or "127.0.0.1")
        except OSError as error:
            raise OSError(f"cannot serve metrics on {config.metrics_listen}: {error.strerror}") from None
        metrics_note = f", metrics on http://{config.metrics_listen}/metrics"
    running = await start(config, services=services)
    # What start-up built lives as long as the server: out of the collector's
    # sight, so each collection scans only what calls allocate.
    gc.freeze()
    # Handlers before the start-up line: a signal sent once it is out is a clean stop.
    stopping = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stopping.set)
    host = config.listen.rsplit(":", 1)[0]
    if ready is not None:
        ready(running)
    else:
        print(
            f"holdfast serving {', '.join(running.services)} on {host}:{running.port}"
            f" (store {running.engine.store.describe()}, snapshot {running.engine.snapshot.describe()}{metrics_note}"
            f"{_security_note(config)})",
            flush=True,
        )
    await stopping.wait()
    await running.stop()
    if ready is None:
        print("holdfast stopped", flush=True)
