from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class JoinRequest(_message.Message):
    __slots__ = ("collaborator", "evidence_kind", "evidence", "nonce")
    COLLABORATOR_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_KIND_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    collaborator: str
    evidence_kind: str
    evidence: bytes
    nonce: bytes
    def __init__(self, collaborator: _Optional[str] = ..., evidence_kind: _Optional[str] = ..., evidence: _Optional[bytes] = ..., nonce: _Optional[bytes] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("run_id", "rounds", "current_round", "nonce")
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    rounds: int
    current_round: int
    nonce: bytes
    def __init__(self, run_id: _Optional[str] = ..., rounds: _Optional[int] = ..., current_round: _Optional[int] = ..., nonce: _Optional[bytes] = ...) -> None: ...

class WaitRequest(_message.Message):
    __slots__ = ("collaborator", "after_round")
    COLLABORATOR_FIELD_NUMBER: _ClassVar[int]
    AFTER_ROUND_FIELD_NUMBER: _ClassVar[int]
    collaborator: str
    after_round: int
    def __init__(self, collaborator: _Optional[str] = ..., after_round: _Optional[int] = ...) -> None: ...

class WaitReply(_message.Message):
    __slots__ = ("round", "done", "evaluate_only")
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    round: int
    done: bool
    evaluate_only: bool
    def __init__(self, round: _Optional[int] = ..., done: _Optional[bool] = ..., evaluate_only: _Optional[bool] = ...) -> None: ...

class ModelRequest(_message.Message):
    __slots__ = ("collaborator", "round")
    COLLABORATOR_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    collaborator: str
    round: int
    def __init__(self, collaborator: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class Header(_message.Message):
    __slots__ = ("collaborator", "round", "total_size", "sha256", "num_samples", "metrics", "evaluate_only", "format")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    COLLABORATOR_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    TOTAL_SIZE_FIELD_NUMBER: _ClassVar[int]
    SHA256_FIELD_NUMBER: _ClassVar[int]
    NUM_SAMPLES_FIELD_NUMBER: _ClassVar[int]
    METRICS_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    collaborator: str
    round: int
    total_size: int
    sha256: bytes
    num_samples: int
    metrics: _containers.ScalarMap[str, float]
    evaluate_only: bool
    format: str
    def __init__(self, collaborator: _Optional[str] = ..., round: _Optional[int] = ..., total_size: _Optional[int] = ..., sha256: _Optional[bytes] = ..., num_samples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., evaluate_only: _Optional[bool] = ..., format: _Optional[str] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("header", "data")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    header: Header
    data: bytes
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., data: _Optional[bytes] = ...) -> None: ...

class UpdateAck(_message.Message):
    __slots__ = ("accepted", "message", "round")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    message: str
    round: int
    def __init__(self, accepted: _Optional[bool] = ..., message: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...
