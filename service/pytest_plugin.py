"""The `holdfast` pytest plugin (entry point `pytest11`): fixtures for testing
code against a real holdfast server and for checking journals replay.

The plugin names no app, holdfast's own included: a test (or its
conftest.py) says what the server hosts and which stub the client is, by
overriding the fixtures below.

* `holdfast_apps` — the apps `holdfast_server` hosts, as `holdfast serve
  --app` names them (`MODULE:ATTR`: holdfast's inventory is
  `holdfast.apps.inventory:Inventory`); none by default. They are written
  to the journal's start line, so a replay hosts them again.
* `holdfast_services` — service factories of your own, `engine -> Service`
  (a `holdfast.Service` subclass is one), hosted beside `holdfast_apps`;
  none by default. One of the two must name something to host.
* `holdfast_server` — a running server on the embedded backends (SQLite in
  the test's `tmp_path`, the in-process snapshot) with a `ManualClock`, so
  hold expiry and timeout events happen when the test moves `.clock`, and a
  journal of every call and timed move at `.journal`. Also `.target`
  ("127.0.0.1:PORT") and `.port`.
* `holdfast_service_config` — the generated `service_config.json` (or
  several) whose contract deadlines and retries `holdfast_channel` applies:
  holdfast's own by default; override it to return yours.
* `holdfast_channel` — a grpc.aio channel to it (`holdfast.aio_channel`,
  with `holdfast_service_config`), to build your own stub on.
* `holdfast_stub` — the generated stub class `holdfast_client` is made of
  (`InventoryServiceStub`, `TableServiceStub`); none by default.
* `holdfast_client` — `holdfast_stub(holdfast_channel)`.
* `replay_journal` — `replay_journal(path)` replays a journal on a fresh
  instance hosting the same apps and `holdfast_services`, and fails the
  test with the first difference (or when the journal holds no call).

Loaded by every pytest run where holdfast is installed, so this module
imports nothing heavy at import time: gRPC in particular is imported by the
fixtures, after the test suite's own conftest has set gRPC's environment.
The async fixtures need pytest-asyncio; without it they fail with that
message rather than breaking the pytest run.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any, AsyncIterator, Callable, Sequence

import pytest

try:
    import pytest_asyncio
except ImportError:  # the fixtures below say so when used
    pytest_asyncio = None

REAPER_INTERVAL_MS = 20
NOTHING_HOSTED = (
    "holdfast_server hosts nothing: override holdfast_apps to return the apps to host (MODULE:ATTR, as"
    " `holdfast serve --app` takes them) or holdfast_services to return service factories"
)
NO_STUB = (
    "holdfast_client needs a stub class: override holdfast_stub to return the generated ...ServiceStub"
    " to make on holdfast_channel"
)


@dataclass(frozen=True, slots=True)
class HoldfastServer:
    """A server started for one test."""

    target: str
    port: int
    journal: Path
    clock: Any  # holdfast.clock.ManualClock
    running: Any  # holdfast.server.Running


async def _started(folder: Path, apps: Sequence[str], services: Sequence[Callable[[Any], Any]]) -> HoldfastServer:
    from holdfast.clock import ManualClock
    from holdfast.server import Config, start

    if not apps and not services:
        pytest.fail(NOTHING_HOSTED, pytrace=False)
    clock = ManualClock()
    journal = folder / "holdfast-journal.jsonl"
    config = Config(
        listen="127.0.0.1:0", store=f"sqlite:///{folder}/holdfast.db", snapshot="memory://",
        reaper_interval_ms=REAPER_INTERVAL_MS, journal=str(journal), apps=tuple(apps),
    )
    running = await start(config, clock=clock, services=services)
    return HoldfastServer(f"127.0.0.1:{running.port}", running.port, journal, clock, running)


@pytest.fixture
def holdfast_service_config() -> Any:
    """The service config(s) `holdfast_channel` applies (a path, JSON text,
    or a list of them): holdfast's own by default. Override it to return
    the `service_config.json` that `holdfast codegen --out` wrote for yours."""
    from holdfast.client import SERVICE_CONFIG

    return SERVICE_CONFIG


@pytest.fixture
def holdfast_apps() -> Sequence[str]:
    """The apps `holdfast_server` hosts, each `MODULE:ATTR` as `holdfast
    serve --app` takes it; override this fixture to return them. None by
    default: the plugin names no app, holdfast's own included."""
    return ()


@pytest.fixture
def holdfast_services() -> Sequence[Callable[[Any], Any]]:
    """Your service factories (`ServiceFactory`: engine -> Service) for
    `holdfast_server` to host beside `holdfast_apps`; override this fixture
    to return them. None by default."""
    return ()


@pytest.fixture
def holdfast_stub() -> Callable[[Any], Any] | None:
    """The stub class `holdfast_client` makes on `holdfast_channel` (a
    generated `...ServiceStub`); override this fixture to return it. None
    by default, so `holdfast_client` is refused until a test names one."""
    return None


if pytest_asyncio is not None:

    @pytest_asyncio.fixture
    async def holdfast_server(
        tmp_path: Path, holdfast_apps: Sequence[str], holdfast_services: Sequence[Callable[[Any], Any]]
    ) -> AsyncIterator[HoldfastServer]:
        """A holdfast server on embedded backends in `tmp_path`, hosting
        `holdfast_apps` and `holdfast_services`, journaling every call."""
        server = await _started(tmp_path, tuple(holdfast_apps), tuple(holdfast_services))
        yield server
        await server.running.stop(0)

    @pytest_asyncio.fixture
    async def holdfast_channel(holdfast_server: HoldfastServer, holdfast_service_config: Any) -> AsyncIterator[Any]:
        """A grpc.aio channel to `holdfast_server`, for your own stubs, with
        the contracts' deadlines and retries of `holdfast_service_config`."""
        from holdfast.client import aio_channel

        async with aio_channel(holdfast_server.target, service_config=holdfast_service_config) as channel:
            yield channel

    @pytest.fixture
    def holdfast_client(holdfast_channel: Any, holdfast_stub: Callable[[Any], Any] | None) -> Any:
        """A `holdfast_stub` on `holdfast_channel`."""
        if holdfast_stub is None:
            pytest.fail(NO_STUB, pytrace=False)
        return holdfast_stub(holdfast_channel)

else:

    @pytest.fixture
    def holdfast_server() -> None:
        pytest.fail("holdfast_server needs pytest-asyncio: pip install 'holdfast[test]'", pytrace=False)

    @pytest.fixture
    def holdfast_channel() -> None:
        pytest.fail("holdfast_channel needs pytest-asyncio: pip install 'holdfast[test]'", pytrace=False)

    @pytest.fixture
    def holdfast_client() -> None:
        pytest.fail("holdfast_client needs pytest-asyncio: pip install 'holdfast[test]'", pytrace=False)


@pytest.fixture
def replay_journal(holdfast_services: Sequence[Callable[[Any], Any]]) -> Callable[..., Any]:
    """`replay_journal(path, target=None)`: replays the journal (on a fresh
    embedded instance hosting the apps its start line names and
    `holdfast_services`, unless `target` names a running one) and returns
    the report, or fails the test with the first difference, or when the
    journal holds no call."""
    from holdfast.replay import JournalError, replay

    def check(path: str | Path, target: str | None = None) -> Any:
        try:
            report = replay(path, target, services=tuple(holdfast_services))
        except JournalError as error:
            pytest.fail(f"the journal cannot be replayed: {error}", pytrace=False)
        if not report.identical:
            first = report.differences[0].describe()
            pytest.fail(f"the journal did not replay identically\n{first}\n{report.summary()}", pytrace=False)
        return report

    return check
