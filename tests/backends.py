"""Real PostgreSQL and Redis for the suites: a pytest plugin (see conftest.py).

Every server here is started lazily, the first time a test asks for it, on
127.0.0.1 only, on a free port, with all its files in a temporary folder; it
is stopped and its folder removed at the end of the session (fixture
teardown, and `atexit` as a second line of defence, so failing tests or an
interrupted session leave nothing running).

Fixtures (the names are a contract other suites code against):

=========================  ========  ===============================================
fixture                    scope     value
=========================  ========  ===============================================
``postgres_server``        session   admin URL ``postgresql://postgres@127.0.0.1:P/postgres``
``postgres_url``           function  URL of a fresh, empty database (dropped afterwards)
``redis_server``           session   ``redis://127.0.0.1:P/0``
``redis_url``              function  the same URL, after a FLUSHALL
``redis_cluster_server``   session   ``redis+cluster://127.0.0.1:P`` (a seed node of 3 masters)
``redis_cluster_url``      function  the same URL, after every master was flushed
``private_redis``          function  a `RedisServer` of the test's own (kill / restart it)
``private_redis_cluster``  function  a `RedisClusterServer` of the test's own
``private_postgres``       function  a `PostgresServer` of the test's own (stop / start / kill it)
=========================  ========  ===============================================

Servers a user already runs can stand in for the shared ones:

* ``HOLDFAST_TEST_POSTGRES``      libpq URL of a superuser (or CREATEDB role), e.g.
  ``postgresql://postgres@127.0.0.1:5432/postgres``
* ``HOLDFAST_TEST_REDIS``         ``redis://host:port/db`` (that database is flushed per test)
* ``HOLDFAST_TEST_REDIS_CLUSTER`` ``redis+cluster://host:port`` (every master is flushed per test)

The private fixtures always start local servers, so they need the binaries
(`make test` installs them, see tests/ensure-packages.sh). PostgreSQL's are
looked for in ``HOLDFAST_PG_BINDIR``, then Debian's /usr/lib/postgresql/*/bin,
then PATH. PostgreSQL refuses to run as root: when the tests run as root its
processes run as the ``postgres`` user.
"""

from __future__ import annotations

import atexit
import itertools
import os
import pwd
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Iterator
from urllib.parse import urlsplit, urlunsplit

import pytest

from tests.process import free_port

POSTGRES_ENV = "HOLDFAST_TEST_POSTGRES"
REDIS_ENV = "HOLDFAST_TEST_REDIS"
REDIS_CLUSTER_ENV = "HOLDFAST_TEST_REDIS_CLUSTER"

START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 30.0
PORT_ATTEMPTS = 5

# ---------------------------------------------------------------------------
# Bookkeeping: everything started is closed at exit, whatever happened.

_LIVE: dict[int, "_Closable"] = {}
_LIVE_LOCK = threading.RLock()
_OWNER_PID = os.getpid()  # a forked child must not stop its parent's servers


class _Closable:
    def close(self) -> None:  # pragma: no cover - overridden
        raise NotImplementedError

    def _track(self) -> None:
        _install_sigterm_handler()
        with _LIVE_LOCK:
            _LIVE[id(self)] = self

    def _untrack(self) -> None:
        with _LIVE_LOCK:
            _LIVE.pop(id(self), None)


def close_all() -> None:
    """Stops every server this module started and removes its folder."""
    if os.getpid() != _OWNER_PID:
        return
    with _LIVE_LOCK:
        live = list(_LIVE.values())
    for thing in reversed(live):
        try:
            thing.close()
        except Exception:  # noqa: BLE001 - best effort at exit
            pass


atexit.register(close_all)


def _on_sigterm(signum, frame) -> None:
    close_all()
    signal.signal(signum, signal.SIG_DFL)
    os.kill(os.getpid(), signum)


def _install_sigterm_handler() -> None:
    """A CI timeout sends SIGTERM first, and atexit does not run on SIGTERM:
    once a server is started, SIGTERM stops the servers, then the process."""
    if os.getpid() == _OWNER_PID and threading.current_thread() is threading.main_thread() \
            and signal.getsignal(signal.SIGTERM) is signal.SIG_DFL:
        signal.signal(signal.SIGTERM, _on_sigterm)


def _mkdtemp(prefix: str) -> Path:
    return Path(tempfile.mkdtemp(prefix=prefix))


class _TempDir(_Closable):
    """A temporary folder removed at close (or at exit)."""

    def __init__(self, prefix: str) -> None:
        self.root = _mkdtemp(prefix)
        self._track()

    def close(self) -> None:
        shutil.rmtree(self.root, ignore_errors=True)
        self._untrack()


def _tail(path: Path, lines: int = 30) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return f"(no {path})"


def _address_in_use(text: str) -> bool:
    return "Address already in use" in text or "could not bind" in text.lower()


# ---------------------------------------------------------------------------
# PostgreSQL


def postgres_bindir() -> Path:
    """The folder holding initdb, pg_ctl and postgres (newest major version)."""
    configured = os.environ.get("HOLDFAST_PG_BINDIR")
    if configured:
        return Path(configured)
    candidates = []
    for initdb in Path("/usr/lib/postgresql").glob("*/bin/initdb"):
        try:
            candidates.append((float(initdb.parent.parent.name), initdb.parent))
        except ValueError:
            continue
    if candidates:
        return max(candidates)[1]
    initdb = shutil.which("initdb")
    if initdb:
        return Path(initdb).resolve().parent
    raise RuntimeError(
        "PostgreSQL binaries not found (initdb, pg_ctl): run `make test` "
        "(tests/ensure-packages.sh installs them), set HOLDFAST_PG_BINDIR, "
        f"or point {POSTGRES_ENV} at a running server"
    )


def _group_alive(pgid: int) -> bool:
    """Whether a process of group `pgid` still runs (zombies, awaiting their
    reaper, hold no shared memory and do not count)."""
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[2]) == pgid and fields[0] not in ("Z", "X"):
            return True
    return False


def _postgres_user() -> dict:
    """subprocess arguments that run a PostgreSQL program as a non-root user."""
    if os.geteuid() != 0:
        return {}
    try:
        entry = pwd.getpwnam("postgres")
    except KeyError:
        raise RuntimeError("running as root, but there is no `postgres` user to run PostgreSQL as") from None
    return {"user": entry.pw_uid, "group": entry.pw_gid, "extra_groups": []}


def _chown_to_postgres(path: Path) -> None:
    kwargs = _postgres_user()
    if kwargs:
        os.chown(path, kwargs["user"], kwargs["group"])


def _pg_run(args: list[str], cwd: Path, timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run(
        args, cwd=cwd, stdin=subprocess.DEVNULL, capture_output=True, text=True,
        timeout=timeout, env={**os.environ, "LC_ALL": "C"}, **_postgres_user(),
    )


def initdb(data: Path, bindir: Path | None = None) -> None:
    """A new cluster in `data` (its parent must be writable by the server's user)."""
    bindir = bindir or postgres_bindir()
    result = _pg_run(
        [str(bindir / "initdb"), "-D", str(data), "-U", "postgres", "-A", "trust",
         "-E", "UTF8", "--locale=C", "--no-sync", "--no-instructions"],
        cwd=data.parent, timeout=120,
    )
    if result.returncode != 0:
        raise RuntimeError(f"initdb failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    with open(data / "postgresql.conf", "a") as conf:
        # The instance settings live in their own file, rewritten on a port change.
        conf.write("\ninclude_if_exists = 'holdfast.conf'\n")


class PostgresServer(_Closable):
    """A PostgreSQL cluster in its own temporary folder, on 127.0.0.1:`port`.

    `stop()` / `start()` keep the data directory and the port; `kill()` is a
    crash (SIGKILL to the postmaster and its children); `close()` stops it
    and removes the folder.
    """

    def __init__(self, root: Path, bindir: Path, port: int | None = None,
                 max_connections: int = 200) -> None:
        self.root = root
        self.bindir = bindir
        self.data = root / "data"
        self.socket_dir = root / "sock"
        self.log = root / "postgres.log"
        self.port = port or free_port()
        self._auto_port = port is None
        self.max_connections = max_connections
        self.proc: subprocess.Popen | None = None

    # -- creation ----------------------------------------------------------

    @classmethod
    def create(cls, template: Path | None = None, port: int | None = None,
               max_connections: int = 200) -> "PostgresServer":
        """initdb (or a copy of an initdb'd `template` data dir), then start."""
        bindir = postgres_bindir()
        root = _mkdtemp("holdfast-pg-")
        server = cls(root, bindir, port, max_connections)
        server._track()
        try:
            _chown_to_postgres(root)
            server.socket_dir.mkdir()
            _chown_to_postgres(server.socket_dir)
            if template is not None:
                # cp -a keeps the owner (postgres) and the 0700 mode.
                subprocess.run(["cp", "-a", str(template), str(server.data)], check=True)
            else:
                initdb(server.data, bindir)
            server._write_conf()
            server.start()
        except BaseException:
            server.close()
            raise
        return server

    def _write_conf(self) -> None:
        conf = self.data / "holdfast.conf"
        conf.write_text(
            "listen_addresses = '127.0.0.1'\n"
            f"port = {self.port}\n"
            f"unix_socket_directories = '{self.socket_dir}'\n"
            f"max_connections = {self.max_connections}\n"
            "logging_collector = off\n"
        )
        _chown_to_postgres(conf)

    # -- URLs --------------------------------------------------------------

    @property
    def url(self) -> str:
        """Admin URL (superuser `postgres`, database `postgres`)."""
        return self.url_for("postgres")

    def url_for(self, dbname: str) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{dbname}"

    # -- control -----------------------------------------------------------

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Starts it on the same data dir and port; returns once it accepts connections.

        The postmaster is a child of this process (not pg_ctl's, which would
        orphan it): so a kill is reaped at once and the next start does not
        find a zombie's pid in postmaster.pid. It runs in a session of its own
        (its pgid is its pid), which is how `kill()` reaches the backends.
        """
        if self.running():
            return
        for attempt in range(PORT_ATTEMPTS if self._auto_port else 1):
            size = self.log.stat().st_size if self.log.exists() else 0
            with open(self.log, "ab") as log:
                self.proc = subprocess.Popen(
                    [str(self.bindir / "postgres"), "-D", str(self.data)],
                    cwd=self.root, stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                    env={**os.environ, "LC_ALL": "C"}, start_new_session=True,
                    **_postgres_user(),
                )
            deadline = time.monotonic() + timeout
            while self.proc.poll() is None and time.monotonic() < deadline:
                if self._status() == "ready":
                    self._auto_port = False  # from now on, always the same port
                    return
                time.sleep(0.01)
            self.kill()
            log = self.log.read_text(errors="replace")[size:] if self.log.exists() else ""
            if _address_in_use(log) and attempt + 1 < PORT_ATTEMPTS and self._auto_port:
                self.port = free_port()
                self._write_conf()
                continue
            raise RuntimeError(
                f"PostgreSQL did not start on 127.0.0.1:{self.port} within {timeout} s "
                f"(exit code {self.proc.returncode}):\n--- {self.log}\n{log[-4000:]}"
            )

    def _status(self) -> str | None:
        """The postmaster's own status line in postmaster.pid (what pg_ctl -w reads)."""
        try:
            lines = (self.data / "postmaster.pid").read_text().split("\n")
        except OSError:
            return None
        if len(lines) < 8 or self.proc is None or lines[0].strip() != str(self.proc.pid):
            return None
        return lines[7].strip()

    def stop(self, mode: str = "fast", timeout: float = STOP_TIMEOUT_S) -> None:
        """pg_ctl stop -m `mode` (fast by default); a no-op when not running."""
        if not self.running():
            return
        result = _pg_run([str(self.bindir / "pg_ctl"), "-D", str(self.data), "-m", mode,
                          "-w", "-t", str(int(timeout)), "stop"],
                         cwd=self.root, timeout=timeout + 10)
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            raise RuntimeError(f"pg_ctl stop failed:\n{result.stdout}{result.stderr}") from None

    def restart(self) -> None:
        self.stop()
        self.start()

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """A crash: SIGKILL to the postmaster and every backend (its process group)."""
        if self.proc is None:
            return
        pid = self.proc.pid
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        self.proc.wait(STOP_TIMEOUT_S)
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while _group_alive(pid) and time.monotonic() < deadline:
            time.sleep(0.01)

    def close(self) -> None:
        try:
            try:
                self.stop(mode="fast", timeout=15)
            except Exception:  # noqa: BLE001
                pass
            self.kill()
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            self._untrack()

    # -- databases ---------------------------------------------------------

    def create_database(self, name: str) -> str:
        create_database(self.url, name)
        return self.url_for(name)

    def __repr__(self) -> str:
        return f"<PostgresServer 127.0.0.1:{self.port} {self.root}>"


def _with_dbname(url: str, dbname: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{dbname}"))


def _connect_admin(url: str):
    import psycopg

    return psycopg.connect(url, autocommit=True, connect_timeout=10)


def create_database(admin_url: str, name: str) -> None:
    from psycopg import sql

    with _connect_admin(admin_url) as conn:
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))


def drop_database(admin_url: str, name: str) -> None:
    from psycopg import sql

    with _connect_admin(admin_url) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


_DB_COUNTER = itertools.count(1)


# ---------------------------------------------------------------------------
# Redis


def _redis_binary(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(
            f"{name} not found: run `make test` (tests/ensure-packages.sh installs it) "
            f"or point {REDIS_ENV} / {REDIS_CLUSTER_ENV} at running servers"
        )
    return path


def _ping(port: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    """PING over a bare socket (no client library retries or back-off)."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def _served_by(port: int, pid: int, host: str = "127.0.0.1", timeout: float = 0.5) -> bool:
    """Whether the redis-server answering on `port` is process `pid`: two
    servers handed the same free port would otherwise both seem started
    (the second's PING reaches the first), as a cluster of three nodes on
    two ports once did in CI."""
    try:
        with socket.create_connection((host, port), timeout=timeout) as sock:
            sock.sendall(b"INFO server\r\n")
            answer = b""
            while b"process_id:" not in answer or not answer.split(b"process_id:", 1)[1].count(b"\r\n"):
                chunk = sock.recv(4096)
                if not chunk:
                    return False
                answer += chunk
    except OSError:
        return False
    return int(answer.split(b"process_id:", 1)[1].split(b"\r\n", 1)[0]) == pid


class RedisServer(_Closable):
    """redis-server as a child process on 127.0.0.1:`port`, no persistence.

    `kill()` is SIGKILL, `stop()` a SIGTERM shutdown, `restart()` starts it
    again on the same port (empty: nothing is persisted; a cluster node keeps
    its nodes.conf, so it rejoins its cluster with its slots).
    """

    def __init__(self, root: Path | None = None, port: int | None = None,
                 cluster: bool = False) -> None:
        self._own_root = root is None
        self.root = root or _mkdtemp("holdfast-redis-")
        self.port = port or free_port()
        self._auto_port = port is None
        self.cluster = cluster
        self.cluster_port = free_port() if cluster else None
        self.proc: subprocess.Popen | None = None
        self._track()

    @property
    def log(self) -> Path:
        return self.root / f"redis-{self.port}.log"

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def _args(self) -> list[str]:
        args = [
            _redis_binary("redis-server"),
            "--bind", "127.0.0.1", "--port", str(self.port),
            "--save", "", "--appendonly", "no",
            "--dir", str(self.root), "--logfile", str(self.log),
            "--daemonize", "no", "--enable-debug-command", "local",
        ]
        if self.cluster:
            args += [
                "--cluster-enabled", "yes",
                "--cluster-config-file", f"nodes-{self.port}.conf",
                "--cluster-port", str(self.cluster_port),
                "--cluster-node-timeout", "2000",
            ]
        return args

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        """Starts it and returns once it answers PING."""
        if self.running():
            return
        for attempt in range(PORT_ATTEMPTS if self._auto_port else 1):
            size = self.log.stat().st_size if self.log.exists() else 0
            self.proc = subprocess.Popen(
                self._args(), cwd=self.root, stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
            )
            deadline = time.monotonic() + timeout
            while time.monotonic() < deadline:
                if self.proc.poll() is not None:
                    break
                if _ping(self.port) and _served_by(self.port, self.proc.pid):
                    self._auto_port = False
                    return
                time.sleep(0.01)
            else:
                self.kill()
                raise RuntimeError(f"redis-server did not answer on 127.0.0.1:{self.port} "
                                   f"within {timeout} s:\n{_tail(self.log)}")
            log = self.log.read_text(errors="replace")[size:] if self.log.exists() else ""
            if _address_in_use(log) and self._auto_port and attempt + 1 < PORT_ATTEMPTS:
                self.port = free_port()
                if self.cluster:
                    self.cluster_port = free_port()
                continue
            raise RuntimeError(f"redis-server exited with {self.proc.returncode} "
                               f"on 127.0.0.1:{self.port}:\n{log[-4000:]}")

    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self) -> None:
        """SIGKILL; safe to call on a stopped server."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(STOP_TIMEOUT_S)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> None:
        """SIGTERM (a clean shutdown), SIGKILL if it takes longer than `timeout`."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self, timeout: float = START_TIMEOUT_S) -> None:
        """Kills it (if running) and starts it again on the same port."""
        self.kill()
        self.start(timeout)

    def client(self, **kwargs):
        """A synchronous redis-py client of this server."""
        import redis

        return redis.Redis(host="127.0.0.1", port=self.port, **kwargs)

    def close(self) -> None:
        try:
            self.kill()
        finally:
            if self._own_root:
                shutil.rmtree(self.root, ignore_errors=True)
            self._untrack()

    def __repr__(self) -> str:
        return f"<RedisServer 127.0.0.1:{self.port}>"


def _cluster_info(port: int, host: str = "127.0.0.1") -> dict[str, str]:
    import redis

    with redis.Redis(host=host, port=port, socket_timeout=2, socket_connect_timeout=2,
                     decode_responses=True) as client:
        text = client.execute_command("CLUSTER INFO")
    if isinstance(text, dict):
        return {k: str(v) for k, v in text.items()}
    return dict(line.split(":", 1) for line in text.splitlines() if ":" in line)


class RedisClusterServer(_Closable):
    """`masters` cluster-enabled redis-servers joined by `redis-cli --cluster create`."""

    def __init__(self, masters: int = 3) -> None:
        self.root = _mkdtemp("holdfast-redis-cluster-")
        self.nodes = [RedisServer(self.root, cluster=True) for _ in range(masters)]
        # Each node's ports were free when it was made, but not reserved: the
        # system may hand one port out twice. Nodes pick again until distinct.
        taken: set[int] = set()
        for node in self.nodes:
            while node.port in taken or node.cluster_port in taken or node.port == node.cluster_port:
                node.port, node.cluster_port = free_port(), free_port()
            taken |= {node.port, node.cluster_port}
        self._track()

    @property
    def url(self) -> str:
        return f"redis+cluster://127.0.0.1:{self.nodes[0].port}"

    @property
    def ports(self) -> list[int]:
        return [node.port for node in self.nodes]

    @classmethod
    def create(cls, masters: int = 3) -> "RedisClusterServer":
        cluster = cls(masters)
        try:
            cluster.start()
        except BaseException:
            cluster.close()
            raise
        return cluster

    def start(self, timeout: float = START_TIMEOUT_S) -> None:
        for node in self.nodes:
            node.start()
        result = subprocess.run(
            [_redis_binary("redis-cli"), "--cluster", "create",
             *(f"127.0.0.1:{port}" for port in self.ports),
             "--cluster-replicas", "0", "--cluster-yes"],
            stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=timeout,
        )
        if result.returncode != 0:
            raise RuntimeError(f"redis-cli --cluster create failed:\n{result.stdout}\n{result.stderr}")
        self.wait_ok(timeout)

    def wait_ok(self, timeout: float = START_TIMEOUT_S) -> None:
        """Until every node says cluster_state:ok and knows every master."""
        deadline = time.monotonic() + timeout
        infos: dict[int, dict[str, str]] = {}
        while True:
            try:
                infos = {port: _cluster_info(port) for port in self.ports}
                if all(info.get("cluster_state") == "ok"
                       and info.get("cluster_slots_ok") == "16384"
                       and int(info.get("cluster_known_nodes", 0)) >= len(self.nodes)
                       for info in infos.values()):
                    return
            except Exception:  # noqa: BLE001 - a node still starting
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"Redis Cluster not ok within {timeout} s: {infos}")
            time.sleep(0.05)

    def close(self) -> None:
        try:
            for node in self.nodes:
                try:
                    node.close()
                except Exception:  # noqa: BLE001
                    pass
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
            self._untrack()

    def __repr__(self) -> str:
        return f"<RedisClusterServer 127.0.0.1:{self.ports}>"


def _flush_cluster(url: str) -> None:
    """FLUSHALL on every master of the cluster that `url` (a seed) belongs to."""
    import redis

    seed = urlsplit(url)
    with redis.Redis(host=seed.hostname, port=seed.port, password=seed.password,
                     username=seed.username or None, decode_responses=True,
                     socket_timeout=10) as client:
        nodes = client.execute_command("CLUSTER NODES")
    if isinstance(nodes, dict):  # some redis-py versions parse the reply
        masters = [addr for addr, info in nodes.items()
                   if "master" in info.get("flags", "") and "fail" not in info.get("flags", "")]
    else:
        masters = []
        for line in nodes.splitlines():
            fields = line.split()
            if len(fields) > 2 and "master" in fields[2] and "fail" not in fields[2]:
                masters.append(fields[1])
    for addr in masters:
        hostport = addr.split("@", 1)[0].split(",", 1)[0]
        host, _, port = hostport.rpartition(":")
        with redis.Redis(host=host or seed.hostname, port=int(port), password=seed.password,
                         username=seed.username or None, socket_timeout=10) as client:
            client.flushall()


def cluster_to_redis_url(url: str) -> str:
    """redis+cluster://host:port -> redis://host:port (what redis-py's from_url reads)."""
    return re.sub(r"^redis\+cluster://", "redis://", url)


# ---------------------------------------------------------------------------
# Fixtures


@pytest.fixture(scope="session")
def _postgres_template() -> Iterator[Path]:
    """One initdb per session; every local cluster starts from a copy of it."""
    template = _TempDir("holdfast-pg-template-")
    try:
        _chown_to_postgres(template.root)
        initdb(template.root / "data")
        yield template.root / "data"
    finally:
        template.close()


@pytest.fixture(scope="session")
def postgres_server(request) -> Iterator[str]:
    """Admin URL of a PostgreSQL server: HOLDFAST_TEST_POSTGRES, or one started here."""
    external = os.environ.get(POSTGRES_ENV)
    if external:
        yield external
        return
    server = PostgresServer.create(template=request.getfixturevalue("_postgres_template"))
    request.addfinalizer(server.close)
    yield server.url


@pytest.fixture
def postgres_url(postgres_server: str) -> Iterator[str]:
    """URL of a fresh, empty database, dropped after the test."""
    name = f"holdfast_test_{next(_DB_COUNTER)}"
    if os.environ.get(POSTGRES_ENV):
        # A shared server: names must not collide with another session's.
        name = f"holdfast_test_{os.getpid()}_{next(_DB_COUNTER)}"
    create_database(postgres_server, name)
    try:
        yield _with_dbname(postgres_server, name)
    finally:
        drop_database(postgres_server, name)


@pytest.fixture
def private_postgres(_postgres_template: Path) -> Iterator[PostgresServer]:
    """A PostgreSQL cluster of the test's own, to stop, start or kill."""
    server = PostgresServer.create(template=_postgres_template)
    try:
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def redis_server(request) -> Iterator[str]:
    """URL of a standalone Redis: HOLDFAST_TEST_REDIS, or one started here."""
    external = os.environ.get(REDIS_ENV)
    if external:
        yield external
        return
    server = RedisServer()
    request.addfinalizer(server.close)
    server.start()
    yield server.url


@pytest.fixture
def redis_url(redis_server: str) -> str:
    """The Redis URL, flushed (FLUSHALL; FLUSHDB of its database on a user's server)."""
    import redis

    with redis.Redis.from_url(redis_server, socket_timeout=10) as client:
        if os.environ.get(REDIS_ENV):
            client.flushdb()
        else:
            client.flushall()
    return redis_server


@pytest.fixture
def private_redis() -> Iterator[RedisServer]:
    """A redis-server of the test's own, to kill and restart."""
    server = RedisServer()
    try:
        server.start()
        yield server
    finally:
        server.close()


@pytest.fixture(scope="session")
def redis_cluster_server(request) -> Iterator[str]:
    """Seed URL of a three-master Redis Cluster: HOLDFAST_TEST_REDIS_CLUSTER, or started here."""
    external = os.environ.get(REDIS_CLUSTER_ENV)
    if external:
        yield external
        return
    cluster = RedisClusterServer(3)
    request.addfinalizer(cluster.close)
    cluster.start()
    yield cluster.url


@pytest.fixture
def redis_cluster_url(redis_cluster_server: str) -> str:
    """The cluster's seed URL, every master flushed."""
    _flush_cluster(redis_cluster_server)
    return redis_cluster_server


@pytest.fixture
def private_redis_cluster() -> Iterator[RedisClusterServer]:
    """A three-master Redis Cluster of the test's own (its `.nodes` can be killed)."""
    cluster = RedisClusterServer(3)
    try:
        cluster.start()
        yield cluster
    finally:
        cluster.close()
