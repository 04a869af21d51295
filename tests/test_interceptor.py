"""The gateway interceptor end to end over loopback: a real sidecar (demo model), real grpc.aio
LLM backends (scripted text, and a tiny real Qwen3 causal LM generating token by token).
Unsafe content is cut, the upstream sees the cancel, safe content passes unchanged."""

from __future__ import annotations

import asyncio
import contextlib

import grpc
import pytest
from servers import BackendLog, ScriptedTextBackend, TinyModelBackend, chat_stub, llm_stub, running_backend

from guard.demo.corpus import SHOWCASE
from server import interceptor as interceptor_module
from server.client import SidecarClient
from server.interceptor import GuardInterceptor, StopInfo
from server.qwen3guard.v1 import guard_pb2 as pb

SAFE, UNSAFE = SHOWCASE[0], SHOWCASE[2]
UNSAFE_PROMPT = next(example for example in SHOWCASE if example.prompt_risk == "Unsafe" and example.prompt_category)


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


# ------------------------------------------------------------------- cleanup on every way out
# Each test cancels (or fails) a guarded call at one await point and checks, before any channel
# closes (closing a channel would cancel the calls for us and hide a leak), that the backend saw
# the cancel, the sidecar session is gone, and no interceptor task is left pending.


def pending_interceptor_tasks() -> list[asyncio.Task]:
    """Tasks still running code of server/interceptor.py (whatever their names)."""
    return [
        task
        for task in asyncio.all_tasks()
        if not task.done() and getattr(task.get_coro(), "cr_code", None) is not None
        and task.get_coro().cr_code.co_filename == interceptor_module.__file__
    ]


async def eventually(check, what: str, timeout: float = 10.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        if loop.time() > deadline:
            pytest.fail(f"{what} after {timeout} s")
        await asyncio.sleep(0.02)


async def assert_released(backend: ScriptedTextBackend, sidecar_address: str) -> None:
    """The backend call was cancelled, the sidecar has no live session, no interceptor task is pending."""
    assert await asyncio.to_thread(backend.log.cancelled.wait, 10), "the backend call was not cancelled"
    assert not backend.log.completed.is_set()

    async def no_sessions() -> bool:
        async with SidecarClient(sidecar_address, timeout=5) as client:
            return (await client.info()).live_sessions == 0

    async def no_tasks() -> bool:
        return not pending_interceptor_tasks()

    await eventually(no_sessions, "the sidecar still has a live session")
    await eventually(no_tasks, f"interceptor tasks still pending: {pending_interceptor_tasks()}")


@contextlib.asynccontextmanager
async def guarded_stub(sidecar_target: str, backend_address: str, **options):
    """The gateway's stub for the backend, guarded through the sidecar at ``sidecar_target``."""
    async with grpc.aio.insecure_channel(sidecar_target) as sidecar_channel:
        interceptor = GuardInterceptor(
            sidecar_channel,
            conversation=lambda r: [{"role": "user", "content": r["prompt"]}],
            extract=lambda m: m["text"],
            make_stopped=stopped,
            **options,
        )
        async with grpc.aio.insecure_channel(backend_address, interceptors=interceptor.interceptors()) as channel:
            yield llm_stub(channel), sidecar_channel


class TcpProxy:
    """A loopback TCP proxy in front of the sidecar: a network fault a test switches on.
    ``flowing.clear()`` holds the bytes from the sidecar to the gateway (the sidecar still reads
    what the gateway sends); ``blackhole`` accepts connections and forwards nothing, so the HTTP/2
    handshake never completes."""

    def __init__(self, target_port: int, *, blackhole: bool = False) -> None:
        self.target_port = target_port
        self.blackhole = blackhole
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.connected = asyncio.Event()
        self._writers: list[asyncio.StreamWriter] = []
        self._handlers: set[asyncio.Task] = set()

    async def __aenter__(self) -> TcpProxy:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.address = f"127.0.0.1:{self.server.sockets[0].getsockname()[1]}"
        return self

    async def __aexit__(self, *exc) -> None:
        self.flowing.set()
        self.server.close()
        for writer in self._writers:
            writer.close()
        if self._handlers:  # they end at EOF, which closing the sockets brings
            await asyncio.wait(self._handlers, timeout=10)
        await self.server.wait_closed()

    def drop(self) -> None:
        """Close every connection now (the sidecar going away)."""
        for writer in self._writers:
            writer.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._handlers.add(asyncio.current_task())
        self._writers.append(writer)
        self.connected.set()
        if self.blackhole:
            await self._pipe(reader, None, None)
            return
        upstream_reader, upstream_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self._writers.append(upstream_writer)
        await asyncio.gather(
            self._pipe(reader, upstream_writer, None), self._pipe(upstream_reader, writer, self.flowing)
        )

    @staticmethod
    async def _pipe(reader, writer, gate: asyncio.Event | None) -> None:
        try:
            while data := await reader.read(65536):
                if writer is None:
                    continue  # blackhole: read and drop
                if gate is not None:
                    await gate.wait()
                writer.write(data)
                await writer.drain()
        except ConnectionError:
            pass
        finally:
            if writer is not None:
                writer.close()


def long_safe_request() -> dict:
    """A backend response long enough (20 s) that only a cancel ends it early."""
    return {"prompt": SAFE.prompt, "pieces": pieces(SAFE.response) * 60}


async def read_all(call, got: list) -> None:
    async for message in call:
        got.append(message)


async def test_caller_cancelled_during_open_cancels_the_backend(sidecar, scripted):
    backend, address = scripted
    port = int(sidecar.address.rsplit(":", 1)[1])
    async with TcpProxy(port, blackhole=True) as proxy, guarded_stub(proxy.address, address) as (stub, _):
        consumer = asyncio.create_task(read_all(stub(long_safe_request()), []))
        await asyncio.wait_for(proxy.connected.wait(), 10)  # the Moderate call is connecting, never ready
        await backend_started(backend)
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(consumer, 10)  # a leak hangs here: fail instead
        await assert_released(backend, sidecar.address)


async def test_caller_cancelled_during_the_prompt_verdict_closes_both_sides(sidecar, scripted):
    backend, address = scripted
    port = int(sidecar.address.rsplit(":", 1)[1])
    async with TcpProxy(port) as proxy, guarded_stub(proxy.address, address) as (stub, sidecar_channel):
        await SidecarClient(sidecar_channel, timeout=10).info()  # the interceptor's connection is up before holding
        proxy.flowing.clear()  # from now on the sidecar's answers (the prompt verdict) are held
        consumer = asyncio.create_task(read_all(stub(long_safe_request()), []))

        async def session_open() -> bool:
            return sidecar.engine.live_sessions > 0

        await eventually(session_open, "the sidecar did not open the session")
        consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(consumer, 10)  # a leak hangs here: fail instead
        await assert_released(backend, sidecar.address)


@pytest.mark.parametrize("how", ["call.cancel", "task.cancel"])
async def test_caller_cancelling_mid_stream_closes_both_sides(sidecar, scripted, how):
    backend, address = scripted
    async with guarded_stub(sidecar.address, address) as (stub, _):
        call = stub(long_safe_request())
        got: list[dict] = []
        consumer = asyncio.create_task(read_all(call, got))

        async def streaming() -> bool:
            return len(got) >= 3

        await eventually(streaming, "no messages were released")
        assert call.cancel() if how == "call.cancel" else consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(consumer, 10)  # a leak hangs here: fail instead
        await assert_released(backend, sidecar.address)


@pytest.mark.parametrize("how", ["call.cancel", "task.cancel"])
async def test_caller_cancelling_after_the_interrupt_closes_both_sides(sidecar, scripted, how):
    backend, address = scripted
    request = {"prompt": UNSAFE.prompt, "pieces": pieces(UNSAFE.response, 4) + ["x"] * 1000}
    async with guarded_stub(sidecar.address, address) as (stub, _):
        call = stub(request)
        stopped_seen = asyncio.Event()

        async def consume() -> None:
            async for message in call:
                if message.get("stopped"):
                    stopped_seen.set()
                    if how == "task.cancel":  # cancelled as the stop arrives: it lands in the cleanup
                        asyncio.current_task().cancel()
                    else:
                        await asyncio.Event().wait()  # holds the stream open until the caller cancels

        consumer = asyncio.create_task(consume())
        await asyncio.wait_for(stopped_seen.wait(), 30)
        if how == "call.cancel":
            call.cancel()
            consumer.cancel()
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(consumer, 10)  # a leak hangs here: fail instead
        await assert_released(backend, sidecar.address)


async def test_blocked_prompt_cancels_the_backend_and_closes_the_session(sidecar, scripted):
    backend, address = scripted
    request = {"prompt": UNSAFE_PROMPT.prompt, "pieces": pieces(SAFE.response) * 60}
    async with guarded_stub(sidecar.address, address, block_unsafe_prompts=True) as (stub, _):
        got = [message async for message in stub(request)]
        assert len(got) == 1 and got[0]["stopped"] and got[0]["category"] == UNSAFE_PROMPT.prompt_category
        await assert_released(backend, sidecar.address)


async def backend_started(backend: ScriptedTextBackend) -> None:
    async def started() -> bool:
        return backend.log.sent > 0

    await eventually(started, "the backend call did not start")


async def test_sidecar_going_away_at_open_cancels_the_backend_and_fails_unavailable(sidecar, scripted):
    backend, address = scripted
    port = int(sidecar.address.rsplit(":", 1)[1])
    async with TcpProxy(port, blackhole=True) as proxy, guarded_stub(proxy.address, address) as (stub, _):
        failing = asyncio.create_task(read_all(stub(long_safe_request()), []))
        await asyncio.wait_for(proxy.connected.wait(), 10)
        await backend_started(backend)  # so that the cancel, not a call never made, is what the backend sees
        proxy.drop()  # the sidecar's connection goes away before the handshake completes
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await asyncio.wait_for(failing, 30)
        assert failed.value.code() == grpc.StatusCode.UNAVAILABLE
        assert failed.value.details().startswith("guard sidecar: UNAVAILABLE")
        await assert_released(backend, sidecar.address)


async def test_sidecar_rejecting_the_open_cancels_the_backend_and_passes_its_status(sidecar, scripted):
    backend, address = scripted
    port = int(sidecar.address.rsplit(":", 1)[1])
    async with TcpProxy(port) as proxy, guarded_stub(proxy.address, address, debounce=65) as (stub, sidecar_channel):
        await SidecarClient(sidecar_channel, timeout=10).info()
        proxy.flowing.clear()  # the rejection waits in the proxy until the backend call has started
        failing = asyncio.create_task(read_all(stub(long_safe_request()), []))  # the sidecar allows debounce <= 64
        await backend_started(backend)
        proxy.flowing.set()
        with pytest.raises(grpc.aio.AioRpcError) as failed:
            await asyncio.wait_for(failing, 30)
        assert failed.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        details = failed.value.details()
        assert details.startswith("guard sidecar: INVALID_ARGUMENT") and "debounce" in details
        await assert_released(backend, sidecar.address)
