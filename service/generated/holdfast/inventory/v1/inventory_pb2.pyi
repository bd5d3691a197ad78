from holdfast.contract.v1 import contract_pb2 as _contract_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ReservationState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RESERVATION_STATE_UNSPECIFIED: _ClassVar[ReservationState]
    RESERVATION_STATE_AVAILABLE: _ClassVar[ReservationState]
    RESERVATION_STATE_RESERVING: _ClassVar[ReservationState]
    RESERVATION_STATE_RESERVED: _ClassVar[ReservationState]
    RESERVATION_STATE_CONFIRMING: _ClassVar[ReservationState]
    RESERVATION_STATE_CONFIRMED: _ClassVar[ReservationState]
    RESERVATION_STATE_RELEASING: _ClassVar[ReservationState]
    RESERVATION_STATE_RELEASED: _ClassVar[ReservationState]
RESERVATION_STATE_UNSPECIFIED: ReservationState
RESERVATION_STATE_AVAILABLE: ReservationState
RESERVATION_STATE_RESERVING: ReservationState
RESERVATION_STATE_RESERVED: ReservationState
RESERVATION_STATE_CONFIRMING: ReservationState
RESERVATION_STATE_CONFIRMED: ReservationState
RESERVATION_STATE_RELEASING: ReservationState
RESERVATION_STATE_RELEASED: ReservationState

class PutStockRequest(_message.Message):
    __slots__ = ("sku_id", "total", "request_id")
    SKU_ID_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    sku_id: str
    total: int
    request_id: str
    def __init__(self, sku_id: _Optional[str] = ..., total: _Optional[int] = ..., request_id: _Optional[str] = ...) -> None: ...

class GetStockRequest(_message.Message):
    __slots__ = ("sku_id",)
    SKU_ID_FIELD_NUMBER: _ClassVar[int]
    sku_id: str
    def __init__(self, sku_id: _Optional[str] = ...) -> None: ...

class StockReply(_message.Message):
    __slots__ = ("sku_id", "total", "available", "held", "sold", "version")
    SKU_ID_FIELD_NUMBER: _ClassVar[int]
    TOTAL_FIELD_NUMBER: _ClassVar[int]
    AVAILABLE_FIELD_NUMBER: _ClassVar[int]
    HELD_FIELD_NUMBER: _ClassVar[int]
    SOLD_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    sku_id: str
    total: int
    available: int
    held: int
    sold: int
    version: int
    def __init__(self, sku_id: _Optional[str] = ..., total: _Optional[int] = ..., available: _Optional[int] = ..., held: _Optional[int] = ..., sold: _Optional[int] = ..., version: _Optional[int] = ...) -> None: ...

class ReserveRequest(_message.Message):
    __slots__ = ("order_id", "sku_id", "quantity", "timestamp_ms", "hold_ms")
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    SKU_ID_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    HOLD_MS_FIELD_NUMBER: _ClassVar[int]
    order_id: str
    sku_id: str
    quantity: int
    timestamp_ms: int
    hold_ms: int
    def __init__(self, order_id: _Optional[str] = ..., sku_id: _Optional[str] = ..., quantity: _Optional[int] = ..., timestamp_ms: _Optional[int] = ..., hold_ms: _Optional[int] = ...) -> None: ...

class ConfirmRequest(_message.Message):
    __slots__ = ("reservation_id", "expected_version")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    expected_version: int
    def __init__(self, reservation_id: _Optional[str] = ..., expected_version: _Optional[int] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("reservation_id", "reason")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    reason: str
    def __init__(self, reservation_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class GetReservationRequest(_message.Message):
    __slots__ = ("reservation_id",)
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    def __init__(self, reservation_id: _Optional[str] = ...) -> None: ...

class ReservationReply(_message.Message):
    __slots__ = ("reservation_id", "order_id", "sku_id", "quantity", "state", "version", "expires_at_ms")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    SKU_ID_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    order_id: str
    sku_id: str
    quantity: int
    state: ReservationState
    version: int
    expires_at_ms: int
    def __init__(self, reservation_id: _Optional[str] = ..., order_id: _Optional[str] = ..., sku_id: _Optional[str] = ..., quantity: _Optional[int] = ..., state: _Optional[_Union[ReservationState, str]] = ..., version: _Optional[int] = ..., expires_at_ms: _Optional[int] = ...) -> None: ...
