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
from server.gateway.sse import SseDecoder, SseError, encode

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
    with pytest.raises(SseError, match="not valid UTF-8"):
        SseDecoder().feed(b"data: \xff\xfe\n\n")
    with pytest.raises(SseError, match="longer than 16 bytes"):
        SseDecoder(max_event_bytes=16).feed(b"data: " + b"x" * 32)
    split = "data: 世界\n\n".encode()
    decoder = SseDecoder()  # a character split between chunks is whole once its event is
    assert decoder.feed(split[:7]) == [] and decoder.feed(split[7:])[0].data == "世界"


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
