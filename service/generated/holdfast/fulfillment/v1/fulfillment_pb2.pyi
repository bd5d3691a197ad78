from holdfast.contract.v1 import contract_pb2 as _contract_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class WaybillState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    WAYBILL_STATE_UNSPECIFIED: _ClassVar[WaybillState]
    WAYBILL_STATE_NEW: _ClassVar[WaybillState]
    WAYBILL_STATE_CREATED: _ClassVar[WaybillState]
    WAYBILL_STATE_DISPATCHING: _ClassVar[WaybillState]
    WAYBILL_STATE_DISPATCHED: _ClassVar[WaybillState]
    WAYBILL_STATE_ACKNOWLEDGED: _ClassVar[WaybillState]
    WAYBILL_STATE_FAILED: _ClassVar[WaybillState]

class AttemptResult(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ATTEMPT_RESULT_UNSPECIFIED: _ClassVar[AttemptResult]
    ATTEMPT_RESULT_RUNNING: _ClassVar[AttemptResult]
    ATTEMPT_RESULT_ACCEPTED: _ClassVar[AttemptResult]
    ATTEMPT_RESULT_REFUSED: _ClassVar[AttemptResult]
    ATTEMPT_RESULT_LEASE_EXPIRED: _ClassVar[AttemptResult]
WAYBILL_STATE_UNSPECIFIED: WaybillState
WAYBILL_STATE_NEW: WaybillState
WAYBILL_STATE_CREATED: WaybillState
WAYBILL_STATE_DISPATCHING: WaybillState
WAYBILL_STATE_DISPATCHED: WaybillState
WAYBILL_STATE_ACKNOWLEDGED: WaybillState
WAYBILL_STATE_FAILED: WaybillState
ATTEMPT_RESULT_UNSPECIFIED: AttemptResult
ATTEMPT_RESULT_RUNNING: AttemptResult
ATTEMPT_RESULT_ACCEPTED: AttemptResult
ATTEMPT_RESULT_REFUSED: AttemptResult
ATTEMPT_RESULT_LEASE_EXPIRED: AttemptResult

class CreateWaybillRequest(_message.Message):
    __slots__ = ("reservation_id", "carrier", "address")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    CARRIER_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    carrier: str
    address: str
    def __init__(self, reservation_id: _Optional[str] = ..., carrier: _Optional[str] = ..., address: _Optional[str] = ...) -> None: ...

class DispatchRequest(_message.Message):
    __slots__ = ("waybill_id", "dispatcher_id", "attempt")
    WAYBILL_ID_FIELD_NUMBER: _ClassVar[int]
    DISPATCHER_ID_FIELD_NUMBER: _ClassVar[int]
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    waybill_id: str
    dispatcher_id: str
    attempt: int
    def __init__(self, waybill_id: _Optional[str] = ..., dispatcher_id: _Optional[str] = ..., attempt: _Optional[int] = ...) -> None: ...

class AcknowledgeRequest(_message.Message):
    __slots__ = ("waybill_id",)
    WAYBILL_ID_FIELD_NUMBER: _ClassVar[int]
    waybill_id: str
    def __init__(self, waybill_id: _Optional[str] = ...) -> None: ...

class FailRequest(_message.Message):
    __slots__ = ("waybill_id", "reason")
    WAYBILL_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    waybill_id: str
    reason: str
    def __init__(self, waybill_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class GetWaybillRequest(_message.Message):
    __slots__ = ("waybill_id",)
    WAYBILL_ID_FIELD_NUMBER: _ClassVar[int]
    waybill_id: str
    def __init__(self, waybill_id: _Optional[str] = ...) -> None: ...

class DispatchAttempt(_message.Message):
    __slots__ = ("attempt", "dispatcher_id", "started_at_ms", "ended_at_ms", "result", "detail")
    ATTEMPT_FIELD_NUMBER: _ClassVar[int]
    DISPATCHER_ID_FIELD_NUMBER: _ClassVar[int]
    STARTED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    ENDED_AT_MS_FIELD_NUMBER: _ClassVar[int]
    RESULT_FIELD_NUMBER: _ClassVar[int]
    DETAIL_FIELD_NUMBER: _ClassVar[int]
    attempt: int
    dispatcher_id: str
    started_at_ms: int
    ended_at_ms: int
    result: AttemptResult
    detail: str
    def __init__(self, attempt: _Optional[int] = ..., dispatcher_id: _Optional[str] = ..., started_at_ms: _Optional[int] = ..., ended_at_ms: _Optional[int] = ..., result: _Optional[_Union[AttemptResult, str]] = ..., detail: _Optional[str] = ...) -> None: ...

class WaybillReply(_message.Message):
    __slots__ = ("waybill_id", "reservation_id", "carrier", "address", "state", "version", "attempts", "tracking_id", "failure_reason")
    WAYBILL_ID_FIELD_NUMBER: _ClassVar[int]
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    CARRIER_FIELD_NUMBER: _ClassVar[int]
    ADDRESS_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    TRACKING_ID_FIELD_NUMBER: _ClassVar[int]
    FAILURE_REASON_FIELD_NUMBER: _ClassVar[int]
    waybill_id: str
    reservation_id: str
    carrier: str
    address: str
    state: WaybillState
    version: int
    attempts: _containers.RepeatedCompositeFieldContainer[DispatchAttempt]
    tracking_id: str
    failure_reason: str
    def __init__(self, waybill_id: _Optional[str] = ..., reservation_id: _Optional[str] = ..., carrier: _Optional[str] = ..., address: _Optional[str] = ..., state: _Optional[_Union[WaybillState, str]] = ..., version: _Optional[int] = ..., attempts: _Optional[_Iterable[_Union[DispatchAttempt, _Mapping]]] = ..., tracking_id: _Optional[str] = ..., failure_reason: _Optional[str] = ...) -> None: ...
