"""Client channels that carry the contracts: deadlines and retries with no code.

`holdfast codegen` writes the gRPC service config of every contract
(service/generated/service_config.json, see contracts.service_config). A
channel made here applies it, so a call that sets no deadline still gets its
contract's `timeout_ms`, and a call answered with a retryable status is
retried up to `max_attempts` times with the contract's fixed delay, by gRPC
itself. A deadline the caller sets is kept as it is.

The retry policies go to gRPC as the channel's default service config. The
deadlines do not: grpcio (Python, through 1.85 at least) starts a service
config `timeout` from a wrong clock, so it fires a second or two early
(grpc/grpc#34547, #40633; measured here at 1.2-1.9 s early within one
process). A small interceptor sets the same `timeout`, read from the same
JSON, as the call's own deadline instead, which grpcio gets right; the
deadline still covers every retry of the call. Other languages read the
JSON file as it is.
"""

from __future__ import annotations

import functools
import json
from pathlib import Path
from typing import Any, Mapping, Sequence

import grpc

SERVICE_CONFIG = Path(__file__).resolve().parent / "generated" / "service_config.json"

Options = Sequence[tuple[str, Any]]


@functools.cache
def service_config() -> str:
    """The generated service-config JSON, read once per process."""
    return SERVICE_CONFIG.read_text(encoding="utf-8")


@functools.cache
def deadlines() -> Mapping[str, float]:
    """Each method's contract deadline in seconds, by gRPC path
    (`/pkg.Service/Method`), from the service config's `timeout`s."""
    found: dict[str, float] = {}
    for entry in json.loads(service_config())["methodConfig"]:
        if "timeout" in entry:
            for name in entry["name"]:
                found[f"/{name['service']}/{name['method']}"] = float(entry["timeout"].removesuffix("s"))
    return found


@functools.cache
def _retry_config() -> str:
    """The service config gRPC gets: the same, minus the `timeout`s that
    `deadlines()` applies instead (see the module docstring)."""
    config = json.loads(service_config())
    for entry in config["methodConfig"]:
        entry.pop("timeout", None)
    return json.dumps(config)


def options(extra: Options | None = None) -> list[tuple[str, Any]]:
    """Channel options that enable the contracts' retries; `extra` wins on a
    shared key (a caller's own `grpc.service_config` replaces the retries)."""
    merged = {"grpc.service_config": _retry_config(), "grpc.enable_retries": 1}
    merged.update(dict(extra or ()))
    return list(merged.items())


def channel(target: str, *, credentials: grpc.ChannelCredentials | None = None, **kwargs: Any) -> grpc.Channel:
    """A blocking channel to `target` with the contracts' deadlines and
    retries; TLS when `credentials` is given. Other keyword arguments
    (`options`, `compression`) go to grpc's channel constructor."""
    kwargs["options"] = options(kwargs.get("options"))
    if credentials is None:
        plain = grpc.insecure_channel(target, **kwargs)
    else:
        plain = grpc.secure_channel(target, credentials, **kwargs)
    return grpc.intercept_channel(plain, _Deadlines())


def aio_channel(target: str, *, credentials: grpc.ChannelCredentials | None = None, **kwargs: Any) -> grpc.aio.Channel:
    """The asyncio twin of `channel`; `interceptors` given here run inside
    the one that sets the deadline, so they see it."""
    kwargs["options"] = options(kwargs.get("options"))
    kwargs["interceptors"] = [_AioDeadlines(), *kwargs.get("interceptors", ())]
    if credentials is None:
        return grpc.aio.insecure_channel(target, **kwargs)
    return grpc.aio.secure_channel(target, credentials, **kwargs)


def _with_deadline(details):
    """`details` with the contract's deadline when the caller set none."""
    if details.timeout is not None:
        return details
    method = details.method.decode() if isinstance(details.method, bytes) else details.method
    timeout = deadlines().get(method)
    return details if timeout is None else details._replace(timeout=timeout)


class _Deadlines(grpc.UnaryUnaryClientInterceptor):
    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(_with_deadline(client_call_details), request)


class _AioDeadlines(grpc.aio.UnaryUnaryClientInterceptor):
    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_with_deadline(client_call_details), request)
