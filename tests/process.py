"""Helpers for suites that run `holdfast` as a real process: a free port, the
console script, a server subprocess that is up once it prints its start-up
line, and a clean (or brutal) stop.

Everything here waits with generous timeouts only; nothing measures speed.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
START_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 20.0
READY_LINE = "holdfast serving "


def free_port() -> int:
    """A TCP port on 127.0.0.1 nobody listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def holdfast_command() -> list[str]:
    """The `holdfast` console script of the running interpreter's environment."""
    script = Path(sys.executable).parent / "holdfast"
    if script.exists():
        return [str(script)]
    return [sys.executable, "-m", "holdfast.cli"]


def child_env(**extra: str) -> dict[str, str]:
    """The environment for a child: no stray HOLDFAST_* settings, unbuffered output."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("HOLDFAST_")}
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


def run_holdfast(*args: str, timeout: float = 60.0, cwd: Path | None = None) -> subprocess.CompletedProcess:
    """Runs one `holdfast` command to completion and returns its result (text)."""
    return subprocess.run(
        [*holdfast_command(), *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=cwd or ROOT,
        env=child_env(),
    )


class _Lines:
    """Collects a stream's lines on a thread, so a test can wait for one."""

    def __init__(self, stream) -> None:
        self.lines: list[str] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._pump, args=(stream,), daemon=True)
        self._thread.start()

    def _pump(self, stream) -> None:
        try:
            for line in stream:
                with self._cond:
                    self.lines.append(line.rstrip("\n"))
                    self._cond.notify_all()
        finally:
            with self._cond:
                self._closed = True
                self._cond.notify_all()

    def wait_for(self, predicate: Callable[[str], bool], timeout: float) -> str | None:
        """The first line matching `predicate`, or None at timeout or end of stream."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for line in self.lines:
                    if predicate(line):
                        return line
                remaining = deadline - time.monotonic()
                if self._closed or remaining <= 0:
                    return None
                self._cond.wait(remaining)

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def text(self) -> str:
        with self._cond:
            return "\n".join(self.lines)


class ServerProcess:
    """`holdfast serve` as a child process."""

    def __init__(self, store: str, port: int | None = None, snapshot: str = "memory://",
                 extra: tuple[str, ...] = (), cwd: Path | None = None) -> None:
        self.port = port if port is not None else free_port()
        self.store = store
        self.snapshot = snapshot
        self.target = f"127.0.0.1:{self.port}"
        self.args = [
            *holdfast_command(), "serve",
            "--listen", self.target, "--store", store, "--snapshot", snapshot, *extra,
        ]
        self.proc = subprocess.Popen(
            self.args,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            cwd=cwd or ROOT,
            env=child_env(),
        )
        self.stdout = _Lines(self.proc.stdout)
        self.stderr = _Lines(self.proc.stderr)
        self.ready_line: str | None = None

    def wait_ready(self, timeout: float = START_TIMEOUT_S) -> str:
        """Blocks until the start-up line is printed; returns it."""
        line = self.stdout.wait_for(lambda l: l.startswith(READY_LINE), timeout)
        if line is None:
            self.kill()
            raise AssertionError(f"holdfast serve did not start within {timeout} s:\n{self.output()}")
        self.ready_line = line
        return line

    def output(self) -> str:
        return f"$ {' '.join(self.args)}\n--- stdout\n{self.stdout.text()}\n--- stderr\n{self.stderr.text()}"

    def running(self) -> bool:
        return self.proc.poll() is None

    def send(self, sig: int) -> None:
        if self.running():
            self.proc.send_signal(sig)

    def wait(self, timeout: float = STOP_TIMEOUT_S) -> int:
        code = self.proc.wait(timeout)
        self.stdout.join(timeout)
        self.stderr.join(timeout)
        return code

    def stop(self, sig: int = signal.SIGTERM, timeout: float = STOP_TIMEOUT_S) -> int:
        """Asks the server to stop and waits for it; returns the exit code."""
        self.send(sig)
        return self.wait(timeout)

    def kill(self) -> None:
        """SIGKILL, no questions asked; safe to call on a finished process."""
        if self.running():
            self.proc.kill()
        try:
            self.wait(STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            pass

    def close(self) -> None:
        """For `finally`: makes sure the child is gone and its pipes are closed."""
        self.kill()
        for stream in (self.proc.stdout, self.proc.stderr):
            if stream is not None:
                stream.close()


def start_server(store: str, **kwargs) -> ServerProcess:
    """Starts `holdfast serve` on a free port and returns it once it serves.

    A free port can be taken by someone else between `free_port()` and the
    server's bind; when that happens (and no port was asked for) it tries again
    on another one.
    """
    attempts = 1 if kwargs.get("port") is not None else 3
    for attempt in range(attempts):
        server = ServerProcess(store, **kwargs)
        try:
            server.wait_ready()
        except AssertionError:
            server.close()
            if attempt + 1 < attempts and "cannot listen" in server.stderr.text():
                continue
            raise
        except BaseException:
            server.close()
            raise
        return server
    raise AssertionError("unreachable")
