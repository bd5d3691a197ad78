from holdfast.contract.v1 import contract_pb2 as _contract_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
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
    __slots__ = ("reservation_id", "expected_version", "quantity")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    expected_version: int
    quantity: int
    def __init__(self, reservation_id: _Optional[str] = ..., expected_version: _Optional[int] = ..., quantity: _Optional[int] = ...) -> None: ...

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
    __slots__ = ("reservation_id", "order_id", "sku_id", "quantity", "state", "version", "expires_at_ms", "confirmed_quantity", "returned_quantity")
    RESERVATION_ID_FIELD_NUMBER: _ClassVar[int]
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    SKU_ID_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    CONFIRMED_QUANTITY_FIELD_NUMBER: _ClassVar[int]
    RETURNED_QUANTITY_FIELD_NUMBER: _ClassVar[int]
    reservation_id: str
    order_id: str
    sku_id: str
    quantity: int
    state: ReservationState
    version: int
    expires_at_ms: int
    confirmed_quantity: int
    returned_quantity: int
    def __init__(self, reservation_id: _Optional[str] = ..., order_id: _Optional[str] = ..., sku_id: _Optional[str] = ..., quantity: _Optional[int] = ..., state: _Optional[_Union[ReservationState, str]] = ..., version: _Optional[int] = ..., expires_at_ms: _Optional[int] = ..., confirmed_quantity: _Optional[int] = ..., returned_quantity: _Optional[int] = ...) -> None: ...

class OrderLine(_message.Message):
    __slots__ = ("sku_id", "quantity")
    SKU_ID_FIELD_NUMBER: _ClassVar[int]
    QUANTITY_FIELD_NUMBER: _ClassVar[int]
    sku_id: str
    quantity: int
    def __init__(self, sku_id: _Optional[str] = ..., quantity: _Optional[int] = ...) -> None: ...

class ReserveOrderRequest(_message.Message):
    __slots__ = ("order_id", "lines", "timestamp_ms", "hold_ms")
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    TIMESTAMP_MS_FIELD_NUMBER: _ClassVar[int]
    HOLD_MS_FIELD_NUMBER: _ClassVar[int]
    order_id: str
    lines: _containers.RepeatedCompositeFieldContainer[OrderLine]
    timestamp_ms: int
    hold_ms: int
    def __init__(self, order_id: _Optional[str] = ..., lines: _Optional[_Iterable[_Union[OrderLine, _Mapping]]] = ..., timestamp_ms: _Optional[int] = ..., hold_ms: _Optional[int] = ...) -> None: ...

class ConfirmOrderRequest(_message.Message):
    __slots__ = ("order_hold_id", "expected_version")
    ORDER_HOLD_ID_FIELD_NUMBER: _ClassVar[int]
    EXPECTED_VERSION_FIELD_NUMBER: _ClassVar[int]
    order_hold_id: str
    expected_version: int
    def __init__(self, order_hold_id: _Optional[str] = ..., expected_version: _Optional[int] = ...) -> None: ...

class ReleaseOrderRequest(_message.Message):
    __slots__ = ("order_hold_id", "reason")
    ORDER_HOLD_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    order_hold_id: str
    reason: str
    def __init__(self, order_hold_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class GetOrderRequest(_message.Message):
    __slots__ = ("order_hold_id",)
    ORDER_HOLD_ID_FIELD_NUMBER: _ClassVar[int]
    order_hold_id: str
    def __init__(self, order_hold_id: _Optional[str] = ...) -> None: ...

class OrderReply(_message.Message):
    __slots__ = ("order_hold_id", "order_id", "state", "version", "expires_at_ms", "lines")
    ORDER_HOLD_ID_FIELD_NUMBER: _ClassVar[int]
    ORDER_ID_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EXPIRES_AT_MS_FIELD_NUMBER: _ClassVar[int]
    LINES_FIELD_NUMBER: _ClassVar[int]
    order_hold_id: str
    order_id: str
    state: ReservationState
    version: int
    expires_at_ms: int
    lines: _containers.RepeatedCompositeFieldContainer[ReservationReply]
    def __init__(self, order_hold_id: _Optional[str] = ..., order_id: _Optional[str] = ..., state: _Optional[_Union[ReservationState, str]] = ..., version: _Optional[int] = ..., expires_at_ms: _Optional[int] = ..., lines: _Optional[_Iterable[_Union[ReservationReply, _Mapping]]] = ...) -> None: ...
