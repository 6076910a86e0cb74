from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class KeyChallengeRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class KeyChallengeReply(_message.Message):
    __slots__ = ("nonce", "ttl_s")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    TTL_S_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    ttl_s: float
    def __init__(self, nonce: _Optional[bytes] = ..., ttl_s: _Optional[float] = ...) -> None: ...

class Evidence(_message.Message):
    __slots__ = ("kind", "provider", "quote", "extra_json")
    KIND_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    QUOTE_FIELD_NUMBER: _ClassVar[int]
    EXTRA_JSON_FIELD_NUMBER: _ClassVar[int]
    kind: str
    provider: str
    quote: bytes
    extra_json: str
    def __init__(self, kind: _Optional[str] = ..., provider: _Optional[str] = ..., quote: _Optional[bytes] = ..., extra_json: _Optional[str] = ...) -> None: ...

class ReleaseRequest(_message.Message):
    __slots__ = ("nonce", "evidence", "tee_key", "items", "party_binding")
    NONCE_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    TEE_KEY_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    PARTY_BINDING_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    evidence: Evidence
    tee_key: bytes
    items: _containers.RepeatedScalarFieldContainer[str]
    party_binding: bytes
    def __init__(self, nonce: _Optional[bytes] = ..., evidence: _Optional[_Union[Evidence, _Mapping]] = ..., tee_key: _Optional[bytes] = ..., items: _Optional[_Iterable[str]] = ..., party_binding: _Optional[bytes] = ...) -> None: ...

class WrappedItem(_message.Message):
    __slots__ = ("item", "iv", "ciphertext")
    ITEM_FIELD_NUMBER: _ClassVar[int]
    IV_FIELD_NUMBER: _ClassVar[int]
    CIPHERTEXT_FIELD_NUMBER: _ClassVar[int]
    item: str
    iv: bytes
    ciphertext: bytes
    def __init__(self, item: _Optional[str] = ..., iv: _Optional[bytes] = ..., ciphertext: _Optional[bytes] = ...) -> None: ...

class ReleaseReply(_message.Message):
    __slots__ = ("service_key", "items")
    SERVICE_KEY_FIELD_NUMBER: _ClassVar[int]
    ITEMS_FIELD_NUMBER: _ClassVar[int]
    service_key: bytes
    items: _containers.RepeatedCompositeFieldContainer[WrappedItem]
    def __init__(self, service_key: _Optional[bytes] = ..., items: _Optional[_Iterable[_Union[WrappedItem, _Mapping]]] = ...) -> None: ...
