"""The gRPC service config that carries each contract to the client.

A client that sets no deadline and writes no retry loop should still get the
contract's: gRPC reads a service config (`methodConfig` entries with a
`timeout` and a `retryPolicy`) from a channel option, so `holdfast codegen`
writes one next to the stubs and `holdfast.client` hands it to every channel.
It is built from compiled descriptors through `contracts.contract.of_service`,
never from a second copy of the numbers.

gRPC rejects a whole service config over one bad retry policy (and a channel
with a rejected default config fails every call), so a contract that gRPC
could not express is refused here, at codegen time, with the method named.
"""

from __future__ import annotations

import json
from typing import Any, Iterable

import grpc
from google.protobuf import descriptor, descriptor_pb2, descriptor_pool

from holdfast.contracts.contract import Contract, of_service

# gRPC caps maxAttempts at 5 silently; a contract asking for more would
# promise retries the channel never makes.
MAX_ATTEMPTS_CAP = 5
_STATUS_NAMES = frozenset(code.name for code in grpc.StatusCode) - {"OK"}
# A JSON object of the service config, as json.dumps takes it.
JSON = dict[str, Any]


def method_config(contract: Contract) -> JSON:
    """One `methodConfig` entry: the contract's deadline and, when it allows
    any retry, its fixed-delay retry policy."""
    service, _, method = contract.method.lstrip("/").partition("/")
    if contract.timeout_ms <= 0:
        raise ValueError(f"{contract.method}: timeout_ms must be positive to become a client deadline")
    entry: JSON = {"name": [{"service": service, "method": method}], "timeout": duration(contract.timeout_ms)}
    retry = contract.retry
    # A retryPolicy needs maxAttempts >= 2; one attempt simply means no policy.
    if retry.max_attempts < 2:
        return entry
    _check_retry(contract)
    entry["retryPolicy"] = {
        "maxAttempts": retry.max_attempts,
        # Fixed delay: initial == max and a multiplier of 1. gRPC still draws
        # each pause at random below it, so retries of one key never stampede.
        "initialBackoff": duration(retry.fixed_delay_ms),
        "maxBackoff": duration(retry.fixed_delay_ms),
        "backoffMultiplier": 1,
        "retryableStatusCodes": list(retry.retryable_codes),
    }
    return entry


def _check_retry(contract: Contract) -> None:
    retry = contract.retry
    where = f"{contract.method}: retry"
    if retry.max_attempts > MAX_ATTEMPTS_CAP:
        raise ValueError(f"{where}.max_attempts {retry.max_attempts} exceeds gRPC's cap of {MAX_ATTEMPTS_CAP}")
    if retry.fixed_delay_ms <= 0:
        raise ValueError(f"{where}.fixed_delay_ms must be positive: gRPC rejects a zero backoff")
    if not retry.retryable_codes:
        raise ValueError(f"{where}.retryable_codes is empty: gRPC rejects a retry policy that retries nothing")
    unknown = [code for code in retry.retryable_codes if code not in _STATUS_NAMES]
    if unknown:
        raise ValueError(f"{where}.retryable_codes names no retryable gRPC status: {', '.join(unknown)}")


def duration(ms: int) -> str:
    """Milliseconds as a protobuf JSON Duration with all nine fractional
    digits: 2000 -> "2.000000000s", 500 -> "0.500000000s". Both spellings are
    valid proto3 JSON, but @grpc/grpc-js reads the fraction of "0.5s" as
    5 ns (a 0.5 s deadline fires after a millisecond); with nine digits
    every client reads the same number."""
    seconds, millis = divmod(ms, 1000)
    return f"{seconds}.{millis:03d}000000s"


def build(services: Iterable[descriptor.ServiceDescriptor]) -> JSON:
    """The service config of `services`, methods in declaration order."""
    return {
        "methodConfig": [method_config(found) for service in services for found in of_service(service).values()]
    }


def from_descriptor_set(data: bytes, files: Iterable[str]) -> JSON:
    """The service config of every service declared in `files` (proto paths
    as protoc names them), read from a serialized `FileDescriptorSet` made
    with `--include_imports`.

    A private pool, so the protos just compiled are read rather than the
    modules this process imported (which may be the stale ones being
    replaced). Contract options still parse with the imported contract
    extension: a change to contract.proto itself needs a restart anyway.
    """
    pool = descriptor_pool.DescriptorPool()
    for file in descriptor_pb2.FileDescriptorSet.FromString(data).file:
        pool.Add(file)
    wanted = [pool.FindFileByName(name) for name in files]
    return build(file.services_by_name[name] for file in wanted for name in sorted(file.services_by_name))


def dumps(config: JSON) -> str:
    """Stable text (the stamp hashes it): two-space indent, trailing newline."""
    return json.dumps(config, indent=2) + "\n"
