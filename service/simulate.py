"""`holdfast simulate`: seeded simulation of an app's real services on the
real engine under injected faults, checked by the app's auditor after every
answer and every step (after TigerBeetle's VOPR).

One process, one event loop, no network and no wall clock: the store is the
in-memory store of record (holdfast.memory) behind `SimStore`, which fails,
stalls and tears commits when the seed says so; the clock is a
`ManualClock`; the client loses replies, delivers requests twice and out
of order, and retries what it never heard back about; the process crashes
and restarts from the store's persisted rows, running recovery; the reaper
makes the moves time makes due. Everything random comes from one
`random.Random(seed)`, and every step is awaited to the end before the next
begins, so a seed replays exactly: same seed and code, same trace hash.

What is simulated is the app's workload (holdfast.workload): the services
it hosts, the calls its client makes and the auditor of its books. Requests
go through the real servicers with the gateway's own `Call` (key,
fingerprint) set in its context variable, so keys, fingerprints, entity ids
and reply bytes are the production ones. `--app MODULE:ATTR` names the app,
imported from the current folder: a Service subclass, whose `workload`
names its workload, or the workload class itself. The built-in apps go by
name (`inventory`, the default, and `dispatch`): the CLI hands their
table down, since no layer below the apps names one.
"""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import random
import sys
from collections import Counter
from dataclasses import dataclass, field, fields, replace
from typing import Any, Callable, Iterable, Mapping, TypeVar

from holdfast.auditor import Auditor, Request, Violation
from holdfast.clock import ManualClock
from holdfast.engine import Engine
from holdfast.framework import Service
from holdfast.memory import Changes, MemTxn, Rows, attempt
from holdfast.outcome import Outcome
from holdfast.reaper import Reaper
from holdfast.server import importable_from_here, load_attribute  # the one loader of a team's `MODULE:ATTR`
from holdfast.memory_snapshot import MemorySnapshot
from holdfast.store import ENTITIES, Entity, Prefetch, StoreUnavailable, Txn, tables_of
from holdfast.table import Table
from holdfast.workload import Workload, WorkloadFactory

# MemTxn is the in-memory store's (holdfast.memory), named here as it always was.
__all__ = ["NO_FAULTS", "Faults", "MemTxn", "Result", "SimStore", "Simulation", "load_workload", "main", "run"]

T = TypeVar("T")
SWEEP_EVERY = 500  # steps between full sweeps of every row (touched ones are checked every step)


# -- faults ---------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Faults:
    """Probabilities per store transaction (`store`, `commit`, `delay`), per
    delivery (`lost`, `duplicate`, `reorder`) and per step (`crash`)."""

    store: float = 0.03  # the store fails before the move runs: nothing changed
    commit: float = 0.02  # the commit fails: the move may or may not have committed
    delay: float = 0.05  # the store stalls while business time passes
    lost: float = 0.04  # the reply never reaches the client
    duplicate: float = 0.05  # a request is delivered twice at once
    reorder: float = 0.10  # a group is delivered shuffled, or an old request arrives late
    crash: float = 0.002  # the process dies after a step's deliveries, losing their replies

    @classmethod
    def parse(cls, spec: str) -> Faults:
        """`default`, `none`, or `name=probability,...` over the defaults (`lost=0.1,crash=0`)."""
        if spec == "default":
            return cls()
        if spec == "none":
            return cls(**{f.name: 0.0 for f in fields(cls)})
        values = {}
        for item in filter(None, spec.split(",")):
            name, _, value = item.partition("=")
            if name not in {f.name for f in fields(cls)}:
                raise ValueError(f"unknown fault {name!r} (known: {', '.join(f.name for f in fields(cls))})")
            probability = float(value)
            if not 0.0 <= probability <= 1.0:
                raise ValueError(f"fault {name} must be a probability within 0..1, got {value}")
            values[name] = probability
        return replace(cls(), **values)

    def describe(self) -> str:
        return ",".join(f"{f.name}={getattr(self, f.name)}" for f in fields(self))


NO_FAULTS = Faults.parse("none")


# -- the store ----------------------------------------------------------------------


class SimStore:
    """A `Store` over the in-memory rows whose transactions run one at a time
    on the event loop and fail when the seed says so. It yields to the loop
    before each transaction, so moves gathered together interleave the way
    they would on a server. What each commit changed is added to `changes`."""

    def __init__(self, rows: Rows, rng: random.Random, faults: Faults, clock: ManualClock, changes: Changes) -> None:
        self.rows = rows
        self.tables: tuple[Table[Any], ...] = tables_of(())  # the hosted apps' join them (Simulation._start)
        self._rng = rng
        self.faults = faults
        self._clock = clock
        self._changes = changes

    def describe(self) -> str:
        return "sim://memory"

    async def open(self) -> None:
        pass

    async def close(self) -> None:
        pass

    async def transact(self, work: Callable[[Txn], T], deadline: float | None = None, prefetch: Prefetch | None = None) -> T:
        """`deadline` and `prefetch` are ignored: budgets are wall-clock time, which a simulation never reads."""
        await asyncio.sleep(0)
        if self._rng.random() < self.faults.delay:
            self._clock.advance(self._rng.randrange(1, 5_000))
        if self._rng.random() < self.faults.store:
            raise StoreUnavailable("injected: the store did not answer")
        txn, result = attempt(self.rows, work, self.tables)
        if self._rng.random() < self.faults.commit:
            if self._rng.random() < 0.5:
                self._changes.update(txn.commit())
            raise StoreUnavailable("injected: the commit failed; it may have applied")
        self._changes.update(txn.commit())
        return result

    # -- the auditor's `Books`: committed rows, read without faults ----------------------
    # (An app's own tables are read from `rows` by its auditor.)

    def entity(self, entity_id: str) -> Entity | None:
        return self.rows.of(ENTITIES).get(entity_id)

    def all_entities(self) -> Iterable[Entity]:
        return self.rows.of(ENTITIES).values()


# -- the simulation -------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Result:
    seed: int
    steps: int
    trace: str
    failure: str | None = None
    failed_step: int | None = None
    recovered: int = 0  # intents recovery drove forward after a torn crash
    # How often each (method, answer) was seen, as "Book OK" or "Dispatch CARRIER_REFUSED":
    # what a test reads to know that a run reached what it is meant to.
    answers: dict[str, int] = field(default_factory=dict, compare=False)


class Simulation:
    """One seeded world: the store's rows, a process over them, a client, the
    app's workload and its auditor. `workload` is the workload class (or any
    `Client -> Workload`; `load_workload` finds an app's)."""

    def __init__(self, seed: int, faults: Faults = Faults(), *, workload: WorkloadFactory) -> None:
        self.seed = seed
        self.rng = random.Random(seed)
        self.faults = faults
        self.clock = ManualClock()
        self.rows = Rows()
        self.changes = Changes()  # what commits changed since the auditor last looked
        self.step = 0
        self.sent: list[Request] = []  # recent requests, for late (reordered) deliveries
        self.recovered = 0
        self.answers: Counter[str] = Counter()
        self._trace = hashlib.sha256()
        self._background: list[tuple[Request, Outcome]] = []  # the reaper's answers, as they come
        self.workload = workload(self)
        if not isinstance(self.workload, Workload):
            raise TypeError(f"{type(self.workload).__name__} is not a holdfast workload (holdfast.workload.Workload)")
        self._start()

    @property
    def auditor(self) -> Auditor:
        return self.workload.auditor

    def __getattr__(self, name: str) -> Any:
        """The workload's own verbs (`sim.reserve(...)`), for a test that
        drives one step by step (tests/test_properties.py)."""
        workload = self.__dict__.get("workload")
        if workload is None:
            raise AttributeError(name)
        return getattr(workload, name)

    # -- the process -------------------------------------------------------------------

    def _start(self) -> None:
        """A fresh process over the persisted rows: new engine, empty snapshot, nothing in flight."""
        self.store = SimStore(self.rows, random.Random(self.rng.getrandbits(64)), self.faults, self.clock, self.changes)
        self.engine = Engine(self.store, MemorySnapshot(), self.clock)
        hosted = self.workload.host(self.engine, self._observed)
        self.store.tables = tables_of([table for service in hosted for table in type(service).tables])
        self.reaper = Reaper(self.engine, hosted)

    async def restart(self, torn: bool = False) -> None:
        """The process crashed: start over from the store and recover what it left.
        Recovery must finish before serving, so it runs on a store that answers.
        `torn` lets the workload leave a half-done write behind, as a writer
        that persists its intent before its effect would when it dies between the two."""
        if torn:
            self.changes.update(self.workload.tear(self.rows))
        self._start()
        self.store.faults = NO_FAULTS
        self._background.clear()
        self.recovered += await self.reaper.recover()
        self.auditor.now_window_ms = (self.clock.now_ms(), self.clock.now_ms())
        for request, outcome in self._background:
            self._answered(request, outcome)
        self.store.faults = self.faults

    # -- deliveries ----------------------------------------------------------------------

    async def deliver(self, requests: list[Request], lost: list[bool] | None = None) -> list[Outcome | None]:
        """Runs the requests concurrently; answers reach the auditor in the order
        the moves finished, which is the order they ran. `lost[i]` drops a reply."""
        lost = lost or [False] * len(requests)
        finished: list[tuple[int, Outcome]] = []
        earliest_ms = self.clock.now_ms()

        async def one(n: int) -> None:
            finished.append((n, await self.workload.call(requests[n])))

        await asyncio.gather(*(one(n) for n in range(len(requests))))
        self.auditor.now_window_ms = (earliest_ms, self.clock.now_ms())
        answers: list[Outcome | None] = [None] * len(requests)
        for n, outcome in finished:
            answers[n] = None if lost[n] else outcome
            self._answered(requests[n], answers[n])
        self.sent.extend(r for r in requests if r.message is not None)
        del self.sent[:-64]
        return answers

    def _answered(self, request: Request, outcome: Outcome | None) -> None:
        reason = "LOST" if outcome is None else ("OK" if outcome.ok else outcome.reason.name)
        payload = b"" if outcome is None else outcome.payload
        for part in (str(self.step).encode(), request.method.encode(), request.wire(), reason.encode(), payload):
            self._trace.update(len(part).to_bytes(8, "big") + part)
        self.answers[f"{request.method} {reason}"] += 1
        self.auditor.answered(request, outcome)

    def _observed(self, request: Request, outcome: Outcome) -> None:
        self._background.append((request, outcome))

    async def tick(self, delta_ms: int) -> None:
        """Business time passes and the reaper runs one round, as ordinary moves."""
        self.clock.advance(delta_ms)
        round_ms = self.clock.now_ms()
        self._background.clear()
        try:
            await self.reaper.reap()
        except StoreUnavailable:
            round_ms = None  # the round's read failed; the next round reads again
        self.auditor.now_window_ms = (self.clock.now_ms() - delta_ms, self.clock.now_ms())
        for request, outcome in self._background:
            self._answered(request, outcome)
        if round_ms is not None:
            self.auditor.reaped(self.store, round_ms, self.reaper.batch)

    # -- checks ----------------------------------------------------------------------------

    def check(self, requests: Iterable[Request] = ()) -> None:
        """The auditor's invariants over everything this step touched."""
        self.auditor.check(self.store, self.changes.take(), requests)

    def trace(self) -> str:
        return self._trace.hexdigest()

    # -- the seeded run ----------------------------------------------------------------------

    async def run(self, ops: int) -> None:
        for self.step in range(ops):
            await self._one_step()
            if self.step % SWEEP_EVERY == SWEEP_EVERY - 1:
                self.auditor.sweep(self.store)
        self.step = ops
        await self.settle()

    async def settle(self) -> None:
        """The faults stop; the client retries until every answer is known, then
        the whole store must equal what the answers say."""
        self.faults = NO_FAULTS
        await self.restart()
        for _ in range(10):
            pending = list(self.auditor.pending.values())
            if not pending:
                break
            await self.deliver(pending)
        assert not self.auditor.pending, "retries without faults must resolve every key"
        self.check()
        self.auditor.sweep(self.store)

    async def _one_step(self) -> None:
        rng = self.rng
        if rng.random() < 0.08:
            await self.tick(rng.choice((100, 1_000, 10_000, 60_000)))
            self.check()
            return
        requests = [self.workload.request() for _ in range(rng.choice((1, 1, 1, 2, 3)))]
        requests += [r for r in self.auditor.pending.values() if rng.random() < 0.5]
        requests = self._misdeliver(requests)
        crash = rng.random() < self.faults.crash
        lost = [crash or rng.random() < self.faults.lost for _ in requests]
        cut = rng.randrange(len(requests) + 1) if crash else len(requests)
        await self.deliver(requests[:cut], lost[:cut])
        for request in requests[cut:]:  # still on the wire when the process died
            self._answered(request, None)
        if crash:
            await self.restart(torn=rng.random() < 0.5)
        self.check(requests)

    def _misdeliver(self, requests: list[Request]) -> list[Request]:
        rng = self.rng
        if requests and rng.random() < self.faults.duplicate:
            requests.append(rng.choice(requests))
        if rng.random() < self.faults.reorder:
            if self.sent and rng.random() < 0.5:
                requests.append(rng.choice(self.sent))  # an old request, arriving late
            rng.shuffle(requests)
        return requests


# -- entry points ----------------------------------------------------------------------


def load_workload(app: str, built_in: Mapping[str, str] = {}) -> WorkloadFactory:
    """The workload `app` names: an app of `built_in` by its name (the CLI
    hands down holdfast's: `inventory`, `dispatch`), or `MODULE:ATTR`
    importable from the current folder (as `holdfast serve --app` imports a
    team's service) naming an app (a Service subclass, whose `workload`
    names its workload class) or a workload class. ValueError says why not."""
    found = _load(app, _spec(app, built_in))
    if isinstance(found, type) and issubclass(found, Service):
        if found.workload is None:
            raise ValueError(f"--app {app}: {found.__name__} names no workload (its Service.workload is None)")
        found = _load(app, found.workload)
    missing = [name for name in ("host", "request", "call", "tear") if not callable(getattr(found, name, None))]
    if not callable(found) or missing:
        raise ValueError(f"--app {app}: {getattr(found, '__name__', type(found).__name__)} is not a workload class"
                         f" (holdfast.workload.Workload{': it has no ' + ', '.join(missing) if missing else ''})")
    return found  # type: ignore[return-value]


def _spec(app: str, built_in: Mapping[str, str]) -> str:
    """The `MODULE:ATTR` that `app` stands for."""
    if app in built_in:
        return built_in[app]
    if ":" not in app:
        names = f"{' or '.join(built_in)}, or " if built_in else ""
        raise ValueError(f"--app {app}: expected {names}MODULE:ATTR naming an app or a workload class")
    importable_from_here()
    return app


def _load(app: str, spec: str) -> object:
    try:
        return load_attribute(spec)
    except ValueError as error:
        raise ValueError(f"--app {app}: {error}") from None


def run(seed: int, ops: int, faults: Faults = Faults(), *, workload: WorkloadFactory) -> Result:
    """One seeded run; a broken invariant is reported with its step, never raised."""
    simulation = Simulation(seed, faults, workload=workload)
    try:
        asyncio.run(simulation.run(ops))
    except (Violation, AssertionError) as error:
        failure = f"{type(error).__name__}: {error}"
        return Result(seed, simulation.step, simulation.trace(), failure, simulation.step, answers=dict(simulation.answers))
    return Result(seed, ops, simulation.trace(), recovered=simulation.recovered, answers=dict(simulation.answers))


def _parser(built_in: Mapping[str, str], default_app: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="holdfast simulate", description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, required=True, help="the seed every random choice derives from")
    parser.add_argument("--ops", type=int, default=10_000, help="steps to run (default 10000)")
    parser.add_argument("--faults", default="default", help="default | none | name=probability,... (store, commit, delay, lost, duplicate, reorder, crash)")
    by_name = ", ".join(built_in) + (f" (default {default_app})" if default_app else "") + ", or " if built_in else ""
    parser.add_argument(
        "--app", default=default_app, required=default_app is None, metavar="APP",
        help=f"the app to run: {by_name}MODULE:ATTR, an app (a holdfast.Service naming its workload) or a workload"
             " class (holdfast.workload), imported from the current folder",
    )
    return parser


def main(argv: list[str], built_in: Mapping[str, str] = {}, default_app: str | None = None) -> int:
    """`holdfast simulate --seed N [--ops N] [--faults SPEC] [--app APP]`.
    `built_in` are the apps `--app` takes by name and `default_app` the one
    run without `--app`: the CLI hands down holdfast's own."""
    args = _parser(built_in, default_app).parse_args(argv)
    try:
        faults = Faults.parse(args.faults)
        workload = load_workload(args.app, built_in)
    except ValueError as error:
        print(f"holdfast simulate: {error}", file=sys.stderr)
        return 2
    result = run(args.seed, args.ops, faults, workload=workload)
    if result.failure is not None:
        print(f"FAILED seed={result.seed} step={result.failed_step} app={args.app}: {result.failure}")
        print(f"reproduce: holdfast simulate --seed {result.seed} --ops {args.ops} --faults {faults.describe()} --app {args.app}")
        return 1
    print(f"seed={result.seed} ops={result.steps} app={args.app} faults={faults.describe()} trace={result.trace}")
    return 0
