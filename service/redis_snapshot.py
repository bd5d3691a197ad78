"""The shared snapshot in Redis or Redis Cluster (`redis://HOST:PORT[/DB]`,
`redis+cluster://HOST:PORT`): every instance reads and advances the same
versions (the interface and its contract: holdfast.snapshot).

Keys. One key per entity, `holdfast:v:{<entity_id>}`, its value the
version as a decimal string. DESIGN.md says "hash-tagged by SKU", but the
engine knows only the reservation id when it double-checks a move (Confirm
and Release carry no SKU), and every script here touches exactly one key, so
tagging by the reservation id puts everything a script touches in one Cluster
slot just the same.

Round trips. `version()` is one read before the store transaction,
`advance()` one script call after it. Concurrent calls of each (many moves in flight, or
the store's group commit finishing several at once) are coalesced: the first
one opens a batch, the batch is sent as one pipeline on the next turn of the
event loop, and every caller in it waits for that one answer: an MGET and
one EVALSHA over every key on plain Redis; on Cluster, where a command must
stay in one slot, a pipeline of single-key GETs and single-key EVALSHAs. A
redis-py round trip costs the client far more CPU than Redis spends on the
command (measured: 32 GETs pipelined ~450 µs, one MGET of 32 ~120 µs of
client CPU, with hiredis), so this is what lets a busy instance keep up. Merging
keeps the highest version per entity, which is what the script would keep
anyway. Lua numbers are doubles: versions are exact up to 2**53.

Degradation. Redis is advisory, so no Redis failure fails a move: `version()`
answers None (unknown), `advance()` and `reset()` drop the write, and each such
call is counted (holdfast_snapshot_degradations_total). Sockets time out after
250 ms, and after the first failure the snapshot stops calling Redis at all:
a background task PINGs it every 200 ms instead of every move paying the
timeout.

Recovery. Writes were dropped while Redis was away, so the snapshot is stale
and `version()` keeps answering None (never a check against stale data) until
the background task has rebuilt it from the store: it replays every
(reservation, version) page from `rebuild_from()` through the same
forward-only script, so moves that keep writing meanwhile are never rolled
back. Writes go to Redis again as soon as it answers (before the rebuild
reads the store), so nothing committed after the rebuild starts can be
missed; any failure during the rebuild starts it over. `open()` rebuilds too
when Redis answers: the previous process may have died mid-outage, and Redis
may have restarted from an old RDB file. A stale entry that slips through
anyway (Redis restarting between two of our calls) costs one compensation,
never a wrong write: the store compares the exact version inside its
transaction.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Collection, Mapping
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from redis.asyncio import Redis
from redis.asyncio.cluster import RedisCluster
from redis.backoff import NoBackoff
from redis.exceptions import NoScriptError, RedisClusterException, RedisError
from redis.retry import Retry

from holdfast import metrics
from holdfast.redaction import redact_url, scrub, secrets_of
from holdfast.snapshot import VersionPages

log = logging.getLogger("holdfast")

SCHEMES = ("redis", "rediss", "redis+cluster", "rediss+cluster")
URL_FORMS = "expected redis://HOST:PORT[/DB] or redis+cluster://HOST:PORT"


def snapshot_key(entity: str) -> str:
    """The one key of a reservation; the braces make it the Cluster hash tag."""
    return f"holdfast:v:{{{entity}}}"


# KEYS[i]  snapshot_key(reservation_id) of entry i: the stored version, a
#          decimal string (absent = unknown, read as 0)
# ARGV[i]  the version just committed for KEYS[i], an integer > 0
# returns  per entry, 1 if this very call moved it forward (it now holds
#          ARGV[i]), 0 if it already held ARGV[i] or more (nothing written),
#          so a client-side retry of an applied call is told apart from a
#          first write
# One call advances every entry of a batch on plain Redis; on Cluster each
# call names one key, so that every call stays in one slot.
ADVANCE_LUA = """
local applied = {}
for i, key in ipairs(KEYS) do
  local stored = tonumber(redis.call('GET', key) or '0')
  local wanted = tonumber(ARGV[i])
  if wanted > stored then
    redis.call('SET', key, ARGV[i])
    applied[i] = 1
  else
    applied[i] = 0
  end
end
return applied
"""

# Short, so a dead or hung Redis costs a move at most this much, once.
SOCKET_TIMEOUT_S = 0.25
# How often a degraded snapshot asks whether Redis is back.
PROBE_INTERVAL_S = 0.2
# Keys per DEL when the store pruned their entities.
FORGET_CHUNK = 500
# Entries per pipeline while rebuilding, so one page never builds one huge reply.
REBUILD_CHUNK = 500

# Whatever Redis (or the socket under it) can throw at a call: all of it
# degrades, none of it fails a move. TimeoutError is an OSError; redis-py's
# "no reachable cluster node" is not a RedisError.
_REDIS_FAILURES = (RedisError, RedisClusterException, OSError)


def _outage(error: BaseException) -> bool:
    """Whether an error is Redis (or its socket) failing, not a bug. On
    uvloop a write to a connection Redis has just closed raises RuntimeError
    ("... the handler is closed") where asyncio raises ConnectionError
    (MagicStack/uvloop#506); redis-py reconnects on the next call either way."""
    if isinstance(error, _REDIS_FAILURES):
        return True
    return isinstance(error, RuntimeError) and "the handler is closed" in str(error)


class RedisSnapshot:
    """The shared snapshot in Redis or Redis Cluster. See the module docstring
    for keys, round trips, degradation and recovery."""

    def __init__(self, client: Redis | RedisCluster, url: str) -> None:
        self.client = client
        self._cluster = isinstance(client, RedisCluster)
        self.advance_script = client.register_script(ADVANCE_LUA)
        self._url = url
        self._rebuild_from: VersionPages | None = None
        # Up: reachable and trusted. Rebuilding: reachable, not trusted yet.
        # Down: neither; only the recovery task talks to Redis.
        self._reachable = False
        self._trusted = False
        self._failures = 0  # bumped on every failure, so a rebuild knows it raced one
        self._lost = asyncio.Event()
        self._recovery: asyncio.Task[None] | None = None
        self._batch: dict[str, int] | None = None
        self._batch_done: asyncio.Future[None] | None = None
        self._batch_callers = 0
        self._reads: set[str] | None = None
        # Each entity's stored value, or None when the read failed (degraded).
        self._reads_done: asyncio.Future[dict[str, Any] | None] | None = None
        self._flushes: set[asyncio.Task[None]] = set()

    @classmethod
    def from_url(cls, url: str, expected: str = URL_FORMS) -> RedisSnapshot:
        """A snapshot over `redis://HOST:PORT[/DB]` or `redis+cluster://HOST:PORT`
        (any node of the cluster); `expected` ends each refusal of a bad URL.
        Connects nothing yet: `open()` does. Socket options may ride in the
        query string (`?socket_timeout=0.5`)."""
        scheme, _, rest = url.partition("://")
        if scheme not in SCHEMES or not rest:
            raise ValueError(f"unsupported snapshot URL {redact_url(url)!r} ({expected})")
        try:
            parts = urlsplit(url)
            parts.port  # noqa: B018  (raises on a port that is not a number)
        except ValueError as error:
            raise ValueError(f"bad snapshot URL {redact_url(url)!r}: {scrub(str(error), secrets_of(url))} ({expected})") from None
        if not parts.hostname:
            raise ValueError(f"snapshot URL {redact_url(url)!r} names no host ({expected})")
        options: dict[str, Any] = dict(
            socket_timeout=SOCKET_TIMEOUT_S,
            socket_connect_timeout=SOCKET_TIMEOUT_S,
            retry=Retry(NoBackoff(), 0),  # our own recovery replaces redis-py's retries
        )
        database = parts.path.lstrip("/")
        if database and not database.isdigit():
            raise ValueError(f"bad snapshot URL {redact_url(url)!r}: the database is a number, not {database!r} ({expected})")
        cluster = scheme.endswith("+cluster")
        if cluster and parts.path not in ("", "/", "/0"):
            raise ValueError(f"snapshot URL {redact_url(url)!r} names a database, but Redis Cluster has only database 0")
        client: Redis | RedisCluster
        try:
            if cluster:
                client = RedisCluster.from_url(url.replace("+cluster://", "://", 1), **options)
            else:
                client = Redis.from_url(url, **options)
        except ValueError as error:
            raise ValueError(f"bad snapshot URL {redact_url(url)!r}: {scrub(str(error), secrets_of(url))} ({expected})") from None
        return cls(client, url)

    @property
    def degraded(self) -> bool:
        """True while `version()` answers None because the snapshot is not trusted."""
        return not self._trusted

    def describe(self) -> str:
        return _without_password(self._url)

    # -- lifecycle: open, then moves (version, advance, reset), then close --

    async def open(self, rebuild_from: VersionPages) -> None:
        """Registers the script, rebuilds from the store, starts recovery.
        A Redis that does not answer is not an error: the snapshot starts
        degraded and the recovery task rebuilds it when Redis comes."""
        self._rebuild_from = rebuild_from
        self._recovery = asyncio.create_task(self._recover(), name=f"snapshot recovery {self.describe()}")
        try:
            await self.client.script_load(ADVANCE_LUA)
            self._reachable = True
            await self._rebuild()
        except Exception as error:
            if not _outage(error):
                raise
            self._fail(error)
        else:
            self._trust()

    async def version(self, entity: str) -> int | None:
        """Joins the reads that the next turn of the event loop sends as one pipeline."""
        if not self._trusted:
            metrics.SNAPSHOT_DEGRADATIONS.inc()
            return None
        if self._reads is None:
            self._reads, self._reads_done = set(), asyncio.get_running_loop().create_future()
            self._track(asyncio.create_task(self._read_all()))
        reads, done = self._reads, self._reads_done
        assert done is not None, "a batch of reads is opened with its future"
        reads.add(entity)
        # Shielded: the reads are shared, one caller's cancellation must not cancel the others'.
        found = await asyncio.shield(done)
        if found is None:  # the pipeline failed: degraded
            metrics.SNAPSHOT_DEGRADATIONS.inc()
            return None
        raw = found[entity]
        if raw is None:
            return None
        version = int(raw)
        # 0 is legal: a compensation for a reservation the store does not hold.
        assert version >= 0, f"snapshot holds version {version} for {entity}"
        return version

    async def advance(self, versions: Mapping[str, int]) -> None:
        """Joins the batch that the next turn of the event loop sends."""
        if not versions:
            return
        if not self._reachable:
            metrics.SNAPSHOT_DEGRADATIONS.inc()
            return
        if self._batch is None:
            self._batch, self._batch_done, self._batch_callers = {}, asyncio.get_running_loop().create_future(), 0
            self._track(asyncio.create_task(self._flush()))
        batch, done = self._batch, self._batch_done
        assert done is not None, "a batch is opened with its future"
        for entity, version in versions.items():
            assert version > 0, f"advancing {entity} to version {version}"
            batch[entity] = max(version, batch.get(entity, 0))
        self._batch_callers += 1
        # Shielded: the batch is shared, one caller's cancellation (its
        # deadline) must not cancel the others' write.
        await asyncio.shield(done)

    async def reset(self, entity: str, version: int) -> None:
        assert version >= 0, f"resetting {entity} to version {version}"
        if not self._reachable:
            metrics.SNAPSHOT_DEGRADATIONS.inc()
            return
        try:
            await self.client.set(snapshot_key(entity), version)
        except Exception as error:
            if not _outage(error):
                raise
            self._fail(error)
            metrics.SNAPSHOT_DEGRADATIONS.inc()

    async def forget(self, entities: Collection[str]) -> None:
        """DEL of the entities' keys, FORGET_CHUNK to a command (on Cluster,
        redis-py splits each by slot). Dropped while Redis is away: a stale
        entry of a pruned row is never checked (holdfast.snapshot)."""
        if not entities or not self._reachable:
            return
        keys = [snapshot_key(entity) for entity in entities]
        try:
            for start in range(0, len(keys), FORGET_CHUNK):
                await self.client.delete(*keys[start : start + FORGET_CHUNK])
        except Exception as error:
            if not _outage(error):
                raise
            self._fail(error)
            metrics.SNAPSHOT_DEGRADATIONS.inc()

    async def close(self) -> None:
        if self._recovery is not None:
            self._recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recovery
            self._recovery = None
        # Writes already committed in the store: let them land (each is
        # bounded by the socket timeout) rather than drop them.
        await asyncio.gather(*self._flushes, return_exceptions=True)
        await self.client.aclose()

    # -- reading: the batch of GETs --

    async def _read_all(self) -> None:
        entities, done = self._reads, self._reads_done
        assert entities and done is not None
        self._reads, self._reads_done = None, None
        order = list(entities)
        keys = [snapshot_key(entity) for entity in order]
        try:
            # One MGET on plain Redis; on Cluster, one GET per key, pipelined per node.
            if isinstance(self.client, RedisCluster):
                values = await self.client.mget_nonatomic(keys)
            else:
                values = await self.client.mget(keys)
        except asyncio.CancelledError:
            done.cancel()
            raise
        except Exception as error:
            if _outage(error):
                self._fail(error)
                done.set_result(None)
            else:  # a bug, not an outage: every caller sees it
                done.set_exception(error)
        else:
            done.set_result(dict(zip(order, values)))

    def _track(self, task: asyncio.Task[None]) -> None:
        """Keeps a batch's task alive until it is done; close() waits for them."""
        self._flushes.add(task)
        task.add_done_callback(self._flushes.discard)

    # -- writing: the batch, and the pipeline every write goes through --

    async def _flush(self) -> None:
        versions, done, callers = self._batch, self._batch_done, self._batch_callers
        assert versions and done is not None and callers > 0
        self._batch, self._batch_done = None, None
        try:
            await self._advance_all(versions)
        except asyncio.CancelledError:
            done.cancel()
            raise
        except Exception as error:
            if not _outage(error):  # a bug: every caller sees it
                done.set_exception(error)
                return
            self._fail(error)  # an outage: every caller's write is dropped
            metrics.SNAPSHOT_DEGRADATIONS.inc(callers)
        done.set_result(None)

    async def _advance_all(self, versions: Mapping[str, int]) -> list[int]:
        """The advance script over every entry: one EVALSHA on plain Redis,
        one pipeline of single-key EVALSHAs on Cluster. After a NOSCRIPT
        (Redis restarted, SCRIPT FLUSH, a new Cluster node) loads the script
        and sends again what was refused. Returns 1/0 per entry."""
        entities = list(versions)
        if not self._cluster:
            keys = [snapshot_key(e) for e in entities]
            args = [versions[e] for e in entities]
            answered: list[int]
            try:
                answered = await self.client.evalsha(self.advance_script.sha, len(keys), *keys, *args)
            except NoScriptError:
                self.advance_script.sha = await self.client.script_load(ADVANCE_LUA)
                answered = await self.client.evalsha(self.advance_script.sha, len(keys), *keys, *args)
            return answered
        applied = await self._evalsha_pipeline([(snapshot_key(e), versions[e]) for e in entities])
        refused = [i for i, result in enumerate(applied) if isinstance(result, NoScriptError)]
        if refused:
            self.advance_script.sha = await self.client.script_load(ADVANCE_LUA)
            retried = await self._evalsha_pipeline([(snapshot_key(entities[i]), versions[entities[i]]) for i in refused])
            for i, result in zip(refused, retried):
                applied[i] = result
        for result in applied:
            if isinstance(result, Exception):
                raise result
        return [result[0] for result in applied]

    async def _evalsha_pipeline(self, calls: list[tuple[str, int]]) -> list[Any]:
        # execute_command, not pipe.evalsha: the Cluster pipeline blocks the
        # evalsha method by name, yet routes a raw EVALSHA by its one key.
        # Not Script.__call__ either: in a plain pipeline it costs an extra
        # SCRIPT EXISTS round trip on every execute.
        pipe = self.client.pipeline(transaction=False)
        for key, version in calls:
            pipe.execute_command("EVALSHA", self.advance_script.sha, 1, key, version)
        return await pipe.execute(raise_on_error=False)

    # -- degradation and recovery --

    def _fail(self, error: BaseException) -> None:
        self._failures += 1
        if self._reachable or not self._lost.is_set():  # once per outage, not per call
            log.warning("snapshot %s degraded, moves continue on the store's checks alone: %s: %s",
                        self.describe(), type(error).__name__, scrub(str(error), secrets_of(self._url)))
        self._reachable = self._trusted = False
        self._lost.set()
        metrics.SNAPSHOT_DEGRADED.set(1)

    def _trust(self) -> None:
        self._trusted = True
        self._lost.clear()
        metrics.SNAPSHOT_DEGRADED.set(0)

    async def _recover(self) -> None:
        """While degraded: PING every PROBE_INTERVAL_S; once Redis answers,
        take writes again, rebuild, and trust the snapshot if no failure
        raced the rebuild (otherwise a write may be missing: start over)."""
        while True:
            await self._lost.wait()
            await asyncio.sleep(PROBE_INTERVAL_S)
            try:
                await self.client.ping()
            except Exception as error:
                if not _outage(error):
                    raise
                continue
            failures = self._failures
            self._reachable = True
            try:
                await self._rebuild()
            except Exception as error:
                if _outage(error):
                    self._fail(error)
                else:  # the store failed to page; Redis is fine, try again later
                    log.exception("snapshot %s rebuild could not read the store", self.describe())
                continue
            if self._failures == failures:
                self._trust()
                log.info("snapshot %s rebuilt from the store and trusted again", self.describe())

    async def _rebuild(self) -> None:
        assert self._rebuild_from is not None
        async for page in self._rebuild_from():
            entries = list(page.items())
            for start in range(0, len(entries), REBUILD_CHUNK):
                await self._advance_all(dict(entries[start : start + REBUILD_CHUNK]))
        metrics.SNAPSHOT_REBUILDS.inc()


def _without_password(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    host = parts.hostname or ""
    if ":" in host:
        host = f"[{host}]"
    netloc = f"{parts.username}@{host}" if parts.username else host
    if parts.port is not None:
        netloc = f"{netloc}:{parts.port}"
    return urlunsplit(parts._replace(netloc=netloc))
