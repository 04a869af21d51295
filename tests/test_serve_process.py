"""`guard serve` as a real process: health, graceful drain on SIGTERM (exit 0), clean start-up
failure, and logs without prompt or response text."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from guard.demo.corpus import SHOWCASE
from server.client import SidecarClient
from server.qwen3guard.v1 import guard_pb2 as pb

GUARD = str(Path(sys.executable).with_name("guard"))
SAFE = SHOWCASE[0]  # the demo model knows only its phrases; its prompt text must never reach the logs


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_serving(address: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            assert process.poll() is None, process.stderr.read()
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("the sidecar did not become SERVING")


@pytest.fixture()
def serve(demo_dir):
    started = []

    def start(*extra: str, env: dict[str, str] | None = None) -> tuple[subprocess.Popen, str]:
        port = free_port()
        process = subprocess.Popen(
            [GUARD, "serve", "--model", str(demo_dir), "--address", f"127.0.0.1:{port}", *extra],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env={**os.environ, **(env or {})},
        )
        started.append(process)
        return process, f"127.0.0.1:{port}"

    yield start
    for process in started:
        if process.poll() is None:
            process.kill()
            process.wait(10)


async def test_sigterm_drains_open_streams_and_exits_zero(serve):
    process, address = serve("--grace-period-s", "10", env={"GUARD_METRICS_PORT": str(free_port())})
    await wait_serving(address, process)
    async with SidecarClient(address) as client:
        async with client.moderate(messages=[{"role": "user", "content": SAFE.prompt}]) as stream:
            first = await stream.send_text(SAFE.response[:40])
            assert first.chunk.action == pb.CONTINUE
            process.send_signal(signal.SIGTERM)
            await asyncio.sleep(0.5)  # let the signal land: the open stream must keep working
            with pytest.raises(grpc.aio.AioRpcError) as refused:
                async with client.moderate(messages=[{"role": "user", "content": "new"}]):
                    pass
            assert refused.value.code() == grpc.StatusCode.UNAVAILABLE
            await stream.send_text(SAFE.response[40:])
            final = await stream.close()
            assert final.action == pb.CONTINUE
    assert process.wait(30) == 0
    logs = process.stderr.read()
    assert "event=draining" in logs and "event=stopped" in logs
    assert SAFE.prompt not in logs and SAFE.response[40:] not in logs
    assert "model=" in logs  # the settings are printed at start-up


async def test_settings_come_from_the_environment(serve):
    process, address = serve(env={"GUARD_MAX_CHUNK_TOKENS": "12", "GUARD_METRICS_PORT": "0"})
    await wait_serving(address, process)
    async with SidecarClient(address) as client:
        info = await client.info()
    assert info.limits.max_chunk_tokens == 12 and info.demo
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0


def test_missing_model_fails_start_up_with_a_clear_error(tmp_path):
    result = subprocess.run(
        [
            GUARD,
            "serve",
            "--model",
            str(tmp_path / "missing"),
            "--address",
            f"127.0.0.1:{free_port()}",
            "--metrics-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "neither 'demo' nor a checkpoint directory" in result.stderr


async def test_content_logging_is_an_operator_opt_in(serve):
    process, address = serve("--log-content", env={"GUARD_METRICS_PORT": "0"})
    await wait_serving(address, process)
    async with SidecarClient(address) as client:
        async with client.moderate(messages=[{"role": "user", "content": SAFE.prompt}]) as stream:
            await stream.send_text(SAFE.response)
            await stream.close()
    process.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0
    logs = process.stderr.read()
    assert SAFE.prompt in logs and SAFE.response in logs
