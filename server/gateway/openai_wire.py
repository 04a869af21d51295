"""OpenAI's JSON shapes, both ways, for the gateways (the Envoy processor, the OpenAI endpoint).

Requests: ``/v1/chat/completions`` and ``/v1/completions`` bodies become what the guard judges
(the conversation, or a raw prompt judged as one user turn), the sampling parameters, and the
domain (``metadata.guard_domain``; the gateways also take a header). Responses: the text of a
stream event or of a whole response (content, tool-call arguments and reasoning: everything a
client may show or execute), events and bodies rewritten with released text, the final
``content_filter`` event, and OpenAI-style errors.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

CHAT, COMPLETION = "chat", "completion"
PATHS = {"/v1/chat/completions": CHAT, "/v1/completions": COMPLETION}
DOMAIN_METADATA_KEY = "guard_domain"
# Fields of a chat delta or message that reach the user besides `content` (vLLM's reasoning parsers).
REASONING_FIELDS = ("reasoning_content", "reasoning")


class GatewayError(Exception):
    """A request the gateway refuses: an HTTP status and an OpenAI-style error body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, extra: dict | None = None) -> None:  # fmt: skip
        super().__init__(message)
        self.status, self.message, self.type, self.code, self.param = status, message, type, code, param
        self.extra = extra or {}

    def body(self) -> dict:
        error = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        return {"error": {**error, **self.extra}}


@dataclass
class OpenAIRequest:
    """What the guard needs from one OpenAI request."""

    kind: str  # CHAT or COMPLETION
    model: str
    stream: bool
    messages: list[dict[str, str]] = field(default_factory=list)  # chat: role + text content
    prompt: str = ""  # completion: the raw prompt
    domain: str = ""  # from metadata (a header overrides it)
    sampling: dict[str, Any] = field(default_factory=dict)  # temperature, top_p, max_tokens, seed, stop
    include_usage: bool = False
    prompt_tokens: int = 0  # the guard's count, once judged (usage)

    @property
    def judged_messages(self) -> list[dict[str, str]]:
        """The conversation the guard judges (a raw prompt is one user turn)."""
        return self.messages if self.kind == CHAT else [{"role": "user", "content": self.prompt}]


def parse_request(kind: str, body: bytes) -> OpenAIRequest:
    """A chat or completions body; GatewayError(400) naming what is wrong."""
    try:
        data = json.loads(body)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise GatewayError(400, f"the request body is not valid JSON: {exc}") from None
    if not isinstance(data, dict):
        raise GatewayError(400, "the request body must be a JSON object")
    model = data.get("model")
    if not isinstance(model, str) or not model:
        raise GatewayError(400, "`model` is required (a string)", param="model")
    if data.get("n", 1) != 1:
        raise GatewayError(400, "the guard moderates one choice per request: `n` must be 1", param="n")
    stream = data.get("stream", False)
    if not isinstance(stream, bool):
        raise GatewayError(400, "`stream` must be a boolean", param="stream")
    request = OpenAIRequest(kind, model, stream, sampling=_sampling(data))
    options = data.get("stream_options") or {}
    request.include_usage = bool(isinstance(options, dict) and options.get("include_usage"))
    metadata = data.get("metadata") or {}
    if not isinstance(metadata, dict):
        raise GatewayError(400, "`metadata` must be an object", param="metadata")
    domain = metadata.get(DOMAIN_METADATA_KEY, "")
    if not isinstance(domain, str):
        raise GatewayError(400, f"`metadata.{DOMAIN_METADATA_KEY}` must be a string", param="metadata")
    request.domain = domain
    if kind == CHAT:
        request.messages = _messages(data.get("messages"))
    else:
        request.prompt = _prompt(data.get("prompt"))
    return request


def _messages(raw: Any) -> list[dict[str, str]]:
    if not isinstance(raw, list) or not raw:
        raise GatewayError(400, "`messages` must be a non-empty array", param="messages")
    out = []
    for i, message in enumerate(raw):
        if not isinstance(message, dict):
            raise GatewayError(400, f"messages[{i}] must be an object", param="messages")
        role = message.get("role")
        role = "system" if role == "developer" else role  # the guard's template has no developer role
        if role not in ("system", "user", "assistant", "tool"):
            raise GatewayError(400, f"messages[{i}].role is {role!r}", param="messages")
        text = _text_of(message.get("content"), f"messages[{i}].content")
        for call in message.get("tool_calls") or ():  # what the assistant asked a tool to do is judged too
            function = (call.get("function") or {}) if isinstance(call, dict) else {}
            text += f"\n{function.get('name', '')}({function.get('arguments', '')})"
        out.append({"role": role, "content": text})
    return out


def _text_of(content: Any, where: str) -> str:
    """A message's text: a string, or the text parts of a parts array (images are not judged)."""
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif not isinstance(part, dict):
                raise GatewayError(400, f"{where} parts must be objects", param="messages")
        return "\n".join(parts)
    raise GatewayError(400, f"{where} must be a string or an array of parts", param="messages")


def _prompt(raw: Any) -> str:
    if isinstance(raw, list) and len(raw) == 1 and isinstance(raw[0], str):
        raw = raw[0]
    if not isinstance(raw, str) or not raw:
        raise GatewayError(400, "`prompt` must be one non-empty string (batches and token ids are not guarded)",
                           param="prompt")  # fmt: skip
    return raw


def _sampling(data: dict) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for name, kind in (("temperature", (int, float)), ("top_p", (int, float)), ("seed", int)):
        value = data.get(name)
        if value is not None:
            if isinstance(value, bool) or not isinstance(value, kind):
                raise GatewayError(400, f"`{name}` must be a number", param=name)
            out[name] = value
    max_tokens = data.get("max_completion_tokens", data.get("max_tokens"))
    if max_tokens is not None:
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise GatewayError(400, "`max_tokens` must be a positive integer", param="max_tokens")
        out["max_tokens"] = max_tokens
    stop = data.get("stop")
    if stop is not None:
        stop = [stop] if isinstance(stop, str) else stop
        if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
            raise GatewayError(400, "`stop` must be a string or an array of strings", param="stop")
        out["stop"] = stop
    return out


# ---------------------------------------------------------------------------------------- responses


def event_text(event: dict, kind: str) -> tuple[str, list[int]]:
    """The text of choice 0 of a stream event (content, reasoning, tool-call name and arguments,
    in that order) and its token ids (vLLM's ``return_token_ids``)."""
    choice = _choice0(event)
    if choice is None:
        return "", []
    ids = choice.get("token_ids") or []
    if kind == COMPLETION:
        return choice.get("text") or "", ids
    return _delta_text(choice.get("delta") or {}), ids


def message_text(body: dict, kind: str) -> str:
    """The text of choice 0 of a whole (non-streamed) response."""
    choice = _choice0(body)
    if choice is None:
        return ""
    return choice.get("text") or "" if kind == COMPLETION else _delta_text(choice.get("message") or {})


def _delta_text(delta: dict) -> str:
    parts = [field_value for name in REASONING_FIELDS if isinstance(field_value := delta.get(name), str)]
    parts.append(delta.get("content") or "")
    for call in delta.get("tool_calls") or ():
        function = (call.get("function") or {}) if isinstance(call, dict) else {}
        parts.append((function.get("name") or "") + (function.get("arguments") or ""))
    return "".join(p for p in parts if isinstance(p, str))


def _choice0(obj: dict) -> dict | None:
    choices = obj.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        return None
    return choices[0]


def with_text(obj: dict, kind: str, text: str, *, message: bool = False) -> dict:
    """``obj`` (an event, or a whole response with ``message``) with choice 0 carrying ``text``
    as its only text: released, possibly redacted, text replaces content, reasoning and tool calls."""
    out = json.loads(json.dumps(obj))
    choice = _choice0(out)
    if choice is None:
        out["choices"] = [choice := {"index": 0}]
    choice.pop("token_ids", None)
    if kind == COMPLETION:
        choice["text"] = text
        return out
    key = "message" if message else "delta"
    delta = choice.setdefault(key, {})
    for name in (*REASONING_FIELDS, "tool_calls"):
        delta.pop(name, None)
    delta["content"] = text
    return out


def envelope(event: dict | None, kind: str, model: str = "") -> dict:
    """The fields a synthesized event shares with the stream's own (id, object, created, model)."""
    base = {"id": "", "object": "chat.completion.chunk" if kind == CHAT else "text_completion",
            "created": int(time.time()), "model": model}  # fmt: skip
    for key in base:
        if event and key in event:
            base[key] = event[key]
    return base


def text_event(base: dict, kind: str, text: str, *, role: bool = False) -> dict:
    choice: dict[str, Any] = {"index": 0, "finish_reason": None}
    if kind == COMPLETION:
        choice["text"] = text
    else:
        choice["delta"] = {"role": "assistant", "content": text} if role else {"content": text}
    return {**base, "choices": [choice]}


def finish_event(base: dict, kind: str, finish_reason: str, guard: dict | None = None) -> dict:
    """The last event with choices: its finish reason, and our verdict where the guard stopped it."""
    choice: dict[str, Any] = {"index": 0, "finish_reason": finish_reason}
    if kind == COMPLETION:
        choice["text"] = ""
    else:
        choice["delta"] = {}
    event = {**base, "choices": [choice]}
    if guard is not None:
        event["guard"] = guard
    return event


def dumps(obj: Any) -> str:
    return json.dumps(obj, ensure_ascii=False, separators=(",", ":"))
