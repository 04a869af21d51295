from server.qwen3guard.media.v1 import media_pb2 as _media_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Truncation(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TRUNCATION_UNSPECIFIED: _ClassVar[Truncation]
    TRUNCATION_RIGHT: _ClassVar[Truncation]
    TRUNCATION_LEFT: _ClassVar[Truncation]
TRUNCATION_UNSPECIFIED: Truncation
TRUNCATION_RIGHT: Truncation
TRUNCATION_LEFT: Truncation

class RerankRequest(_message.Message):
    __slots__ = ("query", "documents", "instruction", "top_n", "return_text", "raw_scores", "truncation", "request_id", "query_content", "document_contents")
    QUERY_FIELD_NUMBER: _ClassVar[int]
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    TOP_N_FIELD_NUMBER: _ClassVar[int]
    RETURN_TEXT_FIELD_NUMBER: _ClassVar[int]
    RAW_SCORES_FIELD_NUMBER: _ClassVar[int]
    TRUNCATION_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    QUERY_CONTENT_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_CONTENTS_FIELD_NUMBER: _ClassVar[int]
    query: str
    documents: _containers.RepeatedScalarFieldContainer[str]
    instruction: str
    top_n: int
    return_text: bool
    raw_scores: bool
    truncation: Truncation
    request_id: str
    query_content: _media_pb2.Content
    document_contents: _containers.RepeatedCompositeFieldContainer[_media_pb2.Content]
    def __init__(self, query: _Optional[str] = ..., documents: _Optional[_Iterable[str]] = ..., instruction: _Optional[str] = ..., top_n: _Optional[int] = ..., return_text: _Optional[bool] = ..., raw_scores: _Optional[bool] = ..., truncation: _Optional[_Union[Truncation, str]] = ..., request_id: _Optional[str] = ..., query_content: _Optional[_Union[_media_pb2.Content, _Mapping]] = ..., document_contents: _Optional[_Iterable[_Union[_media_pb2.Content, _Mapping]]] = ...) -> None: ...

class Rank(_message.Message):
    __slots__ = ("index", "score", "text", "tokens")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    index: int
    score: float
    text: str
    tokens: int
    def __init__(self, index: _Optional[int] = ..., score: _Optional[float] = ..., text: _Optional[str] = ..., tokens: _Optional[int] = ...) -> None: ...

class Metadata(_message.Message):
    __slots__ = ("documents", "tokens", "queue_ms", "inference_ms", "total_ms", "batch_size")
    DOCUMENTS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    INFERENCE_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    BATCH_SIZE_FIELD_NUMBER: _ClassVar[int]
    documents: int
    tokens: int
    queue_ms: float
    inference_ms: float
    total_ms: float
    batch_size: int
    def __init__(self, documents: _Optional[int] = ..., tokens: _Optional[int] = ..., queue_ms: _Optional[float] = ..., inference_ms: _Optional[float] = ..., total_ms: _Optional[float] = ..., batch_size: _Optional[int] = ...) -> None: ...

class RerankResponse(_message.Message):
    __slots__ = ("ranks", "metadata", "request_id")
    RANKS_FIELD_NUMBER: _ClassVar[int]
    METADATA_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ranks: _containers.RepeatedCompositeFieldContainer[Rank]
    metadata: Metadata
    request_id: str
    def __init__(self, ranks: _Optional[_Iterable[_Union[Rank, _Mapping]]] = ..., metadata: _Optional[_Union[Metadata, _Mapping]] = ..., request_id: _Optional[str] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model", "kind", "max_input_tokens", "max_batch_tokens", "max_client_batch", "default_instruction", "demo", "backend", "modalities", "vision_limits")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    MAX_INPUT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_CLIENT_BATCH_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_INSTRUCTION_FIELD_NUMBER: _ClassVar[int]
    DEMO_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    MODALITIES_FIELD_NUMBER: _ClassVar[int]
    VISION_LIMITS_FIELD_NUMBER: _ClassVar[int]
    model: str
    kind: str
    max_input_tokens: int
    max_batch_tokens: int
    max_client_batch: int
    default_instruction: str
    demo: bool
    backend: str
    modalities: _containers.RepeatedScalarFieldContainer[str]
    vision_limits: _media_pb2.VisionLimits
    def __init__(self, model: _Optional[str] = ..., kind: _Optional[str] = ..., max_input_tokens: _Optional[int] = ..., max_batch_tokens: _Optional[int] = ..., max_client_batch: _Optional[int] = ..., default_instruction: _Optional[str] = ..., demo: _Optional[bool] = ..., backend: _Optional[str] = ..., modalities: _Optional[_Iterable[str]] = ..., vision_limits: _Optional[_Union[_media_pb2.VisionLimits, _Mapping]] = ...) -> None: ...
