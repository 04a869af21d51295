from server.qwen3guard.v1 import guard_pb2 as _guard_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Steer(_message.Message):
    __slots__ = ("feature", "strategy", "vector", "alpha", "offset", "trigger", "tokens")
    FEATURE_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    VECTOR_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    TRIGGER_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    feature: int
    strategy: str
    vector: Vector
    alpha: float
    offset: int
    trigger: str
    tokens: int
    def __init__(self, feature: _Optional[int] = ..., strategy: _Optional[str] = ..., vector: _Optional[_Union[Vector, _Mapping]] = ..., alpha: _Optional[float] = ..., offset: _Optional[int] = ..., trigger: _Optional[str] = ..., tokens: _Optional[int] = ...) -> None: ...

class Vector(_message.Message):
    __slots__ = ("values",)
    VALUES_FIELD_NUMBER: _ClassVar[int]
    values: _containers.RepeatedScalarFieldContainer[float]
    def __init__(self, values: _Optional[_Iterable[float]] = ...) -> None: ...

class Document(_message.Message):
    __slots__ = ("text", "question")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    QUESTION_FIELD_NUMBER: _ClassVar[int]
    text: str
    question: str
    def __init__(self, text: _Optional[str] = ..., question: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "domain", "messages", "sampling", "release_mode", "token_detail", "enable_thinking", "thinking_budget", "steer", "document")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    RELEASE_MODE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_DETAIL_FIELD_NUMBER: _ClassVar[int]
    ENABLE_THINKING_FIELD_NUMBER: _ClassVar[int]
    THINKING_BUDGET_FIELD_NUMBER: _ClassVar[int]
    STEER_FIELD_NUMBER: _ClassVar[int]
    DOCUMENT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    domain: str
    messages: _containers.RepeatedCompositeFieldContainer[_guard_pb2.ChatMessage]
    sampling: _guard_pb2.SamplingParams
    release_mode: _guard_pb2.ReleaseMode
    token_detail: _guard_pb2.TokenDetail
    enable_thinking: bool
    thinking_budget: int
    steer: _containers.RepeatedCompositeFieldContainer[Steer]
    document: Document
    def __init__(self, request_id: _Optional[str] = ..., domain: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[_guard_pb2.ChatMessage, _Mapping]]] = ..., sampling: _Optional[_Union[_guard_pb2.SamplingParams, _Mapping]] = ..., release_mode: _Optional[_Union[_guard_pb2.ReleaseMode, str]] = ..., token_detail: _Optional[_Union[_guard_pb2.TokenDetail, str]] = ..., enable_thinking: _Optional[bool] = ..., thinking_budget: _Optional[int] = ..., steer: _Optional[_Iterable[_Union[Steer, _Mapping]]] = ..., document: _Optional[_Union[Document, _Mapping]] = ...) -> None: ...

class GenerationStart(_message.Message):
    __slots__ = ("prompt", "backend", "request_id", "moderate_reasoning", "memory_agent")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    MODERATE_REASONING_FIELD_NUMBER: _ClassVar[int]
    MEMORY_AGENT_FIELD_NUMBER: _ClassVar[int]
    prompt: _guard_pb2.PromptVerdict
    backend: str
    request_id: str
    moderate_reasoning: bool
    memory_agent: bool
    def __init__(self, prompt: _Optional[_Union[_guard_pb2.PromptVerdict, _Mapping]] = ..., backend: _Optional[str] = ..., request_id: _Optional[str] = ..., moderate_reasoning: _Optional[bool] = ..., memory_agent: _Optional[bool] = ...) -> None: ...

class Progress(_message.Message):
    __slots__ = ("chunk", "chunks", "memory_tokens", "memory_truncated")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    CHUNKS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TRUNCATED_FIELD_NUMBER: _ClassVar[int]
    chunk: int
    chunks: int
    memory_tokens: int
    memory_truncated: bool
    def __init__(self, chunk: _Optional[int] = ..., chunks: _Optional[int] = ..., memory_tokens: _Optional[int] = ..., memory_truncated: _Optional[bool] = ...) -> None: ...

class Delta(_message.Message):
    __slots__ = ("token_ids", "text", "verdict")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    verdict: _guard_pb2.ChunkVerdict
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., verdict: _Optional[_Union[_guard_pb2.ChunkVerdict, _Mapping]] = ...) -> None: ...

class SteerReport(_message.Message):
    __slots__ = ("target", "alpha", "start", "tokens")
    TARGET_FIELD_NUMBER: _ClassVar[int]
    ALPHA_FIELD_NUMBER: _ClassVar[int]
    START_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    target: str
    alpha: float
    start: int
    tokens: int
    def __init__(self, target: _Optional[str] = ..., alpha: _Optional[float] = ..., start: _Optional[int] = ..., tokens: _Optional[int] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "reasoning_tokens", "answer_tokens", "memory_calls")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REASONING_TOKENS_FIELD_NUMBER: _ClassVar[int]
    ANSWER_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_CALLS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    reasoning_tokens: int
    answer_tokens: int
    memory_calls: int
    def __init__(self, prompt_tokens: _Optional[int] = ..., reasoning_tokens: _Optional[int] = ..., answer_tokens: _Optional[int] = ..., memory_calls: _Optional[int] = ...) -> None: ...

class GenerationEnd(_message.Message):
    __slots__ = ("finish_reason", "stopped", "reason", "category", "offset", "usage", "thinking_budget_reached", "steered", "released_tokens")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STOPPED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    THINKING_BUDGET_REACHED_FIELD_NUMBER: _ClassVar[int]
    STEERED_FIELD_NUMBER: _ClassVar[int]
    RELEASED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    finish_reason: str
    stopped: bool
    reason: str
    category: str
    offset: int
    usage: Usage
    thinking_budget_reached: bool
    steered: _containers.RepeatedCompositeFieldContainer[SteerReport]
    released_tokens: int
    def __init__(self, finish_reason: _Optional[str] = ..., stopped: _Optional[bool] = ..., reason: _Optional[str] = ..., category: _Optional[str] = ..., offset: _Optional[int] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ..., thinking_budget_reached: _Optional[bool] = ..., steered: _Optional[_Iterable[_Union[SteerReport, _Mapping]]] = ..., released_tokens: _Optional[int] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("start", "progress", "reasoning", "answer", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    PROGRESS_FIELD_NUMBER: _ClassVar[int]
    REASONING_FIELD_NUMBER: _ClassVar[int]
    ANSWER_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: GenerationStart
    progress: Progress
    reasoning: Delta
    answer: Delta
    end: GenerationEnd
    def __init__(self, start: _Optional[_Union[GenerationStart, _Mapping]] = ..., progress: _Optional[_Union[Progress, _Mapping]] = ..., reasoning: _Optional[_Union[Delta, _Mapping]] = ..., answer: _Optional[_Union[Delta, _Mapping]] = ..., end: _Optional[_Union[GenerationEnd, _Mapping]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("backend", "model", "context_window", "sae_loaded", "sae_layer", "sae_width", "strategies", "can_steer", "memory_window", "chunk_tokens", "memory_tokens", "demo", "max_alpha", "max_steer_tokens")
    BACKEND_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    CONTEXT_WINDOW_FIELD_NUMBER: _ClassVar[int]
    SAE_LOADED_FIELD_NUMBER: _ClassVar[int]
    SAE_LAYER_FIELD_NUMBER: _ClassVar[int]
    SAE_WIDTH_FIELD_NUMBER: _ClassVar[int]
    STRATEGIES_FIELD_NUMBER: _ClassVar[int]
    CAN_STEER_FIELD_NUMBER: _ClassVar[int]
    MEMORY_WINDOW_FIELD_NUMBER: _ClassVar[int]
    CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MEMORY_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DEMO_FIELD_NUMBER: _ClassVar[int]
    MAX_ALPHA_FIELD_NUMBER: _ClassVar[int]
    MAX_STEER_TOKENS_FIELD_NUMBER: _ClassVar[int]
    backend: str
    model: str
    context_window: int
    sae_loaded: bool
    sae_layer: int
    sae_width: int
    strategies: _containers.RepeatedScalarFieldContainer[str]
    can_steer: bool
    memory_window: int
    chunk_tokens: int
    memory_tokens: int
    demo: bool
    max_alpha: float
    max_steer_tokens: int
    def __init__(self, backend: _Optional[str] = ..., model: _Optional[str] = ..., context_window: _Optional[int] = ..., sae_loaded: _Optional[bool] = ..., sae_layer: _Optional[int] = ..., sae_width: _Optional[int] = ..., strategies: _Optional[_Iterable[str]] = ..., can_steer: _Optional[bool] = ..., memory_window: _Optional[int] = ..., chunk_tokens: _Optional[int] = ..., memory_tokens: _Optional[int] = ..., demo: _Optional[bool] = ..., max_alpha: _Optional[float] = ..., max_steer_tokens: _Optional[int] = ...) -> None: ...

class ListFeaturesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Feature(_message.Message):
    __slots__ = ("index", "strategy")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    index: int
    strategy: str
    def __init__(self, index: _Optional[int] = ..., strategy: _Optional[str] = ...) -> None: ...

class ListFeaturesResponse(_message.Message):
    __slots__ = ("features",)
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    features: _containers.RepeatedCompositeFieldContainer[Feature]
    def __init__(self, features: _Optional[_Iterable[_Union[Feature, _Mapping]]] = ...) -> None: ...

class RecallFeaturesRequest(_message.Message):
    __slots__ = ("keywords", "top_k", "min_hits", "limit")
    KEYWORDS_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    MIN_HITS_FIELD_NUMBER: _ClassVar[int]
    LIMIT_FIELD_NUMBER: _ClassVar[int]
    keywords: _containers.RepeatedScalarFieldContainer[str]
    top_k: int
    min_hits: int
    limit: int
    def __init__(self, keywords: _Optional[_Iterable[str]] = ..., top_k: _Optional[int] = ..., min_hits: _Optional[int] = ..., limit: _Optional[int] = ...) -> None: ...

class RecalledFeature(_message.Message):
    __slots__ = ("index", "hits", "tokens", "strategy")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    HITS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    STRATEGY_FIELD_NUMBER: _ClassVar[int]
    index: int
    hits: _containers.RepeatedScalarFieldContainer[str]
    tokens: _containers.RepeatedScalarFieldContainer[str]
    strategy: str
    def __init__(self, index: _Optional[int] = ..., hits: _Optional[_Iterable[str]] = ..., tokens: _Optional[_Iterable[str]] = ..., strategy: _Optional[str] = ...) -> None: ...

class RecallFeaturesResponse(_message.Message):
    __slots__ = ("features",)
    FEATURES_FIELD_NUMBER: _ClassVar[int]
    features: _containers.RepeatedCompositeFieldContainer[RecalledFeature]
    def __init__(self, features: _Optional[_Iterable[_Union[RecalledFeature, _Mapping]]] = ...) -> None: ...
