from server.qwen3guard.v1 import guard_pb2 as _guard_pb2
from google.protobuf.internal import containers as _containers
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class ScoreRequest(_message.Message):
    __slots__ = ("request_id", "prompt_token_ids", "continuation_token_ids", "prompt_text", "continuation_text")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    CONTINUATION_TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TEXT_FIELD_NUMBER: _ClassVar[int]
    CONTINUATION_TEXT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    prompt_token_ids: _containers.RepeatedScalarFieldContainer[int]
    continuation_token_ids: _containers.RepeatedScalarFieldContainer[int]
    prompt_text: str
    continuation_text: str
    def __init__(self, request_id: _Optional[str] = ..., prompt_token_ids: _Optional[_Iterable[int]] = ..., continuation_token_ids: _Optional[_Iterable[int]] = ..., prompt_text: _Optional[str] = ..., continuation_text: _Optional[str] = ...) -> None: ...

class TokenScore(_message.Message):
    __slots__ = ("token_id", "logprob", "greedy")
    TOKEN_ID_FIELD_NUMBER: _ClassVar[int]
    LOGPROB_FIELD_NUMBER: _ClassVar[int]
    GREEDY_FIELD_NUMBER: _ClassVar[int]
    token_id: int
    logprob: float
    greedy: bool
    def __init__(self, token_id: _Optional[int] = ..., logprob: _Optional[float] = ..., greedy: _Optional[bool] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("tokens", "total_logprob", "prompt_tokens", "request_id", "total_ms")
    TOKENS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    TOTAL_MS_FIELD_NUMBER: _ClassVar[int]
    tokens: _containers.RepeatedCompositeFieldContainer[TokenScore]
    total_logprob: float
    prompt_tokens: int
    request_id: str
    total_ms: float
    def __init__(self, tokens: _Optional[_Iterable[_Union[TokenScore, _Mapping]]] = ..., total_logprob: _Optional[float] = ..., prompt_tokens: _Optional[int] = ..., request_id: _Optional[str] = ..., total_ms: _Optional[float] = ...) -> None: ...

class InfoRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class InfoResponse(_message.Message):
    __slots__ = ("model", "parscale_n", "prefix_tokens", "smoothing", "kv_bytes_per_token", "kv_bytes_prefix", "max_requests", "max_tokens_per_request", "max_step_tokens", "dtype", "device", "vocab_size", "demo", "notice")
    MODEL_FIELD_NUMBER: _ClassVar[int]
    PARSCALE_N_FIELD_NUMBER: _ClassVar[int]
    PREFIX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SMOOTHING_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    KV_BYTES_PREFIX_FIELD_NUMBER: _ClassVar[int]
    MAX_REQUESTS_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_PER_REQUEST_FIELD_NUMBER: _ClassVar[int]
    MAX_STEP_TOKENS_FIELD_NUMBER: _ClassVar[int]
    DTYPE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    VOCAB_SIZE_FIELD_NUMBER: _ClassVar[int]
    DEMO_FIELD_NUMBER: _ClassVar[int]
    NOTICE_FIELD_NUMBER: _ClassVar[int]
    model: str
    parscale_n: int
    prefix_tokens: int
    smoothing: float
    kv_bytes_per_token: int
    kv_bytes_prefix: int
    max_requests: int
    max_tokens_per_request: int
    max_step_tokens: int
    dtype: str
    device: str
    vocab_size: int
    demo: bool
    notice: str
    def __init__(self, model: _Optional[str] = ..., parscale_n: _Optional[int] = ..., prefix_tokens: _Optional[int] = ..., smoothing: _Optional[float] = ..., kv_bytes_per_token: _Optional[int] = ..., kv_bytes_prefix: _Optional[int] = ..., max_requests: _Optional[int] = ..., max_tokens_per_request: _Optional[int] = ..., max_step_tokens: _Optional[int] = ..., dtype: _Optional[str] = ..., device: _Optional[str] = ..., vocab_size: _Optional[int] = ..., demo: _Optional[bool] = ..., notice: _Optional[str] = ...) -> None: ...
