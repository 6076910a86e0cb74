from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

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

class ChallengeRequest(_message.Message):
    __slots__ = ("collaborator", "nonce", "want_evidence")
    COLLABORATOR_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    WANT_EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    collaborator: str
    nonce: bytes
    want_evidence: bool
    def __init__(self, collaborator: _Optional[str] = ..., nonce: _Optional[bytes] = ..., want_evidence: _Optional[bool] = ...) -> None: ...

class Endorsement(_message.Message):
    __slots__ = ("certificate", "signature")
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    certificate: bytes
    signature: bytes
    def __init__(self, certificate: _Optional[bytes] = ..., signature: _Optional[bytes] = ...) -> None: ...

class ChallengeReply(_message.Message):
    __slots__ = ("nonce", "evidence_required", "aggregator_evidence", "endorsement", "plan_sections", "workload_digest", "strategy_digest")
    class PlanSectionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    NONCE_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    AGGREGATOR_EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    ENDORSEMENT_FIELD_NUMBER: _ClassVar[int]
    PLAN_SECTIONS_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_DIGEST_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_DIGEST_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    evidence_required: bool
    aggregator_evidence: Evidence
    endorsement: Endorsement
    plan_sections: _containers.ScalarMap[str, bytes]
    workload_digest: str
    strategy_digest: str
    def __init__(self, nonce: _Optional[bytes] = ..., evidence_required: _Optional[bool] = ..., aggregator_evidence: _Optional[_Union[Evidence, _Mapping]] = ..., endorsement: _Optional[_Union[Endorsement, _Mapping]] = ..., plan_sections: _Optional[_Mapping[str, bytes]] = ..., workload_digest: _Optional[str] = ..., strategy_digest: _Optional[str] = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("collaborator", "evidence", "nonce", "session_key", "plan_sections", "workload_digest")
    class PlanSectionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    COLLABORATOR_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SESSION_KEY_FIELD_NUMBER: _ClassVar[int]
    PLAN_SECTIONS_FIELD_NUMBER: _ClassVar[int]
    WORKLOAD_DIGEST_FIELD_NUMBER: _ClassVar[int]
    collaborator: str
    evidence: Evidence
    nonce: bytes
    session_key: bytes
    plan_sections: _containers.ScalarMap[str, bytes]
    workload_digest: str
    def __init__(self, collaborator: _Optional[str] = ..., evidence: _Optional[_Union[Evidence, _Mapping]] = ..., nonce: _Optional[bytes] = ..., session_key: _Optional[bytes] = ..., plan_sections: _Optional[_Mapping[str, bytes]] = ..., workload_digest: _Optional[str] = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("run_id", "rounds", "current_round", "nonce", "data_port", "session_token", "session_cert", "plan_sections", "holds_update", "durable_round")
    class PlanSectionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: _Optional[str] = ..., value: _Optional[bytes] = ...) -> None: ...
    RUN_ID_FIELD_NUMBER: _ClassVar[int]
    ROUNDS_FIELD_NUMBER: _ClassVar[int]
    CURRENT_ROUND_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    DATA_PORT_FIELD_NUMBER: _ClassVar[int]
    SESSION_TOKEN_FIELD_NUMBER: _ClassVar[int]
    SESSION_CERT_FIELD_NUMBER: _ClassVar[int]
    PLAN_SECTIONS_FIELD_NUMBER: _ClassVar[int]
    HOLDS_UPDATE_FIELD_NUMBER: _ClassVar[int]
    DURABLE_ROUND_FIELD_NUMBER: _ClassVar[int]
    run_id: str
    rounds: int
    current_round: int
    nonce: bytes
    data_port: int
    session_token: bytes
    session_cert: bytes
    plan_sections: _containers.ScalarMap[str, bytes]
    holds_update: bool
    durable_round: int
    def __init__(self, run_id: _Optional[str] = ..., rounds: _Optional[int] = ..., current_round: _Optional[int] = ..., nonce: _Optional[bytes] = ..., data_port: _Optional[int] = ..., session_token: _Optional[bytes] = ..., session_cert: _Optional[bytes] = ..., plan_sections: _Optional[_Mapping[str, bytes]] = ..., holds_update: _Optional[bool] = ..., durable_round: _Optional[int] = ...) -> None: ...

class WaitRequest(_message.Message):
    __slots__ = ("collaborator", "after_round")
    COLLABORATOR_FIELD_NUMBER: _ClassVar[int]
    AFTER_ROUND_FIELD_NUMBER: _ClassVar[int]
    collaborator: str
    after_round: int
    def __init__(self, collaborator: _Optional[str] = ..., after_round: _Optional[int] = ...) -> None: ...

class WaitReply(_message.Message):
    __slots__ = ("round", "done", "evaluate_only", "durable_round", "round_config", "reattest")
    class RoundConfigEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ConfigValue
        def __init__(self, key: _Optional[str] = ..., value: _Optional[_Union[ConfigValue, _Mapping]] = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    DURABLE_ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUND_CONFIG_FIELD_NUMBER: _ClassVar[int]
    REATTEST_FIELD_NUMBER: _ClassVar[int]
    round: int
    done: bool
    evaluate_only: bool
    durable_round: int
    round_config: _containers.MessageMap[str, ConfigValue]
    reattest: bool
    def __init__(self, round: _Optional[int] = ..., done: _Optional[bool] = ..., evaluate_only: _Optional[bool] = ..., durable_round: _Optional[int] = ..., round_config: _Optional[_Mapping[str, ConfigValue]] = ..., reattest: _Optional[bool] = ...) -> None: ...

class ConfigValue(_message.Message):
    __slots__ = ("number", "integer", "text", "flag")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    INTEGER_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FLAG_FIELD_NUMBER: _ClassVar[int]
    number: float
    integer: int
    text: str
    flag: bool
    def __init__(self, number: _Optional[float] = ..., integer: _Optional[int] = ..., text: _Optional[str] = ..., flag: _Optional[bool] = ...) -> None: ...

class ModelRequest(_message.Message):
    __slots__ = ("collaborator", "round")
    COLLABORATOR_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    collaborator: str
    round: int
    def __init__(self, collaborator: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...

class Header(_message.Message):
    __slots__ = ("collaborator", "round", "total_size", "sha256", "num_samples", "metrics", "evaluate_only", "format", "crc32c", "encoding", "raw_size", "failure")
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
    CRC32C_FIELD_NUMBER: _ClassVar[int]
    ENCODING_FIELD_NUMBER: _ClassVar[int]
    RAW_SIZE_FIELD_NUMBER: _ClassVar[int]
    FAILURE_FIELD_NUMBER: _ClassVar[int]
    collaborator: str
    round: int
    total_size: int
    sha256: bytes
    num_samples: int
    metrics: _containers.ScalarMap[str, float]
    evaluate_only: bool
    format: str
    crc32c: int
    encoding: str
    raw_size: int
    failure: RoundFailure
    def __init__(self, collaborator: _Optional[str] = ..., round: _Optional[int] = ..., total_size: _Optional[int] = ..., sha256: _Optional[bytes] = ..., num_samples: _Optional[int] = ..., metrics: _Optional[_Mapping[str, float]] = ..., evaluate_only: _Optional[bool] = ..., format: _Optional[str] = ..., crc32c: _Optional[int] = ..., encoding: _Optional[str] = ..., raw_size: _Optional[int] = ..., failure: _Optional[_Union[RoundFailure, _Mapping]] = ...) -> None: ...

class RoundFailure(_message.Message):
    __slots__ = ("phase", "summary")
    PHASE_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    phase: str
    summary: str
    def __init__(self, phase: _Optional[str] = ..., summary: _Optional[str] = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("header", "data", "offset")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    header: Header
    data: bytes
    offset: int
    def __init__(self, header: _Optional[_Union[Header, _Mapping]] = ..., data: _Optional[bytes] = ..., offset: _Optional[int] = ...) -> None: ...

class UpdateAck(_message.Message):
    __slots__ = ("accepted", "message", "round")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    message: str
    round: int
    def __init__(self, accepted: _Optional[bool] = ..., message: _Optional[str] = ..., round: _Optional[int] = ...) -> None: ...
