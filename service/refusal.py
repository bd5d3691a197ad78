"""A refusal as a client reads it: the `google.rpc.Status` details of a
failed call, as the reason, its domain, its metadata and the request fields
it names. Tests of a service built on holdfast assert on these, not on
message text:

    with pytest.raises(grpc.aio.AioRpcError) as refused:
        await spots.Hold(request)
    assert holdfast.refusal(refused.value) == holdfast.Refusal(
        grpc.StatusCode.FAILED_PRECONDITION, "spots.parking.example.com", "SPOT_HELD", {"spot_id": "a-1"})
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Mapping

import grpc
from google.rpc import error_details_pb2
from grpc_status import rpc_status


@dataclass(frozen=True, slots=True)
class Refusal:
    """What a failed call said: its status, and the ErrorInfo and BadRequest
    it carried (`domain` and `reason` empty when it carried none, as a
    transport error does)."""

    code: grpc.StatusCode
    domain: str
    reason: str
    metadata: Mapping[str, str] = field(default_factory=dict)
    violations: tuple[tuple[str, str], ...] = ()


def refusal(error: grpc.RpcError) -> Refusal:
    """The refusal a failed call (sync or grpc.aio) answered with."""
    code = error.code()
    status = rpc_status.from_call(error)  # type: ignore[arg-type]  # a failed call is both an RpcError and a Call
    domain, reason = "", ""
    metadata: dict[str, str] = {}
    violations: list[tuple[str, str]] = []
    for detail in () if status is None else status.details:
        if detail.Is(error_details_pb2.ErrorInfo.DESCRIPTOR):
            info = error_details_pb2.ErrorInfo()
            detail.Unpack(info)
            domain, reason, metadata = info.domain, info.reason, dict(info.metadata)
        elif detail.Is(error_details_pb2.BadRequest.DESCRIPTOR):
            bad = error_details_pb2.BadRequest()
            detail.Unpack(bad)
            violations.extend((v.field, v.description) for v in bad.field_violations)
    return Refusal(code, domain, reason, metadata, tuple(violations))
