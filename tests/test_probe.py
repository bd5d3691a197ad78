"""`python -m holdfast.probe`, the image's HEALTHCHECK, against a real
`holdfast serve` process: exit 0 only on SERVING, else 1 and one line."""

from __future__ import annotations

import socket
import subprocess
import sys
import time
from concurrent import futures
from typing import Iterator

import grpc
import pytest
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from tests.process import ROOT, ServerProcess, child_env, free_port, start_server

# A refused connection must answer well inside a container's health-check
# interval; this bounds the whole command (interpreter start included).
FAST_S = 10.0


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    running = start_server(f"sqlite:///{tmp_path_factory.mktemp('probe')}/holdfast.db")
    try:
        yield running
    finally:
        running.close()


def probe(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "holdfast.probe", *args],
        capture_output=True, text=True, timeout=60, cwd=ROOT, env=child_env(),
    )


def assert_one_line_failure(result: subprocess.CompletedProcess, *words: str) -> None:
    assert result.returncode == 1, result
    assert result.stdout == ""
    lines = result.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("probe: "), result.stderr
    for word in words:
        assert word in lines[0]


# One row per answer of the health service: (service asked for, exit code, words of the message).
SERVED = [
    ("", 0, ()),
    ("holdfast.inventory.v1.InventoryService", 0, ()),
    ("holdfast.fulfillment.v1.DispatchService", 0, ()),
    ("holdfast.nope.v1.Missing", 1, ("NOT_FOUND", "holdfast.nope.v1.Missing")),
]


@pytest.mark.parametrize(("service", "code", "words"), SERVED)
def test_probe_answers_what_the_server_says(server: ServerProcess, service: str, code: int, words: tuple[str, ...]):
    result = probe("--target", server.target, "--service", service)
    if code == 0:
        assert (result.returncode, result.stdout, result.stderr) == (0, "", ""), result
    else:
        assert_one_line_failure(result, server.target, *words)


def test_probe_without_a_server_fails_fast_with_one_line():
    target = f"127.0.0.1:{free_port()}"
    started = time.monotonic()
    result = probe("--target", target, "--timeout-s", "5")
    assert time.monotonic() - started < FAST_S
    assert_one_line_failure(result, target, "UNAVAILABLE")


def test_probe_of_a_silent_listener_fails_at_its_deadline():
    # Accepts TCP and never speaks HTTP/2: only the deadline ends the check.
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        target = f"127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        result = probe("--target", target, "--timeout-s", "0.5")
        assert time.monotonic() - started < FAST_S
    assert_one_line_failure(result, target, "DEADLINE_EXCEEDED")


def test_probe_of_a_not_serving_service_fails():
    # What a draining holdfast answers (Running.stop enters graceful shutdown first).
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    servicer = health.HealthServicer()
    servicer.set("holdfast.inventory.v1.InventoryService", health_pb2.HealthCheckResponse.NOT_SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(servicer, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    try:
        result = probe("--target", f"127.0.0.1:{port}", "--service", "holdfast.inventory.v1.InventoryService")
    finally:
        server.stop(0)
    assert_one_line_failure(result, "NOT_SERVING")


def test_probe_refuses_a_bad_timeout_as_usage():
    result = probe("--timeout-s", "0")
    assert result.returncode == 2
    assert "--timeout-s" in result.stderr
