"""Failures that are not the model's: an idle session that expired ends the stream with a status
(never through the fail mode), an unexpected error is INTERNAL (logged once with the request id,
counted), and a caller that cancels at any point leaves no session, task or upstream request."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest
from servers import ScriptedVllm, policies_with, running_sidecar

from guard.session.response_session import ResponseSession
from server.qwen3guard.v1 import guard_pb2 as pb
from server.qwen3guard.v1 import guard_pb2_grpc as pb_grpc

PROMPT = [pb.ChatMessage(role="user", content="Tell me about the weather.")]
ANSWER = "It is sunny and warm today, with a light breeze from the west in the afternoon."


@pytest.fixture(scope="module")
def policy_dir(tmp_path_factory):
    open_permissive = "extends: default\nthresholds:\n  unsafe: 1.0\nfail_mode: open\n"
    return policies_with(tmp_path_factory.mktemp("policies"), open_permissive=open_permissive)


@pytest.fixture(scope="module")
def scripted(guard_tokenizer):
    upstream = ScriptedVllm(guard_tokenizer.hf, guard_tokenizer.encode(ANSWER), chunk=1, delay=0.05)
    yield upstream
    upstream.close()


@pytest.fixture(scope="module")
def running(demo_dir, policy_dir, scripted):
    with running_sidecar(
        model=str(demo_dir), policies=str(policy_dir), judge="", upstream_url=scripted.url, idle_timeout_s=2.0
    ) as sidecar:
        yield sidecar


async def _upstream_settled(scripted: ScriptedVllm, timeout: float = 10.0) -> None:
    """Every request the scripted vLLM received has completed or seen its connection closed."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while scripted.requests != scripted.completed + scripted.disconnected and loop.time() < deadline:
        await asyncio.sleep(0.02)
    assert scripted.requests == scripted.completed + scripted.disconnected, "an upstream request is still open"


async def _wait_no_sessions(running, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while running.engine.live_sessions and loop.time() < deadline:
        await asyncio.sleep(0.02)
    assert running.engine.live_sessions == 0


async def test_an_expired_session_ends_the_stream_with_a_status_not_fail_open(running, guard_tokenizer):
    """The domain fails open, but the caller's idle pause is not a model failure: ABORTED, and
    nothing after the pause is released unjudged."""
    ids = guard_tokenizer.encode(ANSWER)
    outgoing: asyncio.Queue = asyncio.Queue()

    async def requests():
        while (item := await outgoing.get()) is not None:
            yield item

    async with grpc.aio.insecure_channel(running.address) as channel:
        call = pb_grpc.StreamGuardStub(channel).Moderate(requests())
        await outgoing.put(pb.ModerateRequest(open=pb.OpenRequest(domain="open_permissive", messages=PROMPT)))
        assert (await call.read()).WhichOneof("kind") == "prompt"
        await outgoing.put(pb.ModerateRequest(chunk=pb.ChunkRequest(token_ids=ids[:4])))
        first = await call.read()
        assert first.chunk.released == 4 and not first.chunk.unjudged
        await asyncio.sleep(5.0)  # idle well past idle_timeout_s (the behaviour under test is the timeout)
        await outgoing.put(pb.ModerateRequest(chunk=pb.ChunkRequest(token_ids=ids[4:])))
        later = []
        with pytest.raises(grpc.aio.AioRpcError) as info:
            while (response := await call.read()) is not grpc.aio.EOF:
                later.append(response)
        await outgoing.put(None)
    assert info.value.code() == grpc.StatusCode.ABORTED
    assert "expired" in info.value.details()
    assert not any(r.chunk.unjudged for r in later), "an expired session must not fail open"
    await _wait_no_sessions(running)


async def test_an_unexpected_error_is_internal_logged_once_and_counted(running, monkeypatch, caplog, guard_tokenizer):
    async def broken(self, pending):
        raise RuntimeError("a bug in the sidecar")

    monkeypatch.setattr(ResponseSession, "resolve", broken)
    metrics = running.sidecar.metrics
    before = metrics.errors.labels("INTERNAL")._value.get()

    async def requests():
        yield pb.ModerateRequest(
            open=pb.OpenRequest(request_id="req-internal-1", domain="open_permissive", messages=PROMPT)
        )
        yield pb.ModerateRequest(chunk=pb.ChunkRequest(token_ids=guard_tokenizer.encode(ANSWER)[:3]))

    with caplog.at_level(logging.ERROR, logger="server.wire"):
        async with grpc.aio.insecure_channel(running.address) as channel:
            with pytest.raises(grpc.aio.AioRpcError) as info:
                async for _ in pb_grpc.StreamGuardStub(channel).Moderate(requests()):
                    pass
    assert info.value.code() == grpc.StatusCode.INTERNAL
    assert "req-internal-1" in info.value.details() and "RuntimeError" in info.value.details()
    records = [r for r in caplog.records if "internal_error" in r.getMessage()]
    assert len(records) == 1 and "req-internal-1" in records[0].getMessage()
    assert ANSWER[:5] not in caplog.text  # no response content in the logs
    assert metrics.errors.labels("INTERNAL")._value.get() == before + 1
    await _wait_no_sessions(running)


async def test_guarded_generation_unexpected_error_is_internal(running, monkeypatch):
    async def broken(self, pending):
        raise RuntimeError("a bug in the sidecar")

    monkeypatch.setattr(ResponseSession, "resolve", broken)
    async with grpc.aio.insecure_channel(running.address) as channel:
        call = pb_grpc.GuardedGenerationStub(channel).Generate(
            pb.GenerateRequest(request_id="req-internal-2", domain="open_permissive", messages=PROMPT)
        )
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
    assert info.value.code() == grpc.StatusCode.INTERNAL and "req-internal-2" in info.value.details()
    await _wait_no_sessions(running)


@pytest.mark.parametrize("after", [0, 1, 3])
async def test_cancelling_a_generation_at_any_point_frees_everything(running, scripted, after):
    """Cancel after the start message (waiting on the upstream), after the first chunk, mid-stream:
    the guard session is closed and the upstream request's connection is closed."""
    await _upstream_settled(scripted)  # earlier tests' requests are over
    requests, completed = scripted.requests, scripted.completed
    async with grpc.aio.insecure_channel(running.address) as channel:
        call = pb_grpc.GuardedGenerationStub(channel).Generate(
            pb.GenerateRequest(domain="open_permissive", messages=PROMPT)
        )
        assert (await call.read()).WhichOneof("kind") == "start"
        for _ in range(after):
            assert (await call.read()).WhichOneof("kind") == "chunk"
        call.cancel()
    await _wait_no_sessions(running)
    await _upstream_settled(scripted)
    # Cancelled right after `start`, the request may not have reached the upstream yet; either way
    # none may run to completion.
    assert scripted.requests - requests in ((0, 1) if after == 0 else (1,))
    assert scripted.completed == completed, "the upstream request ran on after the caller cancelled"
    current = asyncio.all_tasks(running.loop.loop)
    assert not [t for t in current if "Generation" in repr(t.get_coro())], "a generation task was left running"
