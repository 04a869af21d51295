"""The gRPC transport's limits, on a real server: a client that never reads its verdicts holds a
bounded amount in the server (its sends stop with flow control, it stops reading the client's
chunks), connections are recycled at their maximum age (open streams get the grace period, then
end), and the settings reach grpc core."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from servers import ANY_OUTPUT_DOMAINS, policies_with, running_sidecar

from server.qwen3guard.v1 import guard_pb2 as pb
from server.qwen3guard.v1 import guard_pb2_grpc as pb_grpc
from server.settings import ServeSettings
from server.stream_guard import READ_AHEAD

PROMPT = [pb.ChatMessage(role="user", content="Tell me about rivers.")]


def test_server_options_follow_the_settings():
    options = dict(ServeSettings(grpc_max_connection_age_s=30, grpc_max_concurrent_streams=8).server_options())
    assert options["grpc.max_concurrent_streams"] == 8
    assert options["grpc.max_connection_age_ms"] == 30_000 and options["grpc.max_connection_age_grace_ms"] == 300_000
    assert options["grpc.http2.min_ping_interval_without_data_ms"] == 10_000  # grpc core's name for enforcement
    assert options["grpc.http2.max_ping_strikes"] == 2
    assert options["grpc.max_send_message_length"] == options["grpc.max_receive_message_length"] == 32 * 2**20
    assert "grpc.max_connection_age_ms" not in dict(ServeSettings().server_options())  # 0 = never


@pytest.fixture(scope="module")
def short_lived(demo_dir):
    with running_sidecar(model=str(demo_dir), judge="", grpc_max_connection_age_s=1.0,
                         grpc_max_connection_age_grace_s=1.0) as running:  # fmt: skip
        yield running


async def test_connections_are_recycled_at_their_maximum_age(short_lived):
    """After max age + grace the connection closes: a stream still open then ends UNAVAILABLE, and
    the channel reconnects for the next call (what spreads load over new replicas)."""
    async with grpc.aio.insecure_channel(short_lived.address) as channel:
        stub = pb_grpc.StreamGuardStub(channel)
        call = stub.Moderate()
        await call.write(pb.ModerateRequest(open=pb.OpenRequest(domain="default", messages=PROMPT)))
        first = await call.read()
        assert first.WhichOneof("kind") == "prompt"
        await asyncio.sleep(3.0)  # past age (1 s) + grace (1 s)
        assert await asyncio.wait_for(call.code(), 10) == grpc.StatusCode.UNAVAILABLE  # ended with the connection
        info_reply = await stub.Info(pb.InfoRequest(), timeout=10)  # a new connection serves the next call
        assert info_reply.live_sessions == 0


@pytest.fixture(scope="module")
def roomy(demo_dir, tmp_path_factory):
    policies = policies_with(tmp_path_factory.mktemp("policies"), **ANY_OUTPUT_DOMAINS)
    with running_sidecar(model=str(demo_dir), judge="", policies=str(policies), max_tokens_per_session=200_000) as s:
        yield s


def _moderate_messages(running, kind: str) -> float:
    counter = running.sidecar.metrics.msg_received if kind == "received" else running.sidecar.metrics.msg_sent
    return sum(
        sample.value
        for metric in counter.collect()
        for sample in metric.samples
        if sample.name.endswith("_total") and sample.labels.get("grpc_method") == "Moderate"
    )


async def test_a_client_that_never_reads_is_held_to_a_bounded_amount(roomy, guard_tokenizer):
    """Thousands of chunks written, no verdict read: however far ahead the client is, the server
    holds at most READ_AHEAD chunks past those it has answered (the rest waits in the transport's
    flow-controlled window or in the client), and its answers wait on flow control the same way."""
    ids = guard_tokenizer.hf.encode("The river runs to the sea.", add_special_tokens=False)[:8]
    received0, sent0 = _moderate_messages(roomy, "received"), _moderate_messages(roomy, "sent")
    async with grpc.aio.insecure_channel(roomy.address) as channel:
        call = pb_grpc.StreamGuardStub(channel).Moderate()
        await call.write(pb.ModerateRequest(open=pb.OpenRequest(domain="permissive", messages=PROMPT)))
        chunk = pb.ModerateRequest(chunk=pb.ChunkRequest(token_ids=ids))
        written = 0
        while written < 6000:
            try:
                await asyncio.wait_for(call.write(chunk), timeout=5)
            except TimeoutError:
                break  # the client's own writes are held back too
            written += 1
        for _ in range(4):  # while the server works through them
            received = _moderate_messages(roomy, "received") - received0
            sent = _moderate_messages(roomy, "sent") - sent0
            assert received - sent <= READ_AHEAD + 3, (received, sent)  # the open, one read, one being answered
            await asyncio.sleep(0.5)
        print(f"written {written}; the server read {received:.0f} and answered {sent:.0f}")
        assert received < written
        assert roomy.engine.live_sessions == 1
        call.cancel()
    deadline = asyncio.get_running_loop().time() + 10
    while roomy.engine.live_sessions and asyncio.get_running_loop().time() < deadline:
        await asyncio.sleep(0.05)
    assert roomy.engine.live_sessions == 0


RUDE = [("grpc.keepalive_time_ms", 200), ("grpc.keepalive_permit_without_calls", 1),
        ("grpc.http2.max_pings_without_data", 0)]  # fmt: skip


@pytest.fixture(scope="module")
def strict_pings(demo_dir):
    with running_sidecar(
        model=str(demo_dir), judge="", grpc_min_ping_interval_s=5.0, grpc_max_ping_strikes=1
    ) as running:
        yield running


async def test_the_ping_interval_setting_reaches_the_server(demo_dir):
    """The same pinging client keeps its stream where the operator allows pings every 100 ms."""
    with running_sidecar(model=str(demo_dir), judge="", grpc_min_ping_interval_s=0.1) as lenient:
        async with grpc.aio.insecure_channel(lenient.address, options=RUDE) as channel:
            call = pb_grpc.StreamGuardStub(channel).Moderate()
            await call.write(pb.ModerateRequest(open=pb.OpenRequest(domain="default", messages=PROMPT)))
            assert (await call.read()).WhichOneof("kind") == "prompt"
            await asyncio.sleep(3.0)  # 15 pings
            assert not call.done()
            await call.write(pb.ModerateRequest(close=pb.CloseRequest()))
            assert (await call.read()).WhichOneof("kind") == "final"


async def test_a_client_that_pings_too_often_is_disconnected(strict_pings):
    """Keepalive enforcement: pings every 200 ms against a 5 s minimum earn GOAWAY (too_many_pings);
    the open stream ends UNAVAILABLE. A polite client on the same server is unaffected."""
    async with grpc.aio.insecure_channel(strict_pings.address, options=RUDE) as channel:
        call = pb_grpc.StreamGuardStub(channel).Moderate()
        await call.write(pb.ModerateRequest(open=pb.OpenRequest(domain="default", messages=PROMPT)))
        assert (await call.read()).WhichOneof("kind") == "prompt"
        assert await asyncio.wait_for(call.code(), 30) == grpc.StatusCode.UNAVAILABLE
    async with grpc.aio.insecure_channel(strict_pings.address) as channel:
        assert (await pb_grpc.StreamGuardStub(channel).Info(pb.InfoRequest(), timeout=10)).live_sessions == 0
