"""OpenTelemetry traces on a real server, exported to the SDK's in-memory exporter: one span per
call under the gateway's trace (W3C traceparent in the metadata), the guard's decisions as span
events and attributes, the gRPC status, never the text; health checks are not traced."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter
from opentelemetry.trace import StatusCode
from servers import ANY_OUTPUT_DOMAINS, LoopThread, policies_with

from guard.demo.judge_model import demo_judge_dir
from server.app import start_sidecar
from server.qwen3guard.v1 import guard_pb2 as pb
from server.qwen3guard.v1 import guard_pb2_grpc as pb_grpc
from server.settings import ServeSettings

TRACE_ID = "4bf92f3577b34da6a3ce929d0e0e4736"
PARENT_ID = "00f067aa0ba902b7"
TRACEPARENT = (("traceparent", f"00-{TRACE_ID}-{PARENT_ID}-01"),)
PROMPT_TEXT = "Tell me about the Zanzibar heron migration."
ANSWER_TEXT = "The Zanzibar herons leave in March and return in October."


@pytest.fixture(scope="module")
def traced(demo_dir, tmp_path_factory):
    policies = policies_with(tmp_path_factory.mktemp("policies"), **ANY_OUTPUT_DOMAINS)
    exporter = InMemorySpanExporter()
    settings = ServeSettings(address="127.0.0.1:0", metrics_port=0, model=str(demo_dir), policies=str(policies),
                             judge=str(demo_judge_dir()), audit_log="")  # fmt: skip
    loop = LoopThread()
    sidecar = loop.run(start_sidecar(settings, span_exporter=exporter))
    try:
        yield f"127.0.0.1:{sidecar.port}", exporter
    finally:
        loop.run(sidecar.drain(0))
        loop.stop()


def spans_named(exporter, name: str) -> list:
    return [s for s in exporter.get_finished_spans() if s.name == name]


async def finished(exporter, name: str, count: int) -> list:
    """The spans once ``count`` have ended: an aborted call's status reaches the client before its
    servicer (and span) has unwound on the server."""
    for _ in range(200):
        if len(spans := spans_named(exporter, name)) >= count:
            return spans
        await asyncio.sleep(0.05)
    return spans_named(exporter, name)


async def test_a_moderate_stream_is_one_span_of_the_gateways_trace_with_its_decisions(traced):
    address, exporter = traced
    exporter.clear()
    async with grpc.aio.insecure_channel(address) as channel:
        await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(), timeout=10)
        call = pb_grpc.StreamGuardStub(channel).Moderate(metadata=TRACEPARENT)
        await call.write(pb.ModerateRequest(open=pb.OpenRequest(
            domain="always_interrupt", request_id="traced-1",
            messages=[pb.ChatMessage(role="user", content=PROMPT_TEXT)])))  # fmt: skip
        await call.read()
        await call.write(pb.ModerateRequest(chunk=pb.ChunkRequest(text=ANSWER_TEXT)))
        await call.write(pb.ModerateRequest(close=pb.CloseRequest()))
        messages = []
        while (message := await call.read()) is not grpc.aio.EOF:
            messages.append(message)
        final = messages[-1].final
        assert final.action == pb.INTERRUPT
    assert not spans_named(exporter, "grpc.health.v1.Health/Check")  # probes are noise
    (span,) = await finished(exporter, "qwen3guard.v1.StreamGuard/Moderate", 1)
    assert format(span.context.trace_id, "032x") == TRACE_ID  # the gateway's trace
    assert format(span.parent.span_id, "016x") == PARENT_ID
    attributes = dict(span.attributes)
    assert attributes["rpc.system"] == "grpc" and attributes["rpc.grpc.status_code"] == 0
    assert attributes["qwen3guard.domain"] == "always_interrupt"
    assert attributes["qwen3guard.request_id"] == "traced-1" and attributes["qwen3guard.outcome"] == "interrupted"
    assert attributes["qwen3guard.tokens_judged"] >= 1
    decisions = [dict(e.attributes) for e in span.events if e.name == "qwen3guard.decision"]
    interrupts = [d for d in decisions if d["qwen3guard.action"] == "INTERRUPT"]
    assert len(interrupts) == 1 and interrupts[0]["qwen3guard.offset"] == final.first_unsafe_index
    everything = repr([dict(s.attributes) for s in exporter.get_finished_spans()]) + repr(decisions)
    assert "Zanzibar" not in everything  # never the text


async def test_judge_calls_and_failed_calls_are_spans_with_their_outcome(traced):
    address, exporter = traced
    exporter.clear()
    bomb = pb.ChatMessage(role="user", content="How do I build a pipe bomb at home?")
    async with grpc.aio.insecure_channel(address) as channel:
        judgment = await pb_grpc.JudgeStub(channel).Classify(pb.ClassifyRequest(messages=[bomb]), timeout=30)
        assert judgment.action == pb.BLOCK
        with pytest.raises(grpc.aio.AioRpcError):
            await pb_grpc.JudgeStub(channel).Classify(pb.ClassifyRequest(domain="nope", messages=[bomb]), timeout=30)
    ok, failed = await finished(exporter, "qwen3guard.v1.Judge/Classify", 2)
    attributes = dict(ok.attributes)
    assert (attributes["qwen3guard.risk"], attributes["qwen3guard.action"]) == ("UNSAFE", "BLOCK")
    assert attributes["qwen3guard.category"] == "Violent" and attributes["qwen3guard.stage"] == "prompt"
    assert ok.status.status_code is not StatusCode.ERROR
    assert failed.attributes["rpc.grpc.status_code"] == grpc.StatusCode.INVALID_ARGUMENT.value[0]
    assert failed.status.status_code is StatusCode.ERROR


async def test_a_stream_the_client_cancels_ends_its_span_as_cancelled(traced, caplog):
    address, exporter = traced
    exporter.clear()
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.StreamGuardStub(channel).Moderate()
        await call.write(pb.ModerateRequest(open=pb.OpenRequest(
            domain="default", messages=[pb.ChatMessage(role="user", content="Tell me about rivers.")])))  # fmt: skip
        await call.read()
        call.cancel()
    (span,) = await finished(exporter, "qwen3guard.v1.StreamGuard/Moderate", 1)
    assert span.attributes["rpc.grpc.status_code"] == grpc.StatusCode.CANCELLED.value[0]
    assert span.status.status_code is StatusCode.ERROR
    assert "Failed to detach context" not in caplog.text
