"""Helpers the suites share: reading holdfast's error details and metadata."""

from __future__ import annotations

from dataclasses import dataclass

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from holdfast.inventory.v1 import inventory_pb2 as pb  # noqa: F401  (re-exported for the suites)

from holdfast.cli import BUILT_IN

# holdfast's own apps, as `holdfast serve` hosts them when none is named.
# The server hosts none by default (Config.apps is empty: it names no app),
# so a suite that starts one in process names them.
BUILT_IN_APPS = tuple(BUILT_IN.values())


@dataclass(frozen=True)
class Failure:
    code: grpc.StatusCode
    reason: str
    domain: str
    violations: tuple[tuple[str, str], ...]
    message: str
    trailing: dict


def failure_of(error: grpc.aio.AioRpcError | grpc.RpcError) -> Failure:
    """The gRPC code, the ErrorInfo reason and the BadRequest violations of an error."""
    status = rpc_status.from_call(error)
    assert status is not None, f"no google.rpc.Status details on {error!r}"
    reason = domain = ""
    violations: tuple[tuple[str, str], ...] = ()
    for detail in status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            reason, domain = info.reason, info.domain
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations = tuple((v.field, v.description) for v in bad.field_violations)
    return Failure(error.code(), reason, domain, violations, error.details(), dict(error.trailing_metadata() or ()))


async def raw_call(channel: grpc.aio.Channel, method: str, request) -> tuple[bytes, dict]:
    """Calls `method` and returns the reply's exact wire bytes and trailing metadata."""
    rpc = channel.unary_unary(
        f"/holdfast.inventory.v1.InventoryService/{method}",
        request_serializer=type(request).SerializeToString,
        response_deserializer=None,
    )
    call = rpc(request)
    reply = await call
    return reply, dict(await call.trailing_metadata())
