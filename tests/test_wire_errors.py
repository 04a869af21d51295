"""Request bytes that are not a valid request message (invalid UTF-8 in a proto3 string, a
truncated message) answer INVALID_ARGUMENT naming the message, log no traceback, close the
stream's session, and the sidecar keeps serving. Raw bytes over a real gRPC channel."""

from __future__ import annotations

import asyncio
import logging

import grpc
import pytest

from guard.demo.corpus import SHOWCASE
from server.qwen3guard.v1 import guard_pb2 as pb
from server.qwen3guard.v1 import guard_pb2_grpc as pb_grpc

EVALUATE = "/qwen3guard.v1.Policies/Evaluate"
MODERATE = "/qwen3guard.v1.StreamGuard/Moderate"
CLASSIFY = "/qwen3guard.v1.Judge/Classify"
GENERATE = "/qwen3guard.v1.GuardedGeneration/Generate"
MARK = "zzzz"  # a string we put in a string field, then spoil on the wire


def spoiled(message, how: str) -> bytes:
    """``message`` serialized, then made invalid: a non-UTF-8 byte inside the string ``MARK``
    (same length, so every length prefix stays right), or the last bytes cut off."""
    data = message.SerializeToString()
    if how == "utf8":
        assert data.count(MARK.encode()) == 1
        return data.replace(MARK.encode(), b"z\xffzz")
    return data[:-2]  # inside the last length-delimited field: truncated


REASON = {"utf8": "bad UTF-8", "truncated": "corrupt"}


def tracebacks(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.exc_info or "Unexpected" in r.getMessage()]


def raw_unary(channel: grpc.aio.Channel, method: str):
    return channel.unary_unary(method, request_serializer=None, response_deserializer=None)


def evaluate_request(domain: str = "medical") -> pb.EvaluateRequest:
    return pb.EvaluateRequest(domain=domain, stage=pb.RESPONSE, risk=pb.UNSAFE, category="PII")


@pytest.mark.parametrize("how", ["utf8", "truncated"])
async def test_undecodable_evaluate_request_is_invalid_argument_without_a_traceback(sidecar, caplog, how):
    caplog.set_level(logging.INFO)
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await raw_unary(channel, EVALUATE)(spoiled(evaluate_request(MARK), how))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert info.value.details().startswith("the request bytes are not a valid qwen3guard.v1.EvaluateRequest: ")
        assert REASON[how] in info.value.details()
        good = await pb_grpc.PoliciesStub(channel).Evaluate(evaluate_request())  # still serving
    assert good.action == pb.REDACT
    assert tracebacks(caplog) == []


async def test_undecodable_judge_request_is_invalid_argument(sidecar, caplog):
    request = pb.ClassifyRequest(messages=[pb.ChatMessage(role="user", content=MARK)])
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await raw_unary(channel, CLASSIFY)(spoiled(request, "utf8"))
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "not a valid qwen3guard.v1.ClassifyRequest: String field had bad UTF-8" in info.value.details()
        request.messages[0].content = SHOWCASE[0].prompt
        judgment = await pb_grpc.JudgeStub(channel).Classify(request)
    assert judgment.stage == pb.PROMPT
    assert tracebacks(caplog) == []


async def test_undecodable_generate_request_is_invalid_argument(sidecar, caplog):
    """A unary request with a streamed answer: rejected before the servicer runs."""
    request = pb.GenerateRequest(request_id=MARK, messages=[pb.ChatMessage(role="user", content="Hi")])
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        call = channel.unary_stream(GENERATE, request_serializer=None, response_deserializer=None)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            async for _ in call(spoiled(request, "truncated")):
                pass
    assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "not a valid qwen3guard.v1.GenerateRequest" in info.value.details()
    assert tracebacks(caplog) == []


async def wait_until(condition, timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        assert loop.time() < deadline, "timed out"
        await asyncio.sleep(0.01)


@pytest.mark.parametrize("how", ["utf8", "truncated"])
async def test_bad_third_stream_message_ends_the_stream_and_closes_its_session(
    sidecar, guard_tokenizer, caplog, how
):
    caplog.set_level(logging.INFO)
    engine = sidecar.engine
    registry = sidecar.sidecar.metrics.registry
    labels = {
        "grpc_type": "bidi_stream",
        "grpc_service": "qwen3guard.v1.StreamGuard",
        "grpc_method": "Moderate",
        "grpc_code": "INVALID_ARGUMENT",
    }

    def rejected() -> float:
        return registry.get_sample_value("grpc_server_handled_total", labels) or 0.0

    rejected_before = rejected()
    sessions_before = engine.live_sessions
    case = SHOWCASE[0]
    opened = pb.ModerateRequest(open=pb.OpenRequest(messages=[pb.ChatMessage(role="user", content=case.prompt)]))
    chunk = pb.ModerateRequest(chunk=pb.ChunkRequest(token_ids=guard_tokenizer.encode(case.response)[:4]))
    bad = spoiled(pb.ModerateRequest(chunk=pb.ChunkRequest(text=MARK)), how)
    async with grpc.aio.insecure_channel(sidecar.address) as channel:
        call = channel.stream_stream(MODERATE, request_serializer=None, response_deserializer=None)()
        await call.write(opened.SerializeToString())
        assert pb.ModerateResponse.FromString(await call.read()).HasField("prompt")
        assert engine.live_sessions == sessions_before + 1
        await call.write(chunk.SerializeToString())
        assert pb.ModerateResponse.FromString(await call.read()).HasField("chunk")
        await call.write(bad)
        with pytest.raises(grpc.aio.AioRpcError) as info:
            while await call.read() is not grpc.aio.EOF:
                pass
        assert info.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        assert "the request bytes are not a valid qwen3guard.v1.ModerateRequest: " in info.value.details()
        assert REASON[how] in info.value.details()
        await wait_until(lambda: engine.live_sessions == sessions_before and rejected() > rejected_before)
        # The sidecar keeps serving streams.
        good = channel.stream_stream(MODERATE, request_serializer=None, response_deserializer=None)()
        await good.write(opened.SerializeToString())
        assert pb.ModerateResponse.FromString(await good.read()).HasField("prompt")
        await good.write(pb.ModerateRequest(close=pb.CloseRequest()).SerializeToString())
        assert pb.ModerateResponse.FromString(await good.read()).HasField("final")
        await good.done_writing()
        assert await good.code() == grpc.StatusCode.OK
    assert tracebacks(caplog) == []
