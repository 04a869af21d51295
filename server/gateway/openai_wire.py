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
# Content parts whose text vLLM gives the model (all judged), and media parts (not judged: a text
# guard cannot read them; refused unless the operator allows them).
TEXT_PARTS = {"text": "text", "input_text": "text", "output_text": "text", "refusal": "refusal", "thinking": "thinking"}
MEDIA_PARTS = frozenset({"image_url", "input_image", "image", "image_embeds", "input_audio", "audio_url", "video_url",
                         "file", "input_file"})  # fmt: skip
# Request fields that make the answer carry text outside `content` the guard would not see (the
# tokens again, as log-probabilities): refused through the guard.
UNGUARDED_OUTPUTS = ("logprobs", "top_logprobs", "prompt_logprobs", "echo")
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
    tools_text: str = ""  # the tool definitions the model reads (judged as a system turn)
    fields: frozenset[str] = frozenset()  # the body's top-level fields (what a front end may refuse)

    @property
    def judged_messages(self) -> list[dict[str, str]]:
        """The conversation the guard judges (a raw prompt is one user turn; tool definitions a
        system turn before it, as the chat template renders them)."""
        messages = self.messages if self.kind == CHAT else [{"role": "user", "content": self.prompt}]
        return [{"role": "system", "content": self.tools_text}, *messages] if self.tools_text else messages


def parse_request(kind: str, body: bytes, *, allow_media: bool = False) -> OpenAIRequest:
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
    for name in UNGUARDED_OUTPUTS:
        if data.get(name):
            raise GatewayError(400, f"`{name}` is not served through the guard (it would return unjudged text)",
                               param=name)  # fmt: skip
    request = OpenAIRequest(kind, model, stream, sampling=_sampling(data), fields=frozenset(data))
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
        request.messages = _messages(data.get("messages"), allow_media)
        request.tools_text = _tools(data.get("tools"))
    else:
        request.prompt = _prompt(data.get("prompt"))
    return request


def _tools(raw: Any) -> str:
    if not raw:
        return ""
    if not isinstance(raw, list):
        raise GatewayError(400, "`tools` must be an array", param="tools")
    return "Tools:\n" + "\n".join(json.dumps(tool, ensure_ascii=False) for tool in raw)


def _messages(raw: Any, allow_media: bool) -> list[dict[str, str]]:
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
        text = _text_of(message.get("content"), f"messages[{i}].content", allow_media)
        for name in REASONING_FIELDS:  # an earlier turn's reasoning, when the client sends it back
            if isinstance(message.get(name), str):
                text = message[name] + "\n" + text
        for call in message.get("tool_calls") or ():  # what the assistant asked a tool to do is judged too
            function = (call.get("function") or {}) if isinstance(call, dict) else {}
            text += f"\n{function.get('name', '')}({function.get('arguments', '')})"
        out.append({"role": role, "content": text})
    return out


def _text_of(content: Any, where: str, allow_media: bool) -> str:
    """A message's text: a string, or the text of every text-like part; media parts only where
    the operator allows them (a text guard does not read them)."""
    if content is None or isinstance(content, str):
        return content or ""
    if not isinstance(content, list):
        raise GatewayError(400, f"{where} must be a string or an array of parts", param="messages")
    parts = []
    for j, part in enumerate(content):
        kind = part.get("type") if isinstance(part, dict) else None
        if kind in TEXT_PARTS:
            value = part.get(TEXT_PARTS[kind])
            if not isinstance(value, str):
                raise GatewayError(400, f"{where}[{j}].{TEXT_PARTS[kind]} must be a string", param="messages")
            parts.append(value)
        elif kind in MEDIA_PARTS:
            if not allow_media:
                raise GatewayError(400, f"{where}[{j}] is a {kind} part: media is not judged by the guard "
                                   "(the operator may allow it: --gateway-allow-media)", param="messages")  # fmt: skip
        else:
            raise GatewayError(400, f"{where}[{j}] has an unknown part type {kind!r}", param="messages")
    return "\n".join(parts)


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


class MalformedAnswer(ValueError):
    """An answer whose shape the guard cannot read (so it must not pass)."""


def event_text(event: dict, kind: str) -> tuple[str, list[int]]:
    """The text of a stream event (content, reasoning, refusal, tool-call names and arguments, in
    that order) and its token ids (vLLM's ``return_token_ids``). MalformedAnswer for a shape
    the guard cannot read: a second choice, a text field that is not a string."""
    choice = _only_choice(event)
    if choice is None:
        return "", []
    ids = choice.get("token_ids") or []
    if not isinstance(ids, list) or not all(isinstance(i, int) and not isinstance(i, bool) for i in ids):
        raise MalformedAnswer("`token_ids` is not a list of integers")
    if kind == COMPLETION:
        return _string(choice.get("text"), "text"), ids
    return _delta_text(choice.get("delta")), ids


def message_text(body: dict, kind: str) -> str:
    """The text of a whole (non-streamed) response."""
    choice = _only_choice(body)
    if choice is None:
        return ""
    if kind == COMPLETION:
        return _string(choice.get("text"), "text")
    return _delta_text(choice.get("message"))


def _only_choice(obj: dict) -> dict | None:
    choices = obj.get("choices")
    if choices is None or choices == []:
        return None  # a usage or error event
    if not isinstance(choices, list) or len(choices) != 1 or not isinstance(choices[0], dict):
        raise MalformedAnswer("the guard reads exactly one choice per event")
    if choices[0].get("index", 0) != 0:
        raise MalformedAnswer("the guard reads choice 0 only")
    return choices[0]


def _string(value: Any, name: str) -> str:
    if value is None:
        return ""
    if not isinstance(value, str):
        raise MalformedAnswer(f"`{name}` is not a string")
    return value


def _delta_text(delta: Any) -> str:
    if delta is None:
        return ""
    if not isinstance(delta, dict):
        raise MalformedAnswer("a delta or message is not an object")
    parts = [_string(delta.get(name), name) for name in (*REASONING_FIELDS, "content", "refusal")]
    calls = delta.get("tool_calls") or []
    if not isinstance(calls, list):
        raise MalformedAnswer("`tool_calls` is not a list")
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if function is None:
            continue
        if not isinstance(function, dict):
            raise MalformedAnswer("a tool call's `function` is not an object")
        parts.append(_string(function.get("name"), "name") + _string(function.get("arguments"), "arguments"))
    return "".join(parts)


def has_tool_calls(event: dict | None) -> bool:
    choices = (event or {}).get("choices") or [{}]
    choice = choices[0] if isinstance(choices[0], dict) else {}
    delta = choice.get("delta") or choice.get("message") or {}
    return bool(isinstance(delta, dict) and delta.get("tool_calls"))


def with_text(obj: dict, kind: str, text: str, *, message: bool = False) -> dict:
    """``obj`` (an event, or a whole response with ``message``) with choice 0 carrying ``text``
    as its only text: released, possibly redacted, text replaces content, reasoning, refusal and
    tool calls; log-probabilities (the tokens again) are dropped."""
    out = json.loads(json.dumps(obj))
    choices = out.get("choices")
    if not isinstance(choices, list) or not choices or not isinstance(choices[0], dict):
        out["choices"] = choices = [{"index": 0}]
    choice = choices[0]
    choice.pop("token_ids", None)
    choice.pop("logprobs", None)
    if kind == COMPLETION:
        choice["text"] = text
        return out
    key = "message" if message else "delta"
    delta = choice.setdefault(key, {})
    for name in (*REASONING_FIELDS, "refusal", "tool_calls"):
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


def interrupt_field(*, action: str = "INTERRUPT", domain: str, category: str, reason: str, offset: int | None,
                    released_tokens: int) -> dict:  # fmt: skip
    """Our verdict in an answer the guard stopped (the ``guard`` field, the same in both gateways)."""
    out = {"action": action, "domain": domain, "category": category, "reason": reason,
           "released_tokens": released_tokens}  # fmt: skip
    if offset is not None:
        out["offset"] = offset
    return out


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
