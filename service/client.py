"""Client channels that carry the contracts: deadlines and retries with no code.

`holdfast codegen` writes the gRPC service config of every contract next to
the stubs it generates (holdfast's own in service/generated/, a team's in its
`--out` folder; see contracts.service_config). A channel made here applies
one, or several merged, so a call that sets no deadline still gets its
contract's `timeout_ms`, and a call answered with a retryable status is
retried up to `max_attempts` times with the contract's fixed delay, by gRPC
itself. A deadline the caller sets is kept as it is.

The retry policies go to gRPC as the channel's default service config. The
deadlines do not: grpcio (Python, through 1.85 at least) starts a service
config `timeout` from a wrong clock, so it fires a second or two early
(grpc/grpc#34547, #40633; measured here at 1.2-1.9 s early within one
process). A small interceptor sets the same `timeout`, read from the same
JSON, as the call's own deadline instead, which grpcio gets right; the
deadline still covers every retry of the call. That is why a Python client
should make its channel here rather than pass the JSON as the
`grpc.service_config` option itself. Other languages read the JSON file as it
is (tests/test_node_client.py drives @grpc/grpc-js with it).

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
import os
import types
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import grpc

from holdfast.contracts import codegen

# holdfast's own service config (InventoryService, DispatchService), found
# through the `holdfast.generated` package: the same file in a checkout and in
# an installed wheel.
SERVICE_CONFIG = codegen.GENERATED / codegen.SERVICE_CONFIG_NAME

Options = Sequence[tuple[str, Any]]
# One service config: a path to a service_config.json, or its JSON text (a
# string that starts with `{`).
ServiceConfigSource = str | os.PathLike[str]
# What `service_config=` takes: one, or several to merge for one channel.
ServiceConfig = ServiceConfigSource | Sequence[ServiceConfigSource]

# What the interceptors handle: a blocking channel's call details or an
# asyncio one's (unrelated classes, in grpc and in its stubs), and whatever
# request and call or response they pass through untouched.
_Details = TypeVar("_Details", grpc.ClientCallDetails, grpc.aio.ClientCallDetails)
_Request = TypeVar("_Request")
_Response = TypeVar("_Response")


@dataclass(frozen=True, slots=True)
class _Contracts:
    """One channel's service config, read once: `text` as written (merged
    when several), `retries` as gRPC gets it (no `timeout`s), and the
    `deadlines` the interceptor applies instead."""

    text: str
    retries: str
    deadlines: Mapping[str, float]


def service_config(config: ServiceConfig = SERVICE_CONFIG) -> str:
    """The service-config JSON of `config` as written (several merged into
    one document), read once per process. Default: holdfast's own."""
    return _contracts(config).text


def deadlines(config: ServiceConfig = SERVICE_CONFIG) -> Mapping[str, float]:
    """Each method's contract deadline in seconds, from the service config's
    `timeout`s, by gRPC path (`/pkg.Service/Method`); a `name` without a
    method gives `/pkg.Service/` (the whole service), an empty one `/` (every
    method), as gRPC reads them."""
    return _contracts(config).deadlines


def options(extra: Options | None = None, *, service_config: ServiceConfig = SERVICE_CONFIG) -> list[tuple[str, Any]]:
    """Channel options that enable the contracts' retries; `extra` wins on a
    shared key (a caller's own `grpc.service_config` replaces the retries)."""
    merged = {"grpc.service_config": _contracts(service_config).retries, "grpc.enable_retries": 1}
    merged.update(dict(extra or ()))
    return list(merged.items())


def _contracts(config: ServiceConfig) -> _Contracts:
    return _load(_keys(config))


def _keys(config: ServiceConfig) -> tuple[tuple[str, str], ...]:
    """A hashable name of each source: ("json", text) or ("path", absolute
    path), so one file named two ways is read and cached once."""
    sources = [config] if isinstance(config, (str, os.PathLike)) else list(config)
    if not sources:
        raise ValueError("service_config= names no service config")
    keys = []
    for source in sources:
        if isinstance(source, str) and source.lstrip().startswith("{"):
            keys.append(("json", source))
        else:
            keys.append(("path", str(Path(source).resolve())))
    return tuple(keys)


@functools.cache
def _load(keys: tuple[tuple[str, str], ...]) -> _Contracts:
    texts = [(_read_json(value), value) if kind == "path" else (value, "service_config= JSON") for kind, value in keys]
    configs = [(_parse(text, where), where) for text, where in texts]
    if len(configs) == 1:
        text, config = texts[0][0], configs[0][0]
    else:
        config = _merge(configs)
        text = json.dumps(config, indent=2) + "\n"
    found: dict[str, float] = {}
    for entry in config.get("methodConfig", ()):  # parsed for this call alone: stripped in place
        timeout = entry.pop("timeout", None)
        if timeout is not None:
            for name in entry.get("name", ()):
                found[_path(name)] = _seconds(timeout)
    return _Contracts(text, json.dumps(config), types.MappingProxyType(found))


def _read_json(path: str) -> str:
    try:
        return Path(path).read_text(encoding="utf-8")
    except OSError as error:
        raise OSError(f"service config {path}: cannot read it: {error.strerror or error}") from None


def _parse(text: str, where: str) -> dict[str, Any]:
    try:
        config = json.loads(text)
    except ValueError as error:
        raise ValueError(f"{where}: not a JSON service config: {error}") from None
    if not isinstance(config, dict) or not isinstance(config.get("methodConfig", []), list):
        raise ValueError(f"{where}: not a service config: expected an object with a `methodConfig` list")
    return config


def _merge(parsed: list[tuple[dict[str, Any], str]]) -> dict[str, Any]:
    """One service config of several: their `methodConfig` entries in order.
    gRPC rejects a whole config that names a method twice, so a method in two
    of them is an error here, naming both; any other key must agree."""
    merged: dict[str, Any] = {"methodConfig": []}
    named: dict[str, str] = {}
    for config, where in parsed:
        for entry in config.get("methodConfig", ()):
            for name in entry.get("name", ()):
                path = _path(name)
                if path in named:
                    raise ValueError(f"{where}: {path} is configured in {named[path]} already: a method may have one config")
                named[path] = where
            merged["methodConfig"].append(entry)
        for key, value in config.items():
            if key != "methodConfig" and merged.setdefault(key, value) != value:
                raise ValueError(f"{where}: {key} differs from an earlier service config's: they cannot be merged")
    return merged


def _path(name: Mapping[str, str]) -> str:
    """The gRPC path a `methodConfig` name covers: `/pkg.Service/Method`,
    `/pkg.Service/` for every method of a service, `/` for all."""
    service, method = name.get("service", ""), name.get("method", "")
    return f"/{service}/{method}" if service else "/"


def _seconds(timeout: object) -> float:
    """A protobuf JSON Duration ("0.500000000s", "2s") in seconds."""
    number = timeout.removesuffix("s") if isinstance(timeout, str) and timeout.endswith("s") else ""
    try:
        return float(number)
    except ValueError:
        raise ValueError(f"service config timeout {timeout!r}: expected a duration like \"0.500000000s\"") from None


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
    target: str,
    *,
    service_config: ServiceConfig = SERVICE_CONFIG,
    credentials: grpc.ChannelCredentials | None = None,
    token: str | None = None,
    **kwargs: Any,
) -> grpc.Channel:
    """A blocking channel to `target` with the contracts' deadlines and
    retries of `service_config`: the service_config.json `holdfast codegen`
    wrote next to a service's stubs (a path, or its JSON text), or a list of
    them for a channel to several services; holdfast's own by default. Give
    a service config here, never as the `grpc.service_config` option: grpcio
    would fire its deadlines early (see the module docstring).

    TLS when `credentials` is given, a bearer `token` on every call when
    given. Other keyword arguments (`options`, `compression`) go to grpc's
    channel constructor. Raises OSError or ValueError for a config that
    cannot be read."""
    contracts = _contracts(service_config)
    kwargs["options"] = options(kwargs.get("options"), service_config=service_config)
    if credentials is None:
        plain = grpc.insecure_channel(target, **kwargs)
    else:
        plain = grpc.secure_channel(target, credentials, **kwargs)
    interceptors = [_Deadlines(contracts.deadlines), *([_Token(token)] if token else ())]
    return grpc.intercept_channel(plain, *interceptors)


def aio_channel(
    target: str,
    *,
    service_config: ServiceConfig = SERVICE_CONFIG,
    credentials: grpc.ChannelCredentials | None = None,
    token: str | None = None,
    **kwargs: Any,
) -> grpc.aio.Channel:
    """The asyncio twin of `channel`, with the same `service_config`;
    `interceptors` given here run inside the one that sets the deadline, so
    they see it."""
    contracts = _contracts(service_config)
    kwargs["options"] = options(kwargs.get("options"), service_config=service_config)
    kwargs["interceptors"] = [
        _AioDeadlines(contracts.deadlines), *([_AioToken(token)] if token else ()), *(kwargs.get("interceptors") or ()),
    ]
    if credentials is None:
        return grpc.aio.insecure_channel(target, **kwargs)
    return grpc.aio.secure_channel(target, credentials, **kwargs)


def _replaced(details: _Details, **changes: object) -> _Details:
    """`details` with `changes`: grpc hands interceptors namedtuples (a
    ClientCallDetails subclass each), so `_replace` keeps the class."""
    # types-grpcio declares grpc.ClientCallDetails and grpc.aio.ClientCallDetails
    # as plain abstract classes, without the namedtuple's `_replace`.
    replaced: _Details = details._replace(**changes)  # type: ignore[attr-defined]
    return replaced


def _with_deadline(details: _Details, deadlines: Mapping[str, float]) -> _Details:
    """`details` with the contract's deadline when the caller set none: the
    method's own, else its service's, else the config's default (gRPC's order)."""
    if details.timeout is not None:
        return details
    # bytes on an asyncio channel, though types-grpcio says str for both.
    named: str | bytes = details.method
    method = named.decode() if isinstance(named, bytes) else named
    timeout = deadlines.get(method)
    if timeout is None:
        timeout = deadlines.get(method[: method.rfind("/") + 1], deadlines.get("/"))
    return details if timeout is None else _replaced(details, timeout=timeout)


class _Deadlines(grpc.UnaryUnaryClientInterceptor):
    # Unary calls only: those are what a contract covers.
    def __init__(self, deadlines: Mapping[str, float]) -> None:
        self._deadlines = deadlines

    def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.ClientCallDetails, _Request], _Response],
        client_call_details: grpc.ClientCallDetails,
        request: _Request,
    ) -> _Response:
        return continuation(_with_deadline(client_call_details, self._deadlines), request)


class _AioDeadlines(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, deadlines: Mapping[str, float]) -> None:
        self._deadlines = deadlines

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, _Request], Awaitable[_Response]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: _Request,
    ) -> _Response:
        return await continuation(_with_deadline(client_call_details, self._deadlines), request)


def _with_token(details: _Details, token: str, aio: bool = False) -> _Details:
    """`details` with `authorization: Bearer TOKEN` added to its metadata
    (a grpc.aio.Metadata on an asyncio channel, pairs on a blocking one)."""
    pairs = [*(details.metadata or ()), ("authorization", f"Bearer {token}")]
    return _replaced(details, metadata=grpc.aio.Metadata(*pairs) if aio else pairs)


class _Token(grpc.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.ClientCallDetails, _Request], _Response],
        client_call_details: grpc.ClientCallDetails,
        request: _Request,
    ) -> _Response:
        return continuation(_with_token(client_call_details, self._token), request)


class _AioToken(grpc.aio.UnaryUnaryClientInterceptor):
    def __init__(self, token: str) -> None:
        self._token = token

    async def intercept_unary_unary(
        self,
        continuation: Callable[[grpc.aio.ClientCallDetails, _Request], Awaitable[_Response]],
        client_call_details: grpc.aio.ClientCallDetails,
        request: _Request,
    ) -> _Response:
        return await continuation(_with_token(client_call_details, self._token, aio=True), request)
