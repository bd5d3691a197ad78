"""`python -m holdfast.probe`: a container's health check over gRPC.

Asks a server's `grpc.health.v1.Health/Check` for one service (the whole
server by default) and exits 0 only when the answer is SERVING; anything
else (no server, an unknown service, NOT_SERVING while it drains, a timeout)
prints one line on stderr and exits 1. Usage errors exit 2.

It imports grpc and the health stubs alone, not the service: a health check
runs every few seconds for the container's whole life, so it starts fast and
opens nothing but one channel.
"""

from __future__ import annotations

import argparse
import os
import sys

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

DEFAULT_TARGET = "127.0.0.1:50051"
DEFAULT_TIMEOUT_S = 3.0
SERVING = health_pb2.HealthCheckResponse.SERVING


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    problem = check(args.target, args.service, args.timeout_s)
    if problem is None:
        return 0
    print(f"probe: {args.target} {_shown(args.service)}: {problem}", file=sys.stderr)
    return 1


def check(target: str, service: str = "", timeout_s: float = DEFAULT_TIMEOUT_S) -> str | None:
    """None when `service` on `target` is SERVING, else why not (one line)."""
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        try:
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=timeout_s)
        except grpc.RpcError as error:
            # NOT_FOUND is the health service's answer for a name it does not know.
            detail = " ".join((error.details() or "").split())
            return f"{error.code().name}{': ' + detail if detail else ''}"
    if reply.status != SERVING:
        return health_pb2.HealthCheckResponse.ServingStatus.Name(reply.status)
    return None


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m holdfast.probe", description="exit 0 only if a gRPC server's health check answers SERVING"
    )
    parser.add_argument(
        "--target", default=os.environ.get("HOLDFAST_PROBE_TARGET", DEFAULT_TARGET),
        help=f"HOST:PORT of the server (default {DEFAULT_TARGET}, or HOLDFAST_PROBE_TARGET)",
    )
    parser.add_argument("--service", default="", help="the service name to check (default: the whole server)")
    parser.add_argument("--timeout-s", type=_positive_seconds, default=DEFAULT_TIMEOUT_S, help="deadline of the check")
    return parser


def _positive_seconds(text: str) -> float:
    value = float(text)
    if not value > 0:
        raise argparse.ArgumentTypeError(f"must be positive, got {text}")
    return value


def _shown(service: str) -> str:
    return f"service {service!r}" if service else "server"


if __name__ == "__main__":
    sys.exit(main())
