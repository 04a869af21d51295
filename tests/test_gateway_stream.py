"""The gateways' stream handling without a transport: SSE framing across arbitrary chunk
boundaries, and an OpenAI event stream guarded by the real demo engine (GuardedEventStream):
a safe stream goes on byte for byte whatever its chunking, an interrupted one ends with the
content_filter event, a redacted one is re-framed, a broken one follows the fail mode."""

from __future__ import annotations

import asyncio
import json

import pytest
from servers import ANY_OUTPUT_DOMAINS, policies_with

from guard.policy.loader import PolicyStore
from guard.session.response_session import ResponseSession
from guard.text.conversation import parse_messages
from server.gateway import openai_wire as wire
from server.gateway.response_guard import GuardedBody, GuardedEventStream
from server.gateway.sse import SseDecoder, encode

ANSWER = "Gears trade speed for force: a small front ring makes climbing easier. Überall 世界 🙂 fine."
PROMPT = [{"role": "user", "content": "How do bicycle gears work?"}]


def chat_stream(text: str = ANSWER, *, done: bool = True) -> bytes:
    """An event stream shaped like vLLM's: role event, one event per word, finish event, [DONE]."""
    base = {"id": "chatcmpl-1", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    events = [{**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "finish_reason": None}]}]
    words = text.split(" ")
    for i, word in enumerate(words):
        piece = word if i == len(words) - 1 else word + " "
        events.append({**base, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]})
    events.append({**base, "choices": [{"index": 0, "delta": {"content": ""}, "finish_reason": "stop"}]})
    body = b"".join(encode(json.dumps(e, ensure_ascii=False)) for e in events)
    return body + (b"data: [DONE]\n\n" if done else b"")


def chunked(body: bytes, size: int) -> list[bytes]:
    return [body[i : i + size] for i in range(0, len(body), size)]


def contents(body: bytes) -> tuple[str, list[dict]]:
    events = [e for e in SseDecoder().feed(body) if e.data and e.data != "[DONE]"]
    parsed = [json.loads(e.data) for e in events]
    return "".join(wire.event_text(p, wire.CHAT)[0] for p in parsed), parsed


# ---------------------------------------------------------------------------------------- SSE


@pytest.mark.parametrize("newline", [b"\n", b"\r\n", b"\r"])
def test_events_survive_any_split(newline):
    body = chat_stream().replace(b"\n", newline)
    decoder = SseDecoder()
    whole = decoder.feed(body) + decoder.finish()
    assert len(whole) == len(chat_stream().split(b"\n\n")) - 1
    for size in (1, 2, 3, 5, 17, 64):
        decoder = SseDecoder()
        events = [e for part in chunked(body, size) for e in decoder.feed(part)] + decoder.finish()
        assert [e.data for e in events] == [e.data for e in whole]
        assert b"".join(e.raw for e in events) == body  # forwarded unchanged, byte for byte


def test_multiline_data_comments_and_limits():
    events = SseDecoder().feed(b": keep-alive\n\nevent: x\ndata: a\ndata: b\n\n")
    assert [(e.event, e.data) for e in events] == [("", ""), ("x", "a\nb")]
    decoder = SseDecoder()  # a malformed event: the ones before it still count, nothing after it
    assert [e.data for e in decoder.feed(b"data: ok\n\ndata: \xff\xfe\n\ndata: after\n\n")] == ["ok"]
    assert "not valid UTF-8" in decoder.error and decoder.feed(b"data: more\n\n") == []
    decoder = SseDecoder(max_event_bytes=16)
    assert decoder.feed(b"data: " + b"x" * 32) == [] and "longer than 16 bytes" in decoder.error
    split = "data: 世界\n\n".encode()
    decoder = SseDecoder()  # a character split between chunks is whole once its event is
    assert decoder.feed(split[:7]) == [] and decoder.feed(split[7:])[0].data == "世界"
    # Lines end at CR and LF only (as in the SSE specification and the openai client), never at U+2028
    events = SseDecoder().feed('data: {"a": "x\u2028data: y"}\n\n'.encode())
    assert events[0].data == '{"a": "x\u2028data: y"}'


# ---------------------------------------------------------------------------------- guarded stream


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    directory = policies_with(
        tmp_path_factory.mktemp("policies"),
        **ANY_OUTPUT_DOMAINS,
        open_interrupt="extends: default\nthresholds:\n  unsafe: 1.0\nfail_mode: open\n",
    )
    return PolicyStore(directory, "default")


def open_session(runtime, policy) -> ResponseSession:
    rendered = runtime.tokenizer.render_prompt(parse_messages(PROMPT))
    stream = runtime.moderator.open(prompt_ids=rendered.prompt_ids, preamble_ids=rendered.preamble_ids,
                                    policy=policy, loop=asyncio.get_running_loop())  # fmt: skip
    from guard.session.release import ReleaseMode

    return ResponseSession(stream, policy, ReleaseMode.HOLD_BACK, runtime.tokenizer.hf)


async def guarded(runtime, policy, parts: list[bytes], *, end: bool = True, **kwargs) -> tuple[bytes, str]:
    session = open_session(runtime, policy)
    try:
        await session.judge_prompt()
        stream = GuardedEventStream(session, wire.CHAT, lambda *_: None, **kwargs)
        out = b"".join([await stream.feed(part) for part in parts])
        if end and not stream.finished:
            out += await stream.end_of_body()
        return out, stream.outcome
    finally:
        session.close("test")


@pytest.mark.parametrize("size", [1, 7, 64, 1 << 20])
async def test_a_safe_stream_goes_on_byte_for_byte(demo_runtime, store, size):
    body = chat_stream()
    out, outcome = await guarded(demo_runtime, store.get("permissive"), chunked(body, size))
    assert out == body and outcome == "passed"
    assert demo_runtime.engine.live_sessions == 0


async def test_an_interrupted_stream_ends_with_the_content_filter_event(demo_runtime, store):
    out, outcome = await guarded(demo_runtime, store.get("always_interrupt"), chunked(chat_stream(), 40))
    assert outcome == "interrupted" and out.endswith(b"data: [DONE]\n\n")
    text, events = contents(out)
    assert text == ""  # HOLD_BACK: nothing of the flagged run was shown
    last = events[-1]
    assert last["choices"][0]["finish_reason"] == "content_filter" and last["id"] == "chatcmpl-1"
    assert last["guard"]["action"] == "INTERRUPT" and last["guard"]["offset"] == 1  # debounce 2
    assert last["guard"]["domain"] == "always_interrupt"
    assert events[0]["choices"][0]["delta"]["role"] == "assistant"  # the role event went on as it came


async def test_a_redacted_stream_is_reframed(demo_runtime, store):
    out, outcome = await guarded(demo_runtime, store.get("redact_all"), chunked(chat_stream(), 33))
    text, events = contents(out)
    assert outcome == "redacted" and text == "[REDACTED]"
    assert events[-1]["choices"][0]["finish_reason"] == "stop" and out.endswith(b"data: [DONE]\n\n")
    assert all(e["id"] == "chatcmpl-1" for e in events)


async def test_a_broken_stream_follows_the_fail_mode(demo_runtime, store):
    body = chat_stream(done=False)
    out, outcome = await guarded(demo_runtime, store.get("default"), [body[: len(body) // 2]])
    assert outcome == "failed_closed"
    assert b"upstream_error" in out and out.endswith(b"data: [DONE]\n\n")
    assert ANSWER.split()[-1].encode() not in out

    out, outcome = await guarded(demo_runtime, store.get("open_interrupt"), [body])
    text, _ = contents(out)
    assert outcome == "failed_open" and text == ANSWER and b"[DONE]" not in out
    out, outcome = await guarded(demo_runtime, store.get("default"), [b"data: {not json\n\n"])
    assert outcome == "failed_closed" and b"not JSON" in out
    assert demo_runtime.engine.live_sessions == 0


async def test_a_whole_response_is_judged_once(demo_runtime, store):
    choice = {"index": 0, "message": {"role": "assistant", "content": ANSWER}, "finish_reason": "stop"}
    body = json.dumps(
        {"id": "c2", "object": "chat.completion", "created": 1, "model": "m", "choices": [choice]}
    ).encode()
    for domain, expected in (("permissive", "passed"), ("always_interrupt", "interrupted")):
        session = open_session(demo_runtime, store.get(domain))
        try:
            await session.judge_prompt()
            whole = GuardedBody(session, wire.CHAT, lambda *_: None, max_bytes=1 << 20)
            for part in chunked(body, 50):
                whole.feed(part)
            out = await whole.end_of_body()
        finally:
            session.close("test")
        assert whole.outcome == expected
        if expected == "passed":
            assert out == body
        else:
            cut = json.loads(out)
            assert (
                cut["choices"][0]["finish_reason"] == "content_filter" and cut["choices"][0]["message"]["content"] == ""
            )
            assert cut["guard"]["category"] and cut["guard"]["offset"] == 1


def tool_call_stream() -> tuple[bytes, str]:
    """A tool call streamed as vLLM does: the name first, then the arguments in pieces."""
    base = {"id": "chatcmpl-3", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    calls = [{"index": 0, "id": "call_1", "type": "function", "function": {"name": "search", "arguments": ""}}]
    pieces = ['{"query": ', '"how to pack', ' a pipe with powder"}']
    calls += [{"index": 0, "function": {"arguments": piece}} for piece in pieces]
    events = [{**base, "choices": [{"index": 0, "delta": {"tool_calls": [c]}, "finish_reason": None}]} for c in calls]
    events.append({**base, "choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls"}]})
    body = b"".join(encode(json.dumps(e)) for e in events) + b"data: [DONE]\n\n"
    return body, "search" + "".join(pieces)


async def test_tool_call_arguments_are_judged_before_they_go_on(demo_runtime, store):
    body, text = tool_call_stream()
    assert contents(body)[0] == text  # the name and the arguments are what the guard reads
    out, outcome = await guarded(demo_runtime, store.get("permissive"), chunked(body, 50))
    assert out == body and outcome == "passed"
    out, outcome = await guarded(demo_runtime, store.get("always_interrupt"), chunked(body, 50))
    assert outcome == "interrupted" and b"pipe" not in out and b"search" not in out
    assert contents(out)[1][-1]["choices"][0]["finish_reason"] == "content_filter"


async def test_token_ids_are_judged_when_they_are_the_guards(demo_runtime, store, guard_tokenizer):
    """vLLM's return_token_ids: with --ext-proc-token-ids the ids are judged, not re-tokenized text."""
    ids = guard_tokenizer.hf.encode(ANSWER, add_special_tokens=False)
    base = {"id": "chatcmpl-4", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    events = []
    for k in range(0, len(ids), 3):
        piece = ids[k : k + 3]
        delta = {"content": guard_tokenizer.hf.decode(piece)}
        events.append({**base, "choices": [{"index": 0, "delta": delta, "token_ids": piece, "finish_reason": None}]})
    body = b"".join(encode(json.dumps(e, ensure_ascii=False)) for e in events) + b"data: [DONE]\n\n"
    out, outcome = await guarded(demo_runtime, store.get("permissive"), chunked(body, 100), token_ids=True)
    assert out == body and outcome == "passed"
    out, outcome = await guarded(demo_runtime, store.get("always_interrupt"), chunked(body, 100), token_ids=True)
    last = contents(out)[1][-1]
    assert outcome == "interrupted" and last["guard"]["offset"] == 1 and last["guard"]["released_tokens"] == 0


def _events_body(*events: dict) -> bytes:
    return b"".join(encode(json.dumps(e, ensure_ascii=False)) for e in events) + b"data: [DONE]\n\n"


@pytest.mark.parametrize(
    "event",
    [
        {"choices": [{"index": 0, "delta": {"content": "a"}}, {"index": 1, "delta": {"content": "unjudged"}}]},
        {"choices": [{"index": 1, "delta": {"content": "unjudged"}}]},
        {"choices": [{"index": 0, "delta": {"content": {"text": "unjudged"}}}]},
        {"choices": [{"index": 0, "delta": "unjudged"}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"function": {"arguments": {"x": "unjudged"}}}]}}]},
    ],
)
async def test_answers_the_guard_cannot_read_never_pass(demo_runtime, store, event):
    """A second choice, a non-string text field: not judged, so the fail mode (closed) withholds it."""
    out, outcome = await guarded(demo_runtime, store.get("permissive"), [_events_body(event)])
    assert outcome == "failed_closed" and b"unjudged" not in out and b"cannot read" in out


async def test_refusals_and_reasoning_are_judged_text(demo_runtime, store):
    base = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}
    body = _events_body(
        {**base, "choices": [{"index": 0, "delta": {"reasoning_content": "thinking about pipes"}}]},
        {**base, "choices": [{"index": 0, "delta": {"refusal": "I will not"}, "finish_reason": "stop"}]},
    )
    assert contents(body)[0] == "thinking about pipesI will not"
    out, outcome = await guarded(demo_runtime, store.get("always_interrupt"), [body])
    assert outcome == "interrupted" and b"pipes" not in out and b"will not" not in out


async def test_a_redacted_tool_call_is_withheld_whole(demo_runtime, store):
    body, _ = tool_call_stream()
    out, outcome = await guarded(demo_runtime, store.get("redact_all"), chunked(body, 64))
    last = contents(out)[1][-1]
    assert outcome == "redacted" and b"pipe" not in out and b"[REDACTED]" not in out
    assert last["choices"][0]["finish_reason"] == "content_filter" and last["guard"]["action"] == "REDACT"


async def test_a_long_whole_answer_is_judged_in_slices(demo_runtime, store):
    """Longer than the engine's chunk limit (1024 tokens): sliced, not refused."""
    text = " ".join(f"word{i}" for i in range(1500))
    choice = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    body = json.dumps({"id": "c", "object": "chat.completion", "created": 1, "model": "m", "choices": [choice]})
    session = open_session(demo_runtime, store.get("permissive"))
    try:
        await session.judge_prompt()
        whole = GuardedBody(session, wire.CHAT, lambda *_: None, max_bytes=1 << 20, slice_chars=512)
        whole.feed(body.encode())
        assert await whole.end_of_body() == body.encode() and whole.outcome == "passed"
    finally:
        session.close("test")


def test_request_parsing_judges_every_text_part():
    body = {
        "model": "m",
        "messages": [
            {"role": "system", "content": [{"type": "input_text", "text": "be brief"}]},
            {"role": "user", "content": [{"type": "text", "text": "hi"}, {"type": "output_text", "text": "there"}]},
        ],
        "tools": [{"type": "function", "function": {"name": "search", "description": "find pipes"}}],
    }
    request = wire.parse_request(wire.CHAT, json.dumps(body).encode())
    judged = request.judged_messages
    assert judged[0]["role"] == "system" and "find pipes" in judged[0]["content"]
    assert [m["content"] for m in judged[1:]] == ["be brief", "hi\nthere"]
    image = {"type": "image_url", "image_url": {"url": "data:image/png;base64,AAAA"}}
    media = {"model": "m", "messages": [{"role": "user", "content": [image]}]}
    with pytest.raises(wire.GatewayError, match="not judged by the guard"):
        wire.parse_request(wire.CHAT, json.dumps(media).encode())
    assert wire.parse_request(wire.CHAT, json.dumps(media).encode(), allow_media=True).messages[0]["content"] == ""
    for bad in ({"type": "mystery", "text": "x"}, {"type": "text", "text": 3}):
        with pytest.raises(wire.GatewayError):
            wire.parse_request(
                wire.CHAT, json.dumps({"model": "m", "messages": [{"role": "user", "content": [bad]}]}).encode()
            )
    with pytest.raises(wire.GatewayError, match="logprobs"):
        wire.parse_request(wire.CHAT, json.dumps({"model": "m", "messages": [], "logprobs": True}).encode())


def test_routes_are_normalized_before_they_are_matched():
    from server.gateway.ext_proc import route_of

    for path in ("/v1/chat/completion%73", "//v1/./chat/completions?x=1", "/v1/x/../chat/completions"):
        assert route_of(path) == "/v1/chat/completions"
