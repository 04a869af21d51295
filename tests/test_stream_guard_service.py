"""StreamGuard over real gRPC on loopback, with the demo model: verdicts, release modes,
interrupts, Info, health, reflection, and bad input that harms nothing else."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

from guard.demo.corpus import SHOWCASE
from server.client import SidecarClient, open_request
from server.qwen3guard.v1 import guard_pb2 as pb
from server.qwen3guard.v1 import guard_pb2_grpc as pb_grpc

SAFE, UNSAFE = SHOWCASE[0], SHOWCASE[2]


def user(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


async def moderate_text(address: str, example, pieces: int = 6, **fields) -> list[pb.ModerateResponse]:
    """Stream the example's response as text deltas; return every response message."""
    text = example.response
    step = max(1, len(text) // pieces)
    out = []
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.StreamGuardStub(channel).Moderate()
        await call.write(open_request(messages=user(example.prompt), **fields))
        out.append(await call.read())
        for i in range(0, len(text), step):
            await call.write(pb.ModerateRequest(chunk=pb.ChunkRequest(text=text[i : i + step])))
            response = await call.read()
            out.append(response)
            if response.WhichOneof("kind") == "chunk" and response.chunk.action == pb.INTERRUPT:
                out.append(await call.read())  # the final message
                await call.done_writing()  # the sidecar stops draining what is in flight and ends OK
                assert await call.read() is grpc.aio.EOF
                return out
        await call.write(pb.ModerateRequest(close=pb.CloseRequest()))
        while (response := await call.read()) is not grpc.aio.EOF:
            out.append(response)
    return out


async def test_safe_text_is_released_whole(sidecar):
    responses = await moderate_text(sidecar.address, SAFE)
    assert responses[0].prompt.verdict.risk == pb.SAFE
    assert responses[0].prompt.verdict.action == pb.ALLOW
    final = responses[-1].final
    assert final.action == pb.CONTINUE and not final.HasField("first_unsafe_index")
    released = "".join(r.chunk.released_text for r in responses if r.WhichOneof("kind") == "chunk")
    assert released + final.released_text == SAFE.response
    assert final.released_chars == len(SAFE.response)


async def test_unsafe_text_is_interrupted_and_nothing_unsafe_is_released(sidecar):
    responses = await moderate_text(sidecar.address, UNSAFE)
    final = responses[-1].final
    assert final.action == pb.INTERRUPT and final.category == "Violent"
    released = "".join(r.chunk.released_text for r in responses if r.WhichOneof("kind") == "chunk")
    assert UNSAFE.response.startswith(released)
    assert len(released) <= UNSAFE.unsafe_from_char  # HOLD_BACK: nothing from the unsafe span
    assert "bomb" not in released


async def test_optimistic_mode_releases_on_arrival_and_reports_the_interrupt(sidecar):
    responses = await moderate_text(sidecar.address, UNSAFE, release_mode=pb.OPTIMISTIC)
    chunks = [r.chunk for r in responses if r.WhichOneof("kind") == "chunk"]
    assert all(c.released == c.received for c in chunks)
    assert chunks[-1].action == pb.INTERRUPT and chunks[-1].HasField("first_unsafe_index")
    assert responses[-1].final.action == pb.INTERRUPT


async def test_token_ids_and_probabilities(sidecar, guard_tokenizer):
    from guard.text.conversation import Message

    _, ids = guard_tokenizer.split_response([Message("user", UNSAFE.prompt), Message("assistant", UNSAFE.response)])
    async with SidecarClient(sidecar.address) as client:
        async with client.moderate(messages=user(UNSAFE.prompt), include_probabilities=True) as stream:
            response = await stream.send_ids(ids[:8])
            chunk = response.chunk
            assert [t.index for t in chunk.tokens] == list(range(8))
            assert [t.token_id for t in chunk.tokens] == ids[:8]
            assert set(chunk.tokens[0].verdict.risk_probs) == {"Safe", "Unsafe", "Controversial"}
            assert chunk.released == 8 and chunk.released_text == guard_tokenizer.hf.decode(ids[:8])
            response = await stream.send_ids(ids[8:])
            assert response.chunk.action == pb.INTERRUPT
            assert response.chunk.released == response.chunk.first_unsafe_index - 1  # the run started one earlier
            assert stream.final is None
            final = await stream.close()
            assert final.action == pb.INTERRUPT


async def moderate_ids(address: str, ids: list[int], chunk: int, **fields) -> list[pb.ModerateResponse]:
    async with SidecarClient(address) as client:
        async with client.moderate(messages=user(UNSAFE.prompt), **fields) as stream:
            out = []
            for i in range(0, len(ids), chunk):
                out.append(await stream.send_ids(ids[i : i + chunk]))
                if stream.interrupted:
                    break
            await stream.close()
    return out


def chunk_without(response: pb.ModerateResponse, *fields: str) -> pb.ChunkVerdict:
    chunk = pb.ChunkVerdict()
    chunk.CopyFrom(response.chunk)
    for name in ("timing", *fields):
        chunk.ClearField(name)
    return chunk


async def test_token_detail_trims_token_verdicts_and_nothing_else(sidecar, guard_tokenizer):
    """NOT_SAFE_TOKENS carries exactly the non-safe tokens of ALL_TOKENS, NO_TOKENS none; the
    actions, counters, released text and first_unsafe_index are the same in every mode."""
    ids = guard_tokenizer.encode(SAFE.response) + guard_tokenizer.encode(" " + UNSAFE.response)
    by_detail = {
        detail: await moderate_ids(sidecar.address, ids, 4, token_detail=detail)
        for detail in (pb.TOKEN_DETAIL_UNSPECIFIED, pb.ALL_TOKENS, pb.NOT_SAFE_TOKENS, pb.NO_TOKENS)
    }
    full = by_detail[pb.ALL_TOKENS]
    assert [chunk_without(r) for r in full] == [chunk_without(r) for r in by_detail[pb.TOKEN_DETAIL_UNSPECIFIED]]
    assert full[-1].chunk.action == pb.INTERRUPT and all(len(r.chunk.tokens) for r in full)
    all_safe_chunks = 0
    for detail in (pb.NOT_SAFE_TOKENS, pb.NO_TOKENS):
        trimmed = by_detail[detail]
        assert len(trimmed) == len(full)
        for a, b in zip(full, trimmed, strict=True):
            not_safe = [t for t in a.chunk.tokens if t.verdict.risk != pb.SAFE]
            assert list(b.chunk.tokens) == (not_safe if detail == pb.NOT_SAFE_TOKENS else [])
            all_safe_chunks += not not_safe
            assert chunk_without(a, "tokens") == chunk_without(b, "tokens")  # all but the token verdicts
    flagged = by_detail[pb.NOT_SAFE_TOKENS][-1].chunk
    assert flagged.first_unsafe_index in [t.index for t in flagged.tokens]  # the flagged token is always there
    assert all_safe_chunks > 0


async def test_unknown_token_detail_is_invalid_argument(sidecar):
    error = await rpc_error(sidecar.address, [open_request(messages=user("Hi"), token_detail=7)])
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT and "token_detail" in error.details()


async def interrupted_stream(channel: grpc.aio.Channel, ids: list[int], in_flight: int = 0):
    """A Moderate call whose first chunk interrupts, ``in_flight`` more chunks written before the
    caller reads the interrupt and `final` (asserted); the call, for what the test does next."""
    call = pb_grpc.StreamGuardStub(channel).Moderate()
    await call.write(open_request(messages=user(UNSAFE.prompt)))
    await call.read()
    await call.write(pb.ModerateRequest(chunk=pb.ChunkRequest(token_ids=ids)))
    for _ in range(in_flight):
        await call.write(pb.ModerateRequest(chunk=pb.ChunkRequest(token_ids=ids[:4])))
    assert (await call.read()).chunk.action == pb.INTERRUPT
    assert (await call.read()).WhichOneof("kind") == "final"
    return call


async def test_chunks_in_flight_after_an_interrupt_are_dropped_and_the_stream_ends_ok(sidecar, guard_tokenizer):
    """A pipelining caller still writing after the interrupt: its writes succeed, nothing more is
    judged or answered, and the stream ends OK when it half-closes (gRPC would otherwise fail
    its next write with INTERNAL and lose the interrupt and `final` it had not read yet)."""
    ids = guard_tokenizer.encode(UNSAFE.response)
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        call = await interrupted_stream(channel, ids, in_flight=5)
        await call.done_writing()
        assert await call.read() is grpc.aio.EOF
        assert await call.code() == grpc.StatusCode.OK
        with pytest.raises(asyncio.InvalidStateError):
            await call.write(pb.ModerateRequest(chunk=pb.ChunkRequest(token_ids=[1])))
    async with SidecarClient(sidecar.address) as client:
        for _ in range(100):
            if (await client.info()).live_sessions == 0:
                break
            await asyncio.sleep(0.05)
        assert (await client.info()).live_sessions == 0


async def test_a_caller_that_never_half_closes_after_an_interrupt_is_ended(sidecar, guard_tokenizer, monkeypatch):
    import server.stream_guard

    monkeypatch.setattr(server.stream_guard, "DRAIN_AFTER_STOP_S", 0.5)
    ids = guard_tokenizer.encode(UNSAFE.response)
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        call = await interrupted_stream(channel, ids)
        assert await asyncio.wait_for(call.read(), 30) is grpc.aio.EOF  # the sidecar ended it
        assert await call.code() == grpc.StatusCode.OK


async def test_the_client_half_closes_an_interrupted_stream(sidecar, guard_tokenizer, monkeypatch):
    """SidecarClient's close() after an interrupt half-closes, so the sidecar ends the call at once
    instead of draining for DRAIN_AFTER_STOP_S (made an hour here: without the half-close, close()
    would not return)."""
    import server.stream_guard

    monkeypatch.setattr(server.stream_guard, "DRAIN_AFTER_STOP_S", 3600.0)
    ids = guard_tokenizer.encode(UNSAFE.response)
    async with SidecarClient(sidecar.address) as client:
        async with client.moderate(messages=user(UNSAFE.prompt)) as stream:
            assert (await stream.send_ids(ids)).chunk.action == pb.INTERRUPT
            final = await asyncio.wait_for(stream.close(), 60)
            assert final.action == pb.INTERRUPT and await stream.call.code() == grpc.StatusCode.OK


async def rpc_error(address: str, requests: list[pb.ModerateRequest]) -> grpc.aio.AioRpcError:
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.StreamGuardStub(channel).Moderate(iter(requests))
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call:
                pass
    return info.value


OPEN = open_request(messages=user("Hello"))
CASES = {
    "chunk before open": ([pb.ModerateRequest(chunk=pb.ChunkRequest(token_ids=[1]))], "first message must be `open`"),
    "second open": ([OPEN, OPEN], "second `open`"),
    "text and ids": ([OPEN, pb.ModerateRequest(chunk=pb.ChunkRequest(token_ids=[1], text="x"))], "both set"),
    "id out of vocabulary": (
        [OPEN, pb.ModerateRequest(chunk=pb.ChunkRequest(token_ids=[5, 10**6]))],
        "outside the vocabulary",
    ),
    "empty conversation": ([open_request()], "conversation is empty"),
    "conversation ending with assistant": (
        [open_request(messages=[{"role": "user", "content": "a"}, {"role": "assistant", "content": "b"}])],
        "must end with a user turn",
    ),
    "unknown role": ([open_request(messages=[{"role": "robot", "content": "a"}])], "messages[0].role"),
    "oversized chunk": ([OPEN, pb.ModerateRequest(chunk=pb.ChunkRequest(token_ids=[1] * 65))], "at most 64"),
    "oversized text": ([OPEN, pb.ModerateRequest(chunk=pb.ChunkRequest(text="x" * 257))], "at most 256"),
    "prompt ids without im_end": ([open_request(prompt_token_ids=[1, 2])], "<|im_end|>"),
    "empty request": ([OPEN, pb.ModerateRequest()], "empty request"),
}


@pytest.mark.parametrize("name", sorted(CASES))
async def test_bad_input_is_invalid_argument_with_a_clear_message(sidecar, name):
    requests, message = CASES[name]
    error = await rpc_error(sidecar.address, requests)
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in error.details()


async def test_bad_streams_do_not_disturb_a_good_one(sidecar, guard_tokenizer):
    ids = guard_tokenizer.encode(SAFE.response)

    async def good() -> pb.FinalResponse:
        async with SidecarClient(sidecar.address) as client:
            async with client.moderate(messages=user(SAFE.prompt)) as stream:
                for i in range(0, len(ids), 3):
                    response = await stream.send_ids(ids[i : i + 3])
                    assert response.chunk.action == pb.CONTINUE
                    await asyncio.sleep(0)
                return await stream.close()

    bad = [rpc_error(sidecar.address, requests) for requests, _ in CASES.values()] * 2
    results = await asyncio.gather(good(), *bad)
    assert results[0].action == pb.CONTINUE and results[0].released == len(ids)
    assert all(e.code() == grpc.StatusCode.INVALID_ARGUMENT for e in results[1:])
    await until_no_live_sessions(sidecar)


async def until_no_live_sessions(sidecar, timeout: float = 10.0) -> None:
    """Sessions are closed in the handler's `finally`; await it through Info, not a sleep."""
    async with SidecarClient(sidecar.address) as client:
        deadline = asyncio.get_running_loop().time() + timeout
        while (await client.info()).live_sessions:
            assert asyncio.get_running_loop().time() < deadline, "sessions leaked"
            await asyncio.sleep(0.01)


async def test_client_cancel_frees_the_session(sidecar):
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        call = pb_grpc.StreamGuardStub(channel).Moderate()
        await call.write(open_request(messages=user("Hello")))
        await call.read()
        assert sidecar.engine.live_sessions >= 1
        call.cancel()
    await until_no_live_sessions(sidecar)


async def test_deadline_frees_the_session(sidecar):
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        call = pb_grpc.StreamGuardStub(channel).Moderate(timeout=0.5)
        await call.write(open_request(messages=user("Hello")))
        await call.read()
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await call.read()
        assert info.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    await until_no_live_sessions(sidecar)


async def test_info_reports_the_demo_model_and_limits(sidecar):
    async with SidecarClient(sidecar.address) as client:
        info = await client.info()
    assert info.demo and "not a safety model" in info.notice
    assert list(info.risk_labels) == ["Safe", "Unsafe", "Controversial"]
    assert "Jailbreak" in info.query_categories and "Jailbreak" not in info.categories
    assert info.limits.max_chunk_tokens == 64 and info.vocab_size == 151936


async def test_health_is_serving_and_reflection_lists_the_services(sidecar):
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for service in ("", "qwen3guard.v1.StreamGuard"):
            status = (await health.Check(health_pb2.HealthCheckRequest(service=service))).status
            assert status == health_pb2.HealthCheckResponse.SERVING
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        call = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = [s.name async for r in call for s in r.list_services_response.service]
    assert {"qwen3guard.v1.StreamGuard", "grpc.health.v1.Health"} <= set(names)


async def test_session_limit_is_resource_exhausted(demo_dir):
    from servers import running_sidecar

    with running_sidecar(model=str(demo_dir), max_sessions=2) as small:
        async with SidecarClient(small.address) as client:
            async with client.moderate(messages=user("a")), client.moderate(messages=user("b")):
                with pytest.raises(grpc.aio.AioRpcError) as info:
                    async with client.moderate(messages=user("c")):
                        pass
                assert info.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
                assert "2 sessions are live" in info.value.details()
        await until_no_live_sessions(small)


async def test_unavailable_while_loading(demo_dir):
    from server.app import start_sidecar
    from server.settings import ServeSettings

    sidecar = await start_sidecar(ServeSettings(address="127.0.0.1:0", model=str(demo_dir)), load=False)
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
            status = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest())
            assert status.status == health_pb2.HealthCheckResponse.NOT_SERVING
            error = await rpc_error(f"127.0.0.1:{sidecar.port}", [OPEN])
            assert error.code() == grpc.StatusCode.UNAVAILABLE and "loading" in error.details()
    finally:
        await sidecar.drain(0)


async def test_client_helper_raises_when_the_stream_ends_early(sidecar):
    async with SidecarClient(sidecar.address) as client:
        with pytest.raises(grpc.aio.AioRpcError):
            async with client.moderate(messages=[]):
                pass
