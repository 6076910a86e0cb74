from collections.abc import Mapping as _Mapping
from typing import ClassVar as _ClassVar

from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from google.protobuf.internal import containers as _containers

DESCRIPTOR: _descriptor.FileDescriptor

class Evidence(_message.Message):
    __slots__ = ("extra_json", "kind", "provider", "quote")
    KIND_FIELD_NUMBER: _ClassVar[int]
    PROVIDER_FIELD_NUMBER: _ClassVar[int]
    QUOTE_FIELD_NUMBER: _ClassVar[int]
    EXTRA_JSON_FIELD_NUMBER: _ClassVar[int]
    kind: str
    provider: str
    quote: bytes
    extra_json: str
    def __init__(self, kind: str | None = ..., provider: str | None = ..., quote: bytes | None = ..., extra_json: str | None = ...) -> None: ...

class ChallengeRequest(_message.Message):
    __slots__ = ("collaborator", "nonce", "want_evidence")
    COLLABORATOR_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    WANT_EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    collaborator: str
    nonce: bytes
    want_evidence: bool
    def __init__(self, collaborator: str | None = ..., nonce: bytes | None = ..., want_evidence: bool | None = ...) -> None: ...

class Endorsement(_message.Message):
    __slots__ = ("certificate", "signature")
    CERTIFICATE_FIELD_NUMBER: _ClassVar[int]
    SIGNATURE_FIELD_NUMBER: _ClassVar[int]
    certificate: bytes
    signature: bytes
    def __init__(self, certificate: bytes | None = ..., signature: bytes | None = ...) -> None: ...

class ChallengeReply(_message.Message):
    __slots__ = ("aggregator_evidence", "endorsement", "evidence_required", "nonce", "plan_sections")
    class PlanSectionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: str | None = ..., value: bytes | None = ...) -> None: ...
    NONCE_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_REQUIRED_FIELD_NUMBER: _ClassVar[int]
    AGGREGATOR_EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    ENDORSEMENT_FIELD_NUMBER: _ClassVar[int]
    PLAN_SECTIONS_FIELD_NUMBER: _ClassVar[int]
    nonce: bytes
    evidence_required: bool
    aggregator_evidence: Evidence
    endorsement: Endorsement
    plan_sections: _containers.ScalarMap[str, bytes]
    def __init__(self, nonce: bytes | None = ..., evidence_required: bool | None = ..., aggregator_evidence: Evidence | _Mapping | None = ..., endorsement: Endorsement | _Mapping | None = ..., plan_sections: _Mapping[str, bytes] | None = ...) -> None: ...

class JoinRequest(_message.Message):
    __slots__ = ("collaborator", "evidence", "nonce", "plan_sections", "session_key")
    class PlanSectionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: str | None = ..., value: bytes | None = ...) -> None: ...
    COLLABORATOR_FIELD_NUMBER: _ClassVar[int]
    EVIDENCE_FIELD_NUMBER: _ClassVar[int]
    NONCE_FIELD_NUMBER: _ClassVar[int]
    SESSION_KEY_FIELD_NUMBER: _ClassVar[int]
    PLAN_SECTIONS_FIELD_NUMBER: _ClassVar[int]
    collaborator: str
    evidence: Evidence
    nonce: bytes
    session_key: bytes
    plan_sections: _containers.ScalarMap[str, bytes]
    def __init__(self, collaborator: str | None = ..., evidence: Evidence | _Mapping | None = ..., nonce: bytes | None = ..., session_key: bytes | None = ..., plan_sections: _Mapping[str, bytes] | None = ...) -> None: ...

class JoinReply(_message.Message):
    __slots__ = ("current_round", "data_port", "durable_round", "holds_update", "nonce", "plan_sections", "rounds", "run_id", "session_cert", "session_token")
    class PlanSectionsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: bytes
        def __init__(self, key: str | None = ..., value: bytes | None = ...) -> None: ...
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
    def __init__(self, run_id: str | None = ..., rounds: int | None = ..., current_round: int | None = ..., nonce: bytes | None = ..., data_port: int | None = ..., session_token: bytes | None = ..., session_cert: bytes | None = ..., plan_sections: _Mapping[str, bytes] | None = ..., holds_update: bool | None = ..., durable_round: int | None = ...) -> None: ...

class WaitRequest(_message.Message):
    __slots__ = ("after_round", "collaborator")
    COLLABORATOR_FIELD_NUMBER: _ClassVar[int]
    AFTER_ROUND_FIELD_NUMBER: _ClassVar[int]
    collaborator: str
    after_round: int
    def __init__(self, collaborator: str | None = ..., after_round: int | None = ...) -> None: ...

class WaitReply(_message.Message):
    __slots__ = ("done", "durable_round", "evaluate_only", "round", "round_config")
    class RoundConfigEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: ConfigValue
        def __init__(self, key: str | None = ..., value: ConfigValue | _Mapping | None = ...) -> None: ...
    ROUND_FIELD_NUMBER: _ClassVar[int]
    DONE_FIELD_NUMBER: _ClassVar[int]
    EVALUATE_ONLY_FIELD_NUMBER: _ClassVar[int]
    DURABLE_ROUND_FIELD_NUMBER: _ClassVar[int]
    ROUND_CONFIG_FIELD_NUMBER: _ClassVar[int]
    round: int
    done: bool
    evaluate_only: bool
    durable_round: int
    round_config: _containers.MessageMap[str, ConfigValue]
    def __init__(self, round: int | None = ..., done: bool | None = ..., evaluate_only: bool | None = ..., durable_round: int | None = ..., round_config: _Mapping[str, ConfigValue] | None = ...) -> None: ...

class ConfigValue(_message.Message):
    __slots__ = ("flag", "integer", "number", "text")
    NUMBER_FIELD_NUMBER: _ClassVar[int]
    INTEGER_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    FLAG_FIELD_NUMBER: _ClassVar[int]
    number: float
    integer: int
    text: str
    flag: bool
    def __init__(self, number: float | None = ..., integer: int | None = ..., text: str | None = ..., flag: bool | None = ...) -> None: ...

class ModelRequest(_message.Message):
    __slots__ = ("collaborator", "round")
    COLLABORATOR_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    collaborator: str
    round: int
    def __init__(self, collaborator: str | None = ..., round: int | None = ...) -> None: ...

class Header(_message.Message):
    __slots__ = ("collaborator", "crc32c", "encoding", "evaluate_only", "format", "metrics", "num_samples", "raw_size", "round", "sha256", "total_size")
    class MetricsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: str | None = ..., value: float | None = ...) -> None: ...
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
    def __init__(self, collaborator: str | None = ..., round: int | None = ..., total_size: int | None = ..., sha256: bytes | None = ..., num_samples: int | None = ..., metrics: _Mapping[str, float] | None = ..., evaluate_only: bool | None = ..., format: str | None = ..., crc32c: int | None = ..., encoding: str | None = ..., raw_size: int | None = ...) -> None: ...

class Chunk(_message.Message):
    __slots__ = ("data", "header", "offset")
    HEADER_FIELD_NUMBER: _ClassVar[int]
    DATA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    header: Header
    data: bytes
    offset: int
    def __init__(self, header: Header | _Mapping | None = ..., data: bytes | None = ..., offset: int | None = ...) -> None: ...

class UpdateAck(_message.Message):
    __slots__ = ("accepted", "message", "round")
    ACCEPTED_FIELD_NUMBER: _ClassVar[int]
    MESSAGE_FIELD_NUMBER: _ClassVar[int]
    ROUND_FIELD_NUMBER: _ClassVar[int]
    accepted: bool
    message: str
    round: int
    def __init__(self, accepted: bool | None = ..., message: str | None = ..., round: int | None = ...) -> None: ...
