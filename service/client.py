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

Against a server with TLS and tokens (docs/security.md): `tls_credentials`
makes the channel credentials from PEM files (a CA to trust, and for mutual
TLS the client's certificate and key), and `token=` sends
`authorization: Bearer TOKEN` with every call. The token rides in metadata
whether or not the channel is encrypted: give a token to a plaintext channel
only where the path is private (loopback, a sidecar that adds the TLS).
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


def tls_credentials(ca: str = "", cert: str = "", key: str = "") -> grpc.ChannelCredentials | None:
    """Channel credentials from PEM files: `ca` to trust (TLS), plus `cert`
    and `key` to present (mutual TLS). None when no file is named: a plaintext
    channel. Raises OSError or ValueError, saying which file or flag."""
    if not (ca or cert or key):
        return None
    if bool(cert) != bool(key):
        raise ValueError("a client certificate needs its key: give --tls-cert and --tls-key together")
    if not ca:
        raise ValueError("TLS needs the CA to trust: give --tls-ca")
    return grpc.ssl_channel_credentials(
        root_certificates=_read(ca, "--tls-ca"),
        private_key=_read(key, "--tls-key") if key else None,
        certificate_chain=_read(cert, "--tls-cert") if cert else None,
    )


def _read(path: str, flag: str) -> bytes:
    try:
        return Path(path).read_bytes()
    except OSError as error:
        raise OSError(f"{flag} {path}: cannot read it: {error.strerror or error}") from None


def channel(
    target: str, *, credentials: grpc.ChannelCredentials | None = None, token: str | None = None, **kwargs: Any
) -> grpc.Channel:
    """A blocking channel to `target` with the contracts' deadlines and
    retries; TLS when `credentials` is given, a bearer `token` on every call
    when given. Other keyword arguments (`options`, `compression`) go to
    grpc's channel constructor."""
    kwargs["options"] = options(kwargs.get("options"))
    if credentials is None:
        plain = grpc.insecure_channel(target, **kwargs)
    else:
        plain = grpc.secure_channel(target, credentials, **kwargs)
    if token:
        return grpc.intercept_channel(plain, _Deadlines(), _Token(token))
    return grpc.intercept_channel(plain, _Deadlines())


def aio_channel(
    target: str, *, credentials: grpc.ChannelCredentials | None = None, token: str | None = None, **kwargs: Any
) -> grpc.aio.Channel:
    """The asyncio twin of `channel`; `interceptors` given here run inside
    the one that sets the deadline, so they see it."""
    kwargs["options"] = options(kwargs.get("options"))
    kwargs["interceptors"] = [_AioDeadlines(), *([_AioToken(token)] if token else ()), *kwargs.get("interceptors", ())]
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


def _with_token(details, token: str, aio: bool = False):
    """`details` with `authorization: Bearer TOKEN` added to its metadata
    (a grpc.aio.Metadata on an asyncio channel, pairs on a blocking one)."""
    pairs = [*(details.metadata or ()), ("authorization", f"Bearer {token}")]
    return details._replace(metadata=grpc.aio.Metadata(*pairs) if aio else pairs)


class _Token(grpc.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    def intercept_unary_unary(self, continuation, client_call_details, request):
        return continuation(_with_token(client_call_details, self._token), request)


class _AioToken(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_unary(self, continuation, client_call_details, request):
        return await continuation(_with_token(client_call_details, self._token, aio=True), request)
