from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class RiskLevel(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RISK_LEVEL_UNSPECIFIED: _ClassVar[RiskLevel]
    SAFE: _ClassVar[RiskLevel]
    CONTROVERSIAL: _ClassVar[RiskLevel]
    UNSAFE: _ClassVar[RiskLevel]

class Action(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    ACTION_UNSPECIFIED: _ClassVar[Action]
    CONTINUE: _ClassVar[Action]
    FLAG: _ClassVar[Action]
    REDACT: _ClassVar[Action]
    INTERRUPT: _ClassVar[Action]
    ALLOW: _ClassVar[Action]
    BLOCK: _ClassVar[Action]

class ReleaseMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    RELEASE_MODE_UNSPECIFIED: _ClassVar[ReleaseMode]
    HOLD_BACK: _ClassVar[ReleaseMode]
    OPTIMISTIC: _ClassVar[ReleaseMode]

class ControversialMode(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CONTROVERSIAL_MODE_UNSPECIFIED: _ClassVar[ControversialMode]
    STRICT: _ClassVar[ControversialMode]
    LOOSE: _ClassVar[ControversialMode]

class TokenDetail(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    TOKEN_DETAIL_UNSPECIFIED: _ClassVar[TokenDetail]
    ALL_TOKENS: _ClassVar[TokenDetail]
    NOT_SAFE_TOKENS: _ClassVar[TokenDetail]
    NO_TOKENS: _ClassVar[TokenDetail]

class Stage(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    STAGE_UNSPECIFIED: _ClassVar[Stage]
    PROMPT: _ClassVar[Stage]
    RESPONSE: _ClassVar[Stage]
RISK_LEVEL_UNSPECIFIED: RiskLevel
SAFE: RiskLevel
CONTROVERSIAL: RiskLevel
UNSAFE: RiskLevel
ACTION_UNSPECIFIED: Action
CONTINUE: Action
FLAG: Action
REDACT: Action
INTERRUPT: Action
ALLOW: Action
BLOCK: Action
RELEASE_MODE_UNSPECIFIED: ReleaseMode
HOLD_BACK: ReleaseMode
OPTIMISTIC: ReleaseMode
CONTROVERSIAL_MODE_UNSPECIFIED: ControversialMode
STRICT: ControversialMode
LOOSE: ControversialMode
TOKEN_DETAIL_UNSPECIFIED: TokenDetail
ALL_TOKENS: TokenDetail
NOT_SAFE_TOKENS: TokenDetail
NO_TOKENS: TokenDetail
STAGE_UNSPECIFIED: Stage
PROMPT: Stage
RESPONSE: Stage

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class OpenRequest(_message.Message):
    __slots__ = ("request_id", "domain", "messages", "prompt_token_ids", "release_mode", "controversial", "debounce", "include_probabilities", "token_detail")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    RELEASE_MODE_FIELD_NUMBER: _ClassVar[int]
    CONTROVERSIAL_FIELD_NUMBER: _ClassVar[int]
    DEBOUNCE_FIELD_NUMBER: _ClassVar[int]
    INCLUDE_PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    TOKEN_DETAIL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    domain: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    release_mode: ReleaseMode
    controversial: ControversialMode
    debounce: int
    include_probabilities: bool
    token_detail: TokenDetail
    def __init__(self, request_id: _Optional[str] = ..., domain: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., release_mode: _Optional[_Union[ReleaseMode, str]] = ..., controversial: _Optional[_Union[ControversialMode, str]] = ..., debounce: _Optional[int] = ..., include_probabilities: _Optional[bool] = ..., token_detail: _Optional[_Union[TokenDetail, str]] = ...) -> None: ...

class ChunkRequest(_message.Message):
    __slots__ = ("token_ids", "text")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ...) -> None: ...

class CloseRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ModerateRequest(_message.Message):
    __slots__ = ("open", "chunk", "close")
    OPEN_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    CLOSE_FIELD_NUMBER: _ClassVar[int]
    open: OpenRequest
    chunk: ChunkRequest
    close: CloseRequest
    def __init__(self, open: _Optional[_Union[OpenRequest, _Mapping]] = ..., chunk: _Optional[_Union[ChunkRequest, _Mapping]] = ..., close: _Optional[_Union[CloseRequest, _Mapping]] = ...) -> None: ...

class Verdict(_message.Message):
    __slots__ = ("risk", "risk_label", "risk_probability", "category", "risk_probs", "category_probs", "action")
    class RiskProbsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class CategoryProbsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    RISK_FIELD_NUMBER: _ClassVar[int]
    RISK_LABEL_FIELD_NUMBER: _ClassVar[int]
    RISK_PROBABILITY_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    RISK_PROBS_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_PROBS_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    risk: RiskLevel
    risk_label: str
    risk_probability: float
    category: str
    risk_probs: _containers.ScalarMap[str, float]
    category_probs: _containers.ScalarMap[str, float]
    action: Action
    def __init__(self, risk: _Optional[_Union[RiskLevel, str]] = ..., risk_label: _Optional[str] = ..., risk_probability: _Optional[float] = ..., category: _Optional[str] = ..., risk_probs: _Optional[_Mapping[str, float]] = ..., category_probs: _Optional[_Mapping[str, float]] = ..., action: _Optional[_Union[Action, str]] = ...) -> None: ...

class TokenVerdict(_message.Message):
    __slots__ = ("index", "token_id", "verdict")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    index: int
    token_id: int
    verdict: Verdict
    def __init__(self, index: _Optional[int] = ..., token_id: _Optional[int] = ..., verdict: _Optional[_Union[Verdict, _Mapping]] = ...) -> None: ...

class Timing(_message.Message):
    __slots__ = ("queue_ms", "compute_ms")
    QUEUE_MS_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_MS_FIELD_NUMBER: _ClassVar[int]
    queue_ms: float
    compute_ms: float
    def __init__(self, queue_ms: _Optional[float] = ..., compute_ms: _Optional[float] = ...) -> None: ...

class PromptVerdict(_message.Message):
    __slots__ = ("verdict", "prompt_tokens", "timing", "reason", "policy_version", "topic", "topic_similarity")
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    TOPIC_SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    verdict: Verdict
    prompt_tokens: int
    timing: Timing
    reason: str
    policy_version: str
    topic: str
    topic_similarity: float
    def __init__(self, verdict: _Optional[_Union[Verdict, _Mapping]] = ..., prompt_tokens: _Optional[int] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., reason: _Optional[str] = ..., policy_version: _Optional[str] = ..., topic: _Optional[str] = ..., topic_similarity: _Optional[float] = ...) -> None: ...

class ChunkVerdict(_message.Message):
    __slots__ = ("tokens", "action", "released", "released_text", "released_chars", "first_unsafe_index", "judged", "received", "timing", "redactions", "unjudged", "reason")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    RELEASED_TEXT_FIELD_NUMBER: _ClassVar[int]
    RELEASED_CHARS_FIELD_NUMBER: _ClassVar[int]
    FIRST_UNSAFE_INDEX_FIELD_NUMBER: _ClassVar[int]
    JUDGED_FIELD_NUMBER: _ClassVar[int]
    RECEIVED_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    REDACTIONS_FIELD_NUMBER: _ClassVar[int]
    UNJUDGED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[TokenVerdict]
    action: Action
    released: int
    released_text: str
    released_chars: int
    first_unsafe_index: int
    judged: int
    received: int
    timing: Timing
    redactions: _containers.RepeatedCompositeFieldContainer[Span]
    unjudged: bool
    reason: str
    def __init__(self, tokens: _Optional[_Iterable[_Union[TokenVerdict, _Mapping]]] = ..., action: _Optional[_Union[Action, str]] = ..., released: _Optional[int] = ..., released_text: _Optional[str] = ..., released_chars: _Optional[int] = ..., first_unsafe_index: _Optional[int] = ..., judged: _Optional[int] = ..., received: _Optional[int] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., redactions: _Optional[_Iterable[_Union[Span, _Mapping]]] = ..., unjudged: _Optional[bool] = ..., reason: _Optional[str] = ...) -> None: ...

class Span(_message.Message):
    __slots__ = ("start", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: int
    end: int
    def __init__(self, start: _Optional[int] = ..., end: _Optional[int] = ...) -> None: ...

class FinalResponse(_message.Message):
    __slots__ = ("action", "judged", "released", "released_chars", "first_unsafe_index", "category", "reason", "released_text", "redactions")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    JUDGED_FIELD_NUMBER: _ClassVar[int]
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    RELEASED_CHARS_FIELD_NUMBER: _ClassVar[int]
    FIRST_UNSAFE_INDEX_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    RELEASED_TEXT_FIELD_NUMBER: _ClassVar[int]
    REDACTIONS_FIELD_NUMBER: _ClassVar[int]
    action: Action
    judged: int
    released: int
    released_chars: int
    first_unsafe_index: int
    category: str
    reason: str
    released_text: str
    redactions: _containers.RepeatedCompositeFieldContainer[Span]
    def __init__(self, action: _Optional[_Union[Action, str]] = ..., judged: _Optional[int] = ..., released: _Optional[int] = ..., released_chars: _Optional[int] = ..., first_unsafe_index: _Optional[int] = ..., category: _Optional[str] = ..., reason: _Optional[str] = ..., released_text: _Optional[str] = ..., redactions: _Optional[_Iterable[_Union[Span, _Mapping]]] = ...) -> None: ...

class ModerateResponse(_message.Message):
    __slots__ = ("prompt", "chunk", "final")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    FINAL_FIELD_NUMBER: _ClassVar[int]
    prompt: PromptVerdict
    chunk: ChunkVerdict
    final: FinalResponse
    def __init__(self, prompt: _Optional[_Union[PromptVerdict, _Mapping]] = ..., chunk: _Optional[_Union[ChunkVerdict, _Mapping]] = ..., final: _Optional[_Union[FinalResponse, _Mapping]] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class Limits(_message.Message):
    __slots__ = ("max_sessions", "max_tokens_per_session", "max_chunk_tokens", "max_queued_chunks", "idle_timeout_s", "max_step_tokens", "max_kv_cache_bytes", "max_text_chars")
    MAX_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_PER_SESSION_FIELD_NUMBER: _ClassVar[int]
    MAX_CHUNK_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_QUEUED_CHUNKS_FIELD_NUMBER: _ClassVar[int]
    IDLE_TIMEOUT_S_FIELD_NUMBER: _ClassVar[int]
    MAX_STEP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    MAX_KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    MAX_TEXT_CHARS_FIELD_NUMBER: _ClassVar[int]
    max_sessions: int
    max_tokens_per_session: int
    max_chunk_tokens: int
    max_queued_chunks: int
    idle_timeout_s: float
    max_step_tokens: int
    max_kv_cache_bytes: int
    max_text_chars: int
    def __init__(self, max_sessions: _Optional[int] = ..., max_tokens_per_session: _Optional[int] = ..., max_chunk_tokens: _Optional[int] = ..., max_queued_chunks: _Optional[int] = ..., idle_timeout_s: _Optional[float] = ..., max_step_tokens: _Optional[int] = ..., max_kv_cache_bytes: _Optional[int] = ..., max_text_chars: _Optional[int] = ...) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("version", "model_name", "demo", "notice", "num_layers", "hidden_size", "num_attention_heads", "num_key_value_heads", "head_dim", "vocab_size", "risk_labels", "categories", "query_risk_labels", "query_categories", "device", "dtype", "limits", "live_sessions", "kv_cache_bytes")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    MODEL_NAME_FIELD_NUMBER: _ClassVar[int]
    DEMO_FIELD_NUMBER: _ClassVar[int]
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    HIDDEN_SIZE_FIELD_NUMBER: _ClassVar[int]
    NUM_ATTENTION_HEADS_FIELD_NUMBER: _ClassVar[int]
    NUM_KEY_VALUE_HEADS_FIELD_NUMBER: _ClassVar[int]
    HEAD_DIM_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    RISK_LABELS_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    QUERY_RISK_LABELS_FIELD_NUMBER: _ClassVar[int]
    QUERY_CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    LIMITS_FIELD_NUMBER: _ClassVar[int]
    LIVE_SESSIONS_FIELD_NUMBER: _ClassVar[int]
    KV_CACHE_BYTES_FIELD_NUMBER: _ClassVar[int]
    version: str
    model_name: str
    demo: bool
    notice: str
    num_layers: int
    hidden_size: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    vocab_size: int
    risk_labels: _containers.RepeatedScalarFieldContainer[str]
    categories: _containers.RepeatedScalarFieldContainer[str]
    query_risk_labels: _containers.RepeatedScalarFieldContainer[str]
    query_categories: _containers.RepeatedScalarFieldContainer[str]
    device: str
    dtype: str
    limits: Limits
    live_sessions: int
    kv_cache_bytes: int
    def __init__(self, version: _Optional[str] = ..., model_name: _Optional[str] = ..., demo: _Optional[bool] = ..., notice: _Optional[str] = ..., num_layers: _Optional[int] = ..., hidden_size: _Optional[int] = ..., num_attention_heads: _Optional[int] = ..., num_key_value_heads: _Optional[int] = ..., head_dim: _Optional[int] = ..., vocab_size: _Optional[int] = ..., risk_labels: _Optional[_Iterable[str]] = ..., categories: _Optional[_Iterable[str]] = ..., query_risk_labels: _Optional[_Iterable[str]] = ..., query_categories: _Optional[_Iterable[str]] = ..., device: _Optional[str] = ..., dtype: _Optional[str] = ..., limits: _Optional[_Union[Limits, _Mapping]] = ..., live_sessions: _Optional[int] = ..., kv_cache_bytes: _Optional[int] = ...) -> None: ...

class ListPoliciesRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class PolicySummary(_message.Message):
    __slots__ = ("domain", "description", "version", "extends", "source")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    DESCRIPTION_FIELD_NUMBER: _ClassVar[int]
    VERSION_FIELD_NUMBER: _ClassVar[int]
    EXTENDS_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FIELD_NUMBER: _ClassVar[int]
    domain: str
    description: str
    version: str
    extends: str
    source: str
    def __init__(self, domain: _Optional[str] = ..., description: _Optional[str] = ..., version: _Optional[str] = ..., extends: _Optional[str] = ..., source: _Optional[str] = ...) -> None: ...

class ListPoliciesResponse(_message.Message):
    __slots__ = ("policies", "generation", "last_error", "default_domain", "loaded_at_unix")
    POLICIES_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    LAST_ERROR_FIELD_NUMBER: _ClassVar[int]
    DEFAULT_DOMAIN_FIELD_NUMBER: _ClassVar[int]
    LOADED_AT_UNIX_FIELD_NUMBER: _ClassVar[int]
    policies: _containers.RepeatedCompositeFieldContainer[PolicySummary]
    generation: int
    last_error: str
    default_domain: str
    loaded_at_unix: float
    def __init__(self, policies: _Optional[_Iterable[_Union[PolicySummary, _Mapping]]] = ..., generation: _Optional[int] = ..., last_error: _Optional[str] = ..., default_domain: _Optional[str] = ..., loaded_at_unix: _Optional[float] = ...) -> None: ...

class GetPolicyRequest(_message.Message):
    __slots__ = ("domain",)
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    domain: str
    def __init__(self, domain: _Optional[str] = ...) -> None: ...

class PolicyDetail(_message.Message):
    __slots__ = ("summary", "effective_yaml")
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_YAML_FIELD_NUMBER: _ClassVar[int]
    summary: PolicySummary
    effective_yaml: str
    def __init__(self, summary: _Optional[_Union[PolicySummary, _Mapping]] = ..., effective_yaml: _Optional[str] = ...) -> None: ...

class EvaluateRequest(_message.Message):
    __slots__ = ("domain", "stage", "risk", "category", "probabilities", "text")
    class ProbabilitiesEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    STAGE_FIELD_NUMBER: _ClassVar[int]
    RISK_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    PROBABILITIES_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    domain: str
    stage: Stage
    risk: RiskLevel
    category: str
    probabilities: _containers.ScalarMap[str, float]
    text: str
    def __init__(self, domain: _Optional[str] = ..., stage: _Optional[_Union[Stage, str]] = ..., risk: _Optional[_Union[RiskLevel, str]] = ..., category: _Optional[str] = ..., probabilities: _Optional[_Mapping[str, float]] = ..., text: _Optional[str] = ...) -> None: ...

class EvaluateResponse(_message.Message):
    __slots__ = ("action", "effective_risk", "policy_version", "topic", "topic_similarity")
    ACTION_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_RISK_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    TOPIC_FIELD_NUMBER: _ClassVar[int]
    TOPIC_SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    action: Action
    effective_risk: RiskLevel
    policy_version: str
    topic: str
    topic_similarity: float
    def __init__(self, action: _Optional[_Union[Action, str]] = ..., effective_risk: _Optional[_Union[RiskLevel, str]] = ..., policy_version: _Optional[str] = ..., topic: _Optional[str] = ..., topic_similarity: _Optional[float] = ...) -> None: ...

class ReloadRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ReloadResponse(_message.Message):
    __slots__ = ("ok", "changed", "generation", "error")
    OK_FIELD_NUMBER: _ClassVar[int]
    CHANGED_FIELD_NUMBER: _ClassVar[int]
    GENERATION_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    ok: bool
    changed: bool
    generation: int
    error: str
    def __init__(self, ok: _Optional[bool] = ..., changed: _Optional[bool] = ..., generation: _Optional[int] = ..., error: _Optional[str] = ...) -> None: ...

class ClassifyRequest(_message.Message):
    __slots__ = ("request_id", "domain", "messages", "scored")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    SCORED_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    domain: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    scored: bool
    def __init__(self, request_id: _Optional[str] = ..., domain: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., scored: _Optional[bool] = ...) -> None: ...

class Judgment(_message.Message):
    __slots__ = ("stage", "risk", "categories", "refusal", "action", "effective_risk", "raw_text", "risk_probs", "category_probs", "timing", "reason", "policy_version", "demo")
    class RiskProbsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    class CategoryProbsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
    STAGE_FIELD_NUMBER: _ClassVar[int]
    RISK_FIELD_NUMBER: _ClassVar[int]
    CATEGORIES_FIELD_NUMBER: _ClassVar[int]
    REFUSAL_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    EFFECTIVE_RISK_FIELD_NUMBER: _ClassVar[int]
    RAW_TEXT_FIELD_NUMBER: _ClassVar[int]
    RISK_PROBS_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_PROBS_FIELD_NUMBER: _ClassVar[int]
    TIMING_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    DEMO_FIELD_NUMBER: _ClassVar[int]
    stage: Stage
    risk: RiskLevel
    categories: _containers.RepeatedScalarFieldContainer[str]
    refusal: bool
    action: Action
    effective_risk: RiskLevel
    raw_text: str
    risk_probs: _containers.ScalarMap[str, float]
    category_probs: _containers.ScalarMap[str, float]
    timing: Timing
    reason: str
    policy_version: str
    demo: bool
    def __init__(self, stage: _Optional[_Union[Stage, str]] = ..., risk: _Optional[_Union[RiskLevel, str]] = ..., categories: _Optional[_Iterable[str]] = ..., refusal: _Optional[bool] = ..., action: _Optional[_Union[Action, str]] = ..., effective_risk: _Optional[_Union[RiskLevel, str]] = ..., raw_text: _Optional[str] = ..., risk_probs: _Optional[_Mapping[str, float]] = ..., category_probs: _Optional[_Mapping[str, float]] = ..., timing: _Optional[_Union[Timing, _Mapping]] = ..., reason: _Optional[str] = ..., policy_version: _Optional[str] = ..., demo: _Optional[bool] = ...) -> None: ...

class ClassifyBatchRequest(_message.Message):
    __slots__ = ("requests",)
    REQUESTS_FIELD_NUMBER: _ClassVar[int]
    requests: _containers.RepeatedCompositeFieldContainer[ClassifyRequest]
    def __init__(self, requests: _Optional[_Iterable[_Union[ClassifyRequest, _Mapping]]] = ...) -> None: ...

class ClassifyBatchResponse(_message.Message):
    __slots__ = ("judgments",)
    JUDGMENTS_FIELD_NUMBER: _ClassVar[int]
    judgments: _containers.RepeatedCompositeFieldContainer[Judgment]
    def __init__(self, judgments: _Optional[_Iterable[_Union[Judgment, _Mapping]]] = ...) -> None: ...

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "max_tokens", "seed", "stop")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    max_tokens: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., max_tokens: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("request_id", "domain", "messages", "prompt_token_ids", "sampling", "release_mode", "token_detail")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    RELEASE_MODE_FIELD_NUMBER: _ClassVar[int]
    TOKEN_DETAIL_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    domain: str
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    sampling: SamplingParams
    release_mode: ReleaseMode
    token_detail: TokenDetail
    def __init__(self, request_id: _Optional[str] = ..., domain: _Optional[str] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., release_mode: _Optional[_Union[ReleaseMode, str]] = ..., token_detail: _Optional[_Union[TokenDetail, str]] = ...) -> None: ...

class GenerationStart(_message.Message):
    __slots__ = ("prompt", "upstream", "input_path", "upstream_request_id")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_FIELD_NUMBER: _ClassVar[int]
    INPUT_PATH_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    prompt: PromptVerdict
    upstream: str
    input_path: str
    upstream_request_id: str
    def __init__(self, prompt: _Optional[_Union[PromptVerdict, _Mapping]] = ..., upstream: _Optional[str] = ..., input_path: _Optional[str] = ..., upstream_request_id: _Optional[str] = ...) -> None: ...

class GenerationChunk(_message.Message):
    __slots__ = ("token_ids", "text", "verdict")
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    TEXT_FIELD_NUMBER: _ClassVar[int]
    VERDICT_FIELD_NUMBER: _ClassVar[int]
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    text: str
    verdict: ChunkVerdict
    def __init__(self, token_ids: _Optional[_Iterable[int]] = ..., text: _Optional[str] = ..., verdict: _Optional[_Union[ChunkVerdict, _Mapping]] = ...) -> None: ...

class GenerationEnd(_message.Message):
    __slots__ = ("finish_reason", "stopped", "reason", "offset", "category", "released_tokens", "generated_tokens", "tokens_after_interrupt", "upstream_finish_reason")
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    STOPPED_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    OFFSET_FIELD_NUMBER: _ClassVar[int]
    CATEGORY_FIELD_NUMBER: _ClassVar[int]
    RELEASED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    GENERATED_TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOKENS_AFTER_INTERRUPT_FIELD_NUMBER: _ClassVar[int]
    UPSTREAM_FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    finish_reason: str
    stopped: bool
    reason: str
    offset: int
    category: str
    released_tokens: int
    generated_tokens: int
    tokens_after_interrupt: int
    upstream_finish_reason: str
    def __init__(self, finish_reason: _Optional[str] = ..., stopped: _Optional[bool] = ..., reason: _Optional[str] = ..., offset: _Optional[int] = ..., category: _Optional[str] = ..., released_tokens: _Optional[int] = ..., generated_tokens: _Optional[int] = ..., tokens_after_interrupt: _Optional[int] = ..., upstream_finish_reason: _Optional[str] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("start", "chunk", "end")
    START_FIELD_NUMBER: _ClassVar[int]
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    END_FIELD_NUMBER: _ClassVar[int]
    start: GenerationStart
    chunk: GenerationChunk
    end: GenerationEnd
    def __init__(self, start: _Optional[_Union[GenerationStart, _Mapping]] = ..., chunk: _Optional[_Union[GenerationChunk, _Mapping]] = ..., end: _Optional[_Union[GenerationEnd, _Mapping]] = ...) -> None: ...

class ReplayOptions(_message.Message):
    __slots__ = ("domain", "candidate_yaml")
    DOMAIN_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_YAML_FIELD_NUMBER: _ClassVar[int]
    domain: str
    candidate_yaml: str
    def __init__(self, domain: _Optional[str] = ..., candidate_yaml: _Optional[str] = ...) -> None: ...

class ReplayRequest(_message.Message):
    __slots__ = ("options", "example_json")
    OPTIONS_FIELD_NUMBER: _ClassVar[int]
    EXAMPLE_JSON_FIELD_NUMBER: _ClassVar[int]
    options: ReplayOptions
    example_json: str
    def __init__(self, options: _Optional[_Union[ReplayOptions, _Mapping]] = ..., example_json: _Optional[str] = ...) -> None: ...

class ReplayOutcome(_message.Message):
    __slots__ = ("index", "id", "error", "prompt_action", "response_action", "interrupt_index", "released", "candidate_prompt_action", "candidate_response_action", "candidate_interrupt_index")
    INDEX_FIELD_NUMBER: _ClassVar[int]
    ID_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    PROMPT_ACTION_FIELD_NUMBER: _ClassVar[int]
    RESPONSE_ACTION_FIELD_NUMBER: _ClassVar[int]
    INTERRUPT_INDEX_FIELD_NUMBER: _ClassVar[int]
    RELEASED_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_PROMPT_ACTION_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_RESPONSE_ACTION_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_INTERRUPT_INDEX_FIELD_NUMBER: _ClassVar[int]
    index: int
    id: str
    error: str
    prompt_action: Action
    response_action: Action
    interrupt_index: int
    released: int
    candidate_prompt_action: Action
    candidate_response_action: Action
    candidate_interrupt_index: int
    def __init__(self, index: _Optional[int] = ..., id: _Optional[str] = ..., error: _Optional[str] = ..., prompt_action: _Optional[_Union[Action, str]] = ..., response_action: _Optional[_Union[Action, str]] = ..., interrupt_index: _Optional[int] = ..., released: _Optional[int] = ..., candidate_prompt_action: _Optional[_Union[Action, str]] = ..., candidate_response_action: _Optional[_Union[Action, str]] = ..., candidate_interrupt_index: _Optional[int] = ...) -> None: ...

class ReplaySummary(_message.Message):
    __slots__ = ("examples", "skipped", "policy_version", "metrics_json", "candidate_policy_version", "candidate_metrics_json", "changes_json")
    EXAMPLES_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_POLICY_VERSION_FIELD_NUMBER: _ClassVar[int]
    CANDIDATE_METRICS_JSON_FIELD_NUMBER: _ClassVar[int]
    CHANGES_JSON_FIELD_NUMBER: _ClassVar[int]
    examples: int
    skipped: int
    policy_version: str
    metrics_json: str
    candidate_policy_version: str
    candidate_metrics_json: str
    changes_json: str
    def __init__(self, examples: _Optional[int] = ..., skipped: _Optional[int] = ..., policy_version: _Optional[str] = ..., metrics_json: _Optional[str] = ..., candidate_policy_version: _Optional[str] = ..., candidate_metrics_json: _Optional[str] = ..., changes_json: _Optional[str] = ...) -> None: ...

class ReplayResponse(_message.Message):
    __slots__ = ("outcome", "summary")
    OUTCOME_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    outcome: ReplayOutcome
    summary: ReplaySummary
    def __init__(self, outcome: _Optional[_Union[ReplayOutcome, _Mapping]] = ..., summary: _Optional[_Union[ReplaySummary, _Mapping]] = ...) -> None: ...
