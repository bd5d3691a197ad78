from holdfast.contract.v1 import contract_pb2 as _contract_pb2
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class BookingState(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    BOOKING_STATE_UNSPECIFIED: _ClassVar[BookingState]
    BOOKING_STATE_NEW: _ClassVar[BookingState]
    BOOKING_STATE_BOOKED: _ClassVar[BookingState]
    BOOKING_STATE_SEATED: _ClassVar[BookingState]
    BOOKING_STATE_CANCELLED: _ClassVar[BookingState]
    BOOKING_STATE_NO_SHOW: _ClassVar[BookingState]
BOOKING_STATE_UNSPECIFIED: BookingState
BOOKING_STATE_NEW: BookingState
BOOKING_STATE_BOOKED: BookingState
BOOKING_STATE_SEATED: BookingState
BOOKING_STATE_CANCELLED: BookingState
BOOKING_STATE_NO_SHOW: BookingState

class BookRequest(_message.Message):
    __slots__ = ("table_id", "slot_start_ms", "party_size", "guest")
    TABLE_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_START_MS_FIELD_NUMBER: _ClassVar[int]
    PARTY_SIZE_FIELD_NUMBER: _ClassVar[int]
    GUEST_FIELD_NUMBER: _ClassVar[int]
    table_id: str
    slot_start_ms: int
    party_size: int
    guest: str
    def __init__(self, table_id: _Optional[str] = ..., slot_start_ms: _Optional[int] = ..., party_size: _Optional[int] = ..., guest: _Optional[str] = ...) -> None: ...

class SeatRequest(_message.Message):
    __slots__ = ("booking_id",)
    BOOKING_ID_FIELD_NUMBER: _ClassVar[int]
    booking_id: str
    def __init__(self, booking_id: _Optional[str] = ...) -> None: ...

class CancelRequest(_message.Message):
    __slots__ = ("booking_id", "reason")
    BOOKING_ID_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    booking_id: str
    reason: str
    def __init__(self, booking_id: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class GetBookingRequest(_message.Message):
    __slots__ = ("booking_id",)
    BOOKING_ID_FIELD_NUMBER: _ClassVar[int]
    booking_id: str
    def __init__(self, booking_id: _Optional[str] = ...) -> None: ...

class BookingReply(_message.Message):
    __slots__ = ("booking_id", "table_id", "slot_start_ms", "party_size", "guest", "state", "version", "no_show_at_ms", "cancel_reason")
    BOOKING_ID_FIELD_NUMBER: _ClassVar[int]
    TABLE_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_START_MS_FIELD_NUMBER: _ClassVar[int]
    PARTY_SIZE_FIELD_NUMBER: _ClassVar[int]
    GUEST_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    NO_SHOW_AT_MS_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REASON_FIELD_NUMBER: _ClassVar[int]
    booking_id: str
    table_id: str
    slot_start_ms: int
    party_size: int
    guest: str
    state: BookingState
    version: int
    no_show_at_ms: int
    cancel_reason: str
    def __init__(self, booking_id: _Optional[str] = ..., table_id: _Optional[str] = ..., slot_start_ms: _Optional[int] = ..., party_size: _Optional[int] = ..., guest: _Optional[str] = ..., state: _Optional[_Union[BookingState, str]] = ..., version: _Optional[int] = ..., no_show_at_ms: _Optional[int] = ..., cancel_reason: _Optional[str] = ...) -> None: ...

class Booking(_message.Message):
    __slots__ = ("table_id", "slot_start_ms", "party_size", "guest", "no_show_at_ms", "cancel_reason")
    TABLE_ID_FIELD_NUMBER: _ClassVar[int]
    SLOT_START_MS_FIELD_NUMBER: _ClassVar[int]
    PARTY_SIZE_FIELD_NUMBER: _ClassVar[int]
    GUEST_FIELD_NUMBER: _ClassVar[int]
    NO_SHOW_AT_MS_FIELD_NUMBER: _ClassVar[int]
    CANCEL_REASON_FIELD_NUMBER: _ClassVar[int]
    table_id: str
    slot_start_ms: int
    party_size: int
    guest: str
    no_show_at_ms: int
    cancel_reason: str
    def __init__(self, table_id: _Optional[str] = ..., slot_start_ms: _Optional[int] = ..., party_size: _Optional[int] = ..., guest: _Optional[str] = ..., no_show_at_ms: _Optional[int] = ..., cancel_reason: _Optional[str] = ...) -> None: ...
