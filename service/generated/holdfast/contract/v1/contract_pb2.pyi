from google.protobuf import descriptor_pb2 as _descriptor_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class OnDuplicate(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ON_DUPLICATE_REFUSE: _ClassVar[OnDuplicate]
    ON_DUPLICATE_WAIT: _ClassVar[OnDuplicate]
ON_DUPLICATE_REFUSE: OnDuplicate
ON_DUPLICATE_WAIT: OnDuplicate
CONTRACT_FIELD_NUMBER: _ClassVar[int]
contract: _descriptor.FieldDescriptor

class RetryPolicy(_message.Message):
    __slots__ = ("max_attempts", "fixed_delay_ms", "retryable_codes")
    MAX_ATTEMPTS_FIELD_NUMBER: _ClassVar[int]
    FIXED_DELAY_MS_FIELD_NUMBER: _ClassVar[int]
    RETRYABLE_CODES_FIELD_NUMBER: _ClassVar[int]
    max_attempts: int
    fixed_delay_ms: int
    retryable_codes: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, max_attempts: _Optional[int] = ..., fixed_delay_ms: _Optional[int] = ..., retryable_codes: _Optional[_Iterable[str]] = ...) -> None: ...

class Contract(_message.Message):
    __slots__ = ("timeout_ms", "idempotency_key", "retry", "lock_ttl_ms", "sla", "on_duplicate")
    TIMEOUT_MS_FIELD_NUMBER: _ClassVar[int]
    IDEMPOTENCY_KEY_FIELD_NUMBER: _ClassVar[int]
    RETRY_FIELD_NUMBER: _ClassVar[int]
    LOCK_TTL_MS_FIELD_NUMBER: _ClassVar[int]
    SLA_FIELD_NUMBER: _ClassVar[int]
    ON_DUPLICATE_FIELD_NUMBER: _ClassVar[int]
    timeout_ms: int
    idempotency_key: _containers.RepeatedScalarFieldContainer[str]
    retry: RetryPolicy
    lock_ttl_ms: int
    sla: str
    on_duplicate: OnDuplicate
    def __init__(self, timeout_ms: _Optional[int] = ..., idempotency_key: _Optional[_Iterable[str]] = ..., retry: _Optional[_Union[RetryPolicy, _Mapping]] = ..., lock_ttl_ms: _Optional[int] = ..., sla: _Optional[str] = ..., on_duplicate: _Optional[_Union[OnDuplicate, str]] = ...) -> None: ...
