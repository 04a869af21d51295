"""Prometheus metrics: standard gRPC server names from our interceptor, and the guard's own."""

from __future__ import annotations

import asyncio
import urllib.request

import grpc
from prometheus_client import generate_latest

from guard.demo.corpus import SHOWCASE
from server.client import SidecarClient
from server.qwen3guard.v1 import guard_pb2 as pb


def sample(metrics, name: str, **labels) -> float:
    value = metrics.registry.get_sample_value(name, labels)
    return value or 0.0


async def eventually(condition, timeout: float = 5.0) -> bool:
    """Server-side metrics are recorded when the handler finishes, which may be after the client
    has its status: wait for the condition instead of racing it."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            return False
        await asyncio.sleep(0.01)
    return True


async def test_grpc_and_guard_metrics_are_recorded(sidecar, guard_tokenizer):
    m = sidecar.sidecar.metrics
    labels = dict(grpc_type="bidi_stream", grpc_service="qwen3guard.v1.StreamGuard", grpc_method="Moderate")
    started = sample(m, "grpc_server_started_total", **labels)
    ok = sample(m, "grpc_server_handled_total", **labels, grpc_code="OK")
    sent = sample(m, "grpc_server_msg_sent_total", **labels)
    tokens = sample(m, "guard_tokens_judged_total")
    interrupts = sample(m, "guard_stream_interruptions_total", category="Violent")
    ex = SHOWCASE[2]
    ids = guard_tokenizer.encode(ex.response)
    async with SidecarClient(sidecar.address) as client:
        async with client.moderate(messages=[{"role": "user", "content": ex.prompt}]) as stream:
            response = await stream.send_ids(ids)
            assert response.chunk.action == pb.INTERRUPT
            await stream.close()
    assert sample(m, "grpc_server_started_total", **labels) == started + 1
    assert await eventually(lambda: sample(m, "grpc_server_handled_total", **labels, grpc_code="OK") == ok + 1)
    assert sample(m, "grpc_server_msg_sent_total", **labels) == sent + 3  # prompt, chunk, final
    assert sample(m, "guard_tokens_judged_total") == tokens + len(ids)
    assert sample(m, "guard_stream_interruptions_total", category="Violent") == interrupts + 1
    assert sample(m, "guard_chunk_classify_seconds_count") > 0
    assert sample(m, "guard_batch_sessions_count") > 0


async def test_failed_rpcs_are_counted_by_code(sidecar):
    m = sidecar.sidecar.metrics
    labels = dict(
        grpc_type="bidi_stream",
        grpc_service="qwen3guard.v1.StreamGuard",
        grpc_method="Moderate",
        grpc_code="INVALID_ARGUMENT",
    )
    before = sample(m, "grpc_server_handled_total", **labels)
    async with SidecarClient(sidecar.address) as client:
        try:
            async with client.moderate(messages=[]):
                pass
        except grpc.aio.AioRpcError as exc:
            assert exc.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert await eventually(lambda: sample(m, "grpc_server_handled_total", **labels) == before + 1)


def test_labels_carry_no_request_ids_or_text(sidecar):
    text = generate_latest(sidecar.sidecar.metrics.registry).decode()
    assert "request_id" not in text and SHOWCASE[2].prompt not in text


def test_metrics_are_served_over_http(sidecar):
    server = sidecar.sidecar.metrics.serve_http(0)
    try:
        port = server.server_port
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10).read().decode()
    finally:
        server.shutdown()
    assert "grpc_server_handled_total" in body and "guard_live_sessions" in body
