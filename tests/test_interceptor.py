"""The gateway interceptor end to end over loopback: a real sidecar (demo model), real grpc.aio
LLM backends (scripted text, and a tiny real Qwen3 causal LM generating token by token).
Unsafe content is cut, the upstream sees the cancel, safe content passes unchanged."""

from __future__ import annotations

import grpc
import pytest
from servers import BackendLog, ScriptedTextBackend, TinyModelBackend, chat_stub, llm_stub, running_backend

from guard.demo_corpus import SHOWCASE
from server.interceptor import GuardInterceptor, StopInfo
from server.qwen3guard.v1 import guard_pb2 as pb

SAFE, UNSAFE = SHOWCASE[0], SHOWCASE[2]


def stopped(stop: StopInfo) -> dict:
    return {"stopped": True, "reason": stop.reason, "category": stop.category}


def pieces(text: str, size: int = 7) -> list[str]:
    return [text[i : i + size] for i in range(0, len(text), size)]


async def run(
    backend_address: str, sidecar_address: str, request: dict, *, extract, release_mode=pb.HOLD_BACK, stub=llm_stub
) -> list[dict]:
    async with grpc.aio.insecure_channel(sidecar_address) as sidecar:
        interceptor = GuardInterceptor(
            sidecar,
            conversation=lambda r: [{"role": "user", "content": r["prompt"]}],
            extract=extract,
            make_stopped=stopped,
            release_mode=release_mode,
        )
        async with grpc.aio.insecure_channel(backend_address, interceptors=interceptor.interceptors()) as channel:
            call = stub(channel)(request) if stub is llm_stub else stub(channel)(iter([request]))
            return [message async for message in call]


async def direct(backend_address: str, request: dict) -> list[dict]:
    async with grpc.aio.insecure_channel(backend_address) as channel:
        return [message async for message in llm_stub(channel)(request)]


def text_of(messages: list[dict]) -> str:
    return "".join(m.get("text", "") for m in messages if not m.get("stopped"))


@pytest.fixture()
def scripted():
    backend = ScriptedTextBackend()
    with running_backend(backend) as address:
        yield backend, address


async def test_safe_text_passes_unchanged(sidecar, scripted):
    _, address = scripted
    request = {"prompt": SAFE.prompt, "pieces": pieces(SAFE.response)}
    got = await run(address, sidecar.address, request, extract=lambda m: m["text"])
    assert got == await direct(address, request)
    assert text_of(got) == SAFE.response


async def test_unsafe_text_is_cut_and_the_upstream_is_cancelled(sidecar, scripted):
    backend, address = scripted
    request = {"prompt": UNSAFE.prompt, "pieces": pieces(UNSAFE.response, 4) + ["x"] * 200}
    got = await run(address, sidecar.address, request, extract=lambda m: m["text"])
    assert got[-1]["stopped"] and got[-1]["category"] == "Violent"
    released = text_of(got)
    assert UNSAFE.response.startswith(released) and "bomb" not in released
    assert backend.log.cancelled.wait(10), "the upstream call was not cancelled"
    assert not backend.log.completed.is_set()
    assert backend.log.sent < len(request["pieces"])


async def test_stream_stream_calls_are_guarded_too(sidecar, scripted):
    backend, address = scripted
    request = {"prompt": UNSAFE.prompt, "pieces": pieces(UNSAFE.response, 4) + ["x"] * 200}
    got = await run(address, sidecar.address, request, extract=lambda m: m["text"], stub=chat_stub)
    assert got[-1]["stopped"]
    assert backend.log.cancelled.wait(10)


async def test_optimistic_mode_forwards_before_the_verdict_and_still_stops(sidecar, scripted):
    backend, address = scripted
    request = {"prompt": UNSAFE.prompt, "pieces": pieces(UNSAFE.response, 4) + ["x"] * 200}
    got = await run(address, sidecar.address, request, extract=lambda m: m["text"], release_mode=pb.OPTIMISTIC)
    assert got[-1]["stopped"]
    assert backend.log.cancelled.wait(10)
    # released on arrival: text from the unsafe span reached the caller before the verdict did
    assert len(text_of(got)) > UNSAFE.unsafe_from_char


@pytest.fixture(scope="module")
def tiny_model_backend(guard_tokenizer):
    backend = TinyModelBackend(guard_tokenizer.hf)
    with running_backend(backend) as address:
        yield backend, address


def ids_of(messages: list[dict]) -> list[int]:
    return [i for m in messages if not m.get("stopped") for i in m["ids"]]


async def test_tiny_model_safe_generation_passes_unchanged(sidecar, tiny_model_backend, guard_tokenizer):
    backend, address = tiny_model_backend
    forced = guard_tokenizer.encode(SAFE.response)
    request = {"prompt": SAFE.prompt, "force_ids": forced}
    before = backend.log.forwards
    got = await run(address, sidecar.address, request, extract=lambda m: m["ids"])
    assert backend.log.forwards - before == len(forced)  # a real forward pass per generated token
    assert got == await direct(address, request)
    assert ids_of(got) == forced


async def test_tiny_model_unsafe_generation_is_interrupted_upstream(sidecar, tiny_model_backend, guard_tokenizer):
    backend, address = tiny_model_backend
    backend.log = BackendLog()
    forced = guard_tokenizer.encode(UNSAFE.response) * 4  # long enough that stopping early is visible
    request = {"prompt": UNSAFE.prompt, "force_ids": forced}
    got = await run(address, sidecar.address, request, extract=lambda m: m["ids"])
    assert got[-1]["stopped"]
    released = ids_of(got)
    assert forced[: len(released)] == released
    span_start = len(guard_tokenizer.encode(UNSAFE.response[: UNSAFE.unsafe_from_char]))
    assert len(released) <= span_start
    assert backend.log.cancelled.wait(10)
    assert not backend.log.completed.is_set()
    generated = backend.log.sent
    assert generated < len(forced)
    print(f"tokens generated upstream after the released prefix: {generated - len(released)}")
