"""Gateway-side grpc.aio client interceptor: moderate any streaming LLM backend through the sidecar.

A Python LLM gateway installs it on its channel to the backend. For each guarded streaming call
it opens a Moderate stream to the sidecar, forwards every response message's tokens (or text),
releases messages to the caller according to the release mode, and on INTERRUPT cancels the
upstream call and ends the caller's stream with the gateway's "stopped" message.

The gateway supplies the glue, because only it knows its message types:

    interceptor = GuardInterceptor(
        sidecar_channel,
        conversation=lambda request: [{"role": "user", "content": request.prompt}],
        extract=lambda response: response.text,          # str (text) or list[int] (token ids) or None
        make_stopped=lambda stop: MyResponse(text="", stopped=True, reason=stop.reason),
    )
    backend = grpc.aio.insecure_channel("llm:9000", interceptors=interceptor.interceptors())

Cleanup is explicit: every way a guarded call ends (the response's end, an interrupt, a blocked
prompt, the sidecar unavailable or failing, the caller's ``call.cancel()`` or its task cancelled
mid-read) cancels the backend call and the Moderate stream and awaits the pump tasks. Every queue
is bounded (see MAX_IN_FLIGHT_CHUNKS and the sizes below it).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
from collections import deque
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import grpc

from server.client import open_request
from server.qwen3guard.v1 import guard_pb2 as pb
from server.qwen3guard.v1 import guard_pb2_grpc as pb_grpc

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StopInfo:
    """Why the stream was stopped; given to ``make_stopped``."""

    reason: str
    category: str
    first_unsafe_index: int | None  # response token at which the rule fired
    released_tokens: int
    released_chars: int
    stage: str  # "response", or "prompt" when a prompt was blocked


Payload = str | Sequence[int] | None


async def _peek(requests: Any) -> tuple[Any, Any]:
    """First request of a sync or async request iterator, and an iterator over all of them."""
    if hasattr(requests, "__aiter__"):
        iterator = aiter(requests)
        first = await anext(iterator)

        async def chained():
            yield first
            async for item in iterator:
                yield item

        return first, chained()
    iterator = iter(requests)
    first = next(iterator)
    return first, itertools.chain([first], iterator)


# Bounds. Every queue and buffer of a guarded call has one; none grows with the response length.
MAX_IN_FLIGHT_CHUNKS = 32
"""Chunks sent to the sidecar whose verdict has not come back yet. The backend is read no faster
than the sidecar answers, so at most this many backend messages are queued here; HTTP/2 flow
control holds the rest at the backend."""

EVENT_QUEUE_SIZE = 2 * MAX_IN_FLIGHT_CHUNKS + 8
"""The guard loop's event queue. Both producers are credit-limited (backend messages by
MAX_IN_FLIGHT_CHUNKS; sidecar responses by one verdict per chunk, plus the prompt verdict, the
close verdict, the final message and an error), so a put never waits."""

MAX_HELD_MESSAGES = 1024
"""HOLD_BACK: backend messages held until the sidecar releases their tokens. The sidecar holds
back at most its debounce window (<= 64 tokens) beyond the verdicts, so reaching this means it
stopped releasing: the call fails with RESOURCE_EXHAUSTED rather than buffering without end."""


def _status_error(code: grpc.StatusCode, details: str) -> grpc.aio.AioRpcError:
    """The status the caller's call ends with when the guard (not the backend) ends it."""
    return grpc.aio.AioRpcError(code, grpc.aio.Metadata(), grpc.aio.Metadata(), details=details)


def _ended_by_failed_write(exc: BaseException) -> bool:
    """grpc.aio marks a stream INTERNAL when a write meets a stream the server has already ended,
    and the responses still unread (the interrupt and the final message) are lost with it. The
    sidecar ends a stream early only after an interrupt, so this ends the response, failing closed."""
    return isinstance(exc, grpc.aio.AioRpcError) and exc.code() == grpc.StatusCode.INTERNAL


def _sidecar_error(exc: BaseException) -> grpc.aio.AioRpcError:
    """A sidecar failure as the caller's status: the sidecar's code, details that say it was the guard."""
    if isinstance(exc, grpc.aio.AioRpcError):
        return _status_error(exc.code(), f"guard sidecar: {exc.code().name}: {exc.details()}")
    return _status_error(grpc.StatusCode.INTERNAL, f"guard sidecar: {exc}")


class _GuardedCall:
    """The caller's view of one guarded call: the backend's messages, released per the sidecar's verdicts.

    It owns the backend call, the Moderate stream to the sidecar and two pump tasks, and releases
    all of them explicitly on every way out: the end of the response, an interrupt, a blocked
    prompt, a failure of either side, the caller's ``cancel()``, or the caller's task being
    cancelled while it waits for a message. The backend call starts with the prompt check (its
    prefill overlaps the verdict) and is cancelled on every early exit.
    """

    def __init__(self, guard: GuardInterceptor, backend: Any, open_request: pb.ModerateRequest) -> None:
        self._guard = guard
        self._backend = backend
        self._open = open_request
        self._moderation: grpc.aio.StreamStreamCall | None = None
        # +1: the wake-up that cancel() leaves for a reader blocked in the loop.
        self._events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue(EVENT_QUEUE_SIZE + 1)
        self._credits = asyncio.Semaphore(MAX_IN_FLIGHT_CHUNKS)
        self._tasks: list[asyncio.Task] = []
        self._responses: AsyncIterator[Any] | None = None
        self._cancelled = False
        self._write_failed = False  # a write found the sidecar's side of the stream finished
        self._status: tuple[grpc.StatusCode, str] | None = None
        self._ended = asyncio.Event()
        self._callbacks: list[Callable[[Any], None]] = []

    # ------------------------------------------------------------------------ grpc.aio.Call

    def __aiter__(self) -> AsyncIterator[Any]:
        if self._responses is None:
            self._responses = self._run()
        return self._responses

    async def read(self) -> Any:
        try:
            return await anext(aiter(self))
        except StopAsyncIteration:
            return grpc.aio.EOF

    def cancel(self) -> bool:
        """Cancel the backend call, the Moderate stream and the pumps now; a later read raises CancelledError."""
        if self._ended.is_set():
            return False
        self._cancelled = True
        self._release()
        self._end(grpc.StatusCode.CANCELLED, "cancelled by the caller")
        with contextlib.suppress(asyncio.QueueFull):
            self._events.put_nowait(("cancelled", None))
        return True

    def cancelled(self) -> bool:
        return self._cancelled

    def done(self) -> bool:
        return self._ended.is_set()

    def add_done_callback(self, callback: Callable[[Any], None]) -> None:
        if self._ended.is_set():
            callback(self)
        else:
            self._callbacks.append(callback)

    def time_remaining(self) -> float | None:
        return self._backend.time_remaining()

    async def initial_metadata(self) -> grpc.aio.Metadata | None:
        return await self._backend.initial_metadata()

    async def trailing_metadata(self) -> grpc.aio.Metadata | None:
        return await self._backend.trailing_metadata()

    async def code(self) -> grpc.StatusCode:
        await self._ended.wait()
        assert self._status is not None
        return self._status[0]

    async def details(self) -> str:
        await self._ended.wait()
        assert self._status is not None
        return self._status[1]

    async def wait_for_connection(self) -> None:
        await self._backend.wait_for_connection()

    # ------------------------------------------------------------------------ lifecycle

    def _end(self, code: grpc.StatusCode, details: str) -> None:
        if self._ended.is_set():
            return
        self._status = (code, details)
        self._ended.set()
        callbacks, self._callbacks = self._callbacks, []
        for callback in callbacks:
            callback(self)

    def _spawn(self, coro: Any, name: str) -> None:
        self._tasks.append(asyncio.create_task(coro, name=f"guard-interceptor:{name}"))

    def _release(self) -> None:
        """Cancel whatever still runs: the backend call, the Moderate stream, the pumps. Idempotent."""
        if not self._backend.done():
            self._backend.cancel()
        if self._moderation is not None and not self._moderation.done():
            self._moderation.cancel()
        for task in self._tasks:
            task.cancel()

    async def _close(self) -> None:
        """Release everything, then await the pumps (cancelled ones finish at their next await)."""
        self._release()
        if self._tasks:
            await asyncio.wait(self._tasks)

    # ------------------------------------------------------------------------ pumps

    async def _pump_backend(self) -> None:
        """Backend messages into the loop, one credit each: never more than MAX_IN_FLIGHT_CHUNKS ahead."""
        try:
            messages = aiter(self._backend)
            while True:
                await self._credits.acquire()
                try:
                    message = await anext(messages)
                except StopAsyncIteration:
                    await self._events.put(("upstream_end", None))
                    return
                await self._events.put(("upstream", message))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._events.put(("upstream_error", exc))

    async def _pump_sidecar(self) -> None:
        """Sidecar responses into the loop, up to the final message (or the error that ended the stream)."""
        assert self._moderation is not None
        try:
            while (response := await self._moderation.read()) is not grpc.aio.EOF:
                await self._events.put(("guard", response))
                if response.WhichOneof("kind") == "final":
                    return
            await self._events.put(("guard_error", RuntimeError("the sidecar ended the stream without `final`")))
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            await self._events.put(("guard_error", exc))

    async def _next(self) -> tuple[str, Any]:
        """The next event; a failure of either side, or the caller's cancel(), is raised here."""
        kind, value = await self._events.get()
        if kind == "cancelled" or self._cancelled:
            raise asyncio.CancelledError
        if kind == "guard_error" and self._write_failed and _ended_by_failed_write(value):
            return "sidecar_ended", None
        if kind == "guard_error":
            code = value.code().name if isinstance(value, grpc.aio.AioRpcError) else "INTERNAL"
            log.warning("event=sidecar_failed code=%s", code)
            raise _sidecar_error(value)
        if kind == "upstream_error":
            raise value
        return kind, value

    async def _send(self, message: pb.ModerateRequest | None) -> None:
        """Write (None: done writing) unless the sidecar has ended the stream: an interrupt or an
        error status ends it while backend messages may still be queued here. pump_sidecar reads
        what ended it, and that decides what happens next."""
        assert self._moderation is not None
        try:
            await (self._moderation.done_writing() if message is None else self._moderation.write(message))
        except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
            self._write_failed = True
            if not self._moderation.done():
                raise

    # ------------------------------------------------------------------------ the guard loop

    async def _run(self) -> AsyncIterator[Any]:
        guard = self._guard
        try:
            if self._cancelled:
                raise asyncio.CancelledError
            self._moderation = guard._stub.Moderate()
            self._spawn(self._pump_sidecar(), "sidecar")
            await self._send(self._open)
            kind, value = await self._next()
            if kind != "guard" or value.WhichOneof("kind") != "prompt":
                raise _status_error(grpc.StatusCode.INTERNAL, f"guard sidecar: expected the prompt verdict, got {kind}")
            prompt = value.prompt
            if guard._block_prompts and prompt.verdict.action == pb.BLOCK:
                self._backend.cancel()
                yield guard._make_stopped(
                    StopInfo(
                        f"prompt blocked ({prompt.verdict.category or prompt.verdict.risk_label})",
                        prompt.verdict.category,
                        None,
                        0,
                        0,
                        "prompt",
                    )
                )
                self._end(grpc.StatusCode.OK, "")
                return
            self._spawn(self._pump_backend(), "backend")
            async with contextlib.aclosing(self._responses_after_prompt()) as responses:
                async for message in responses:
                    yield message
            self._end(grpc.StatusCode.OK, "")
        except asyncio.CancelledError:
            self._end(grpc.StatusCode.CANCELLED, "cancelled by the caller")
            raise
        except grpc.aio.AioRpcError as exc:
            self._end(exc.code(), exc.details() or "")
            raise
        except BaseException as exc:
            self._end(grpc.StatusCode.UNKNOWN, f"guard interceptor: {type(exc).__name__}")
            raise
        finally:
            await self._close()

    async def _responses_after_prompt(self) -> AsyncIterator[Any]:
        """Backend messages, chunked to the sidecar and released per its verdicts, up to the end or an interrupt."""
        guard = self._guard
        pending: deque[tuple[Any, int]] = deque()  # (message, cumulative end offset); MAX_HELD_MESSAGES
        offset = 0
        released = 0
        text_mode: bool | None = None

        def releasable() -> list[Any]:
            out = []
            while pending and pending[0][1] <= released:
                out.append(pending.popleft()[0])
            return out

        while True:
            kind, value = await self._next()
            if kind == "upstream":
                payload = guard._extract(value)
                if payload is None or len(payload) == 0:
                    self._credits.release()  # nothing sent: no verdict will return the credit
                    end = offset
                else:
                    is_text = isinstance(payload, str)
                    if text_mode is None:
                        text_mode = is_text
                    elif text_mode != is_text:
                        raise ValueError("`extract` returned text for some messages and token ids for others")
                    chunk = pb.ChunkRequest(text=payload) if is_text else pb.ChunkRequest(token_ids=list(payload))
                    await self._send(pb.ModerateRequest(chunk=chunk))
                    end = offset + len(payload)
                offset = end
                if guard._mode == pb.OPTIMISTIC:
                    yield value
                    continue
                if len(pending) >= MAX_HELD_MESSAGES:
                    raise _status_error(
                        grpc.StatusCode.RESOURCE_EXHAUSTED,
                        f"guard interceptor: {len(pending)} backend messages are held waiting for the sidecar "
                        f"to release them; at most {MAX_HELD_MESSAGES}",
                    )
                pending.append((value, end))
                for message in releasable():
                    yield message
            elif kind == "sidecar_ended":
                self._backend.cancel()
                log.info("event=interrupted category= index=None reason=sidecar_ended_stream")
                yield guard._make_stopped(
                    StopInfo(
                        "the sidecar ended the stream while chunks were in flight; failing closed",
                        "",
                        None,
                        released if not text_mode else 0,
                        released if text_mode else 0,
                        "response",
                    )
                )
                return
            elif kind == "upstream_end":
                await self._send(pb.ModerateRequest(close=pb.CloseRequest()))
                await self._send(None)
            elif kind == "guard":
                which = value.WhichOneof("kind")
                result = value.chunk if which == "chunk" else value.final
                if which == "chunk":
                    self._credits.release()  # one verdict per chunk sent
                released = result.released_chars if text_mode else result.released
                if result.action == pb.INTERRUPT:
                    self._backend.cancel()  # first: every message the backend makes now is waste
                    for message in releasable():
                        yield message
                    log.info(
                        "event=interrupted category=%s index=%s",
                        getattr(result, "category", ""),
                        result.first_unsafe_index if result.HasField("first_unsafe_index") else None,
                    )
                    yield guard._make_stopped(guard._stop_info(value))
                    return
                if which == "final":
                    released = offset  # the response completed without an interrupt
                    for message in releasable():
                        yield message
                    assert self._moderation is not None
                    await self._moderation.code()  # the sidecar's status, so closing cancels nothing there
                    return
                for message in releasable():
                    yield message


class _GuardedUnaryStreamCall(_GuardedCall, grpc.aio.UnaryStreamCall):
    """A guarded unary-stream call."""


class _GuardedStreamStreamCall(_GuardedCall, grpc.aio.StreamStreamCall):
    """A guarded stream-stream call; writes go to the backend (the sidecar sees only the first request)."""

    async def write(self, request: Any) -> None:
        await self._backend.write(request)

    async def done_writing(self) -> None:
        await self._backend.done_writing()


class _UnaryStream(grpc.aio.UnaryStreamClientInterceptor):
    def __init__(self, guard: GuardInterceptor) -> None:
        self.guard = guard

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        return await self.guard.intercept_unary_stream(continuation, client_call_details, request)


class _StreamStream(grpc.aio.StreamStreamClientInterceptor):
    def __init__(self, guard: GuardInterceptor) -> None:
        self.guard = guard

    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        return await self.guard.intercept_stream_stream(continuation, client_call_details, request_iterator)


class GuardInterceptor:
    """Install with ``grpc.aio.insecure_channel(target, interceptors=guard.interceptors())``.

    (grpc.aio files an interceptor object under one call type only, so the unary-stream and the
    stream-stream parts are separate objects sharing this configuration.)

    A guarded call is a grpc.aio call of its own: ``cancel()`` cancels the backend call and the
    sidecar stream at once, and a sidecar failure ends it with the sidecar's status code and
    details that start with "guard sidecar:".
    """

    def __init__(
        self,
        sidecar: grpc.aio.Channel,
        *,
        conversation: Callable[[Any], Sequence[Mapping[str, str]]] | None = None,
        prompt_token_ids: Callable[[Any], Sequence[int]] | None = None,
        extract: Callable[[Any], Payload],
        make_stopped: Callable[[StopInfo], Any],
        release_mode: int = pb.HOLD_BACK,
        domain: str = "",
        methods: Sequence[str] | None = None,
        block_unsafe_prompts: bool = False,
        debounce: int = 0,
        controversial: int = pb.STRICT,
    ) -> None:
        if (conversation is None) == (prompt_token_ids is None):
            raise ValueError("give exactly one of `conversation` or `prompt_token_ids`")
        self._stub = pb_grpc.StreamGuardStub(sidecar)
        self._conversation = conversation
        self._prompt_ids = prompt_token_ids
        self._extract = extract
        self._make_stopped = make_stopped
        self._mode = release_mode
        self._domain = domain
        self._methods = set(methods) if methods else None
        self._block_prompts = block_unsafe_prompts
        self._debounce = debounce
        self._controversial = controversial

    def interceptors(self) -> list[grpc.aio.ClientInterceptor]:
        return [_UnaryStream(self), _StreamStream(self)]

    def _guarded(self, details: grpc.aio.ClientCallDetails) -> bool:
        method = details.method.decode() if isinstance(details.method, bytes) else details.method
        return self._methods is None or method in self._methods

    async def intercept_unary_stream(self, continuation, client_call_details, request):
        if not self._guarded(client_call_details):
            return await continuation(client_call_details, request)
        open_request = self._open(request, client_call_details)  # before the backend call: it can raise
        call = await continuation(client_call_details, request)
        return _GuardedUnaryStreamCall(self, call, open_request)

    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        if not self._guarded(client_call_details):
            return await continuation(client_call_details, request_iterator)
        first, requests = await _peek(request_iterator)  # the conversation comes from the first request
        open_request = self._open(first, client_call_details)
        call = await continuation(client_call_details, requests)
        return _GuardedStreamStreamCall(self, call, open_request)

    def _open(self, request: Any, details: grpc.aio.ClientCallDetails) -> pb.ModerateRequest:
        request_id = ""
        for key, value in details.metadata or ():
            if key == "x-request-id":
                request_id = value
        fields: dict[str, Any] = dict(
            request_id=request_id,
            domain=self._domain,
            release_mode=self._mode,
            debounce=self._debounce,
            controversial=self._controversial,
            token_detail=pb.NOT_SAFE_TOKENS,  # only the flagged token's category is read from them
        )
        if self._conversation is not None:
            fields["messages"] = list(self._conversation(request))
        else:
            fields["prompt_token_ids"] = list(self._prompt_ids(request))
        return open_request(**fields)

    @staticmethod
    def _stop_info(response: pb.ModerateResponse) -> StopInfo:
        result = response.chunk if response.WhichOneof("kind") == "chunk" else response.final
        index = result.first_unsafe_index if result.HasField("first_unsafe_index") else None
        category = ""
        if response.WhichOneof("kind") == "final":
            category = result.category
        elif index is not None:
            category = next((t.verdict.category for t in result.tokens if t.index == index), "")
        return StopInfo(
            reason=f"interrupted at response token {index} ({category or 'unsafe'})",
            category=category,
            first_unsafe_index=index,
            released_tokens=result.released,
            released_chars=result.released_chars,
            stage="response",
        )
