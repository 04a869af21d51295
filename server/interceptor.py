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
"""

from __future__ import annotations

import asyncio
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
        call = await continuation(client_call_details, request)
        if not self._guarded(client_call_details):
            return call
        return self._guard(call, request, client_call_details)

    async def intercept_stream_stream(self, continuation, client_call_details, request_iterator):
        if not self._guarded(client_call_details):
            return await continuation(client_call_details, request_iterator)
        first, requests = await _peek(request_iterator)  # the conversation comes from the first request
        call = await continuation(client_call_details, requests)
        return self._guard(call, first, client_call_details)

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
        )
        if self._conversation is not None:
            fields["messages"] = list(self._conversation(request))
        else:
            fields["prompt_token_ids"] = list(self._prompt_ids(request))
        return open_request(**fields)

    async def _guard(self, call, request: Any, details) -> AsyncIterator[Any]:
        """The caller's response stream: upstream messages, released per the sidecar's verdicts."""
        moderation = self._stub.Moderate()
        events: asyncio.Queue[tuple[str, Any]] = asyncio.Queue()
        tasks: list[asyncio.Task] = []

        async def pump_upstream() -> None:
            try:
                async for message in call:
                    await events.put(("upstream", message))
                await events.put(("upstream_end", None))
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                await events.put(("upstream_error", exc))

        async def pump_sidecar() -> None:
            try:
                while (response := await moderation.read()) is not grpc.aio.EOF:
                    await events.put(("guard", response))
                await events.put(("guard_error", RuntimeError("the sidecar ended the stream without `final`")))
            except asyncio.CancelledError:
                raise
            except BaseException as exc:
                await events.put(("guard_error", exc))

        pending: deque[tuple[Any, int]] = deque()  # (message, cumulative end offset)
        offset = 0
        released = 0
        text_mode: bool | None = None

        def releasable() -> list[Any]:
            out = []
            while pending and pending[0][1] <= released:
                out.append(pending.popleft()[0])
            return out

        async def send(message: pb.ModerateRequest | None) -> None:
            """Write (None: done writing) unless the sidecar has ended the stream: an interrupt ends
            it while upstream messages may still be queued here. Its responses, read by
            pump_sidecar (the interrupt, or the error status), decide what happens next."""
            try:
                await (moderation.done_writing() if message is None else moderation.write(message))
            except (grpc.aio.AioRpcError, asyncio.InvalidStateError):
                if not moderation.done():
                    raise

        try:
            await moderation.write(self._open(request, details))
            tasks = [asyncio.create_task(pump_sidecar())]
            started = False
            while True:
                kind, value = await events.get()
                if kind == "guard" and value.WhichOneof("kind") == "prompt":
                    prompt = value.prompt
                    if self._block_prompts and prompt.verdict.action == pb.BLOCK:
                        call.cancel()
                        yield self._make_stopped(
                            StopInfo(
                                f"prompt blocked ({prompt.verdict.category or prompt.verdict.risk_label})",
                                prompt.verdict.category,
                                None,
                                0,
                                0,
                                "prompt",
                            )
                        )
                        return
                    if not started:
                        started = True
                        tasks.append(asyncio.create_task(pump_upstream()))
                    continue
                if kind == "upstream":
                    payload = self._extract(value)
                    if payload is None or len(payload) == 0:
                        end = offset
                    else:
                        is_text = isinstance(payload, str)
                        if text_mode is None:
                            text_mode = is_text
                        elif text_mode != is_text:
                            raise ValueError("`extract` returned text for some messages and token ids for others")
                        chunk = pb.ChunkRequest(text=payload) if is_text else pb.ChunkRequest(token_ids=list(payload))
                        await send(pb.ModerateRequest(chunk=chunk))
                        end = offset + len(payload)
                    offset = end
                    if self._mode == pb.OPTIMISTIC:
                        yield value
                    else:
                        pending.append((value, end))
                        for message in releasable():
                            yield message
                elif kind == "upstream_end":
                    await send(pb.ModerateRequest(close=pb.CloseRequest()))
                    await send(None)
                elif kind in ("upstream_error", "guard_error"):
                    raise value
                elif kind == "guard":
                    which = value.WhichOneof("kind")
                    result = value.chunk if which == "chunk" else value.final
                    released = result.released_chars if text_mode else result.released
                    if result.action == pb.INTERRUPT:
                        call.cancel()
                        for message in releasable():
                            yield message
                        log.info(
                            "event=interrupted category=%s index=%s",
                            getattr(result, "category", ""),
                            result.first_unsafe_index if result.HasField("first_unsafe_index") else None,
                        )
                        yield self._make_stopped(self._stop_info(value))
                        return
                    if which == "final":
                        released = offset  # the response completed without an interrupt
                        for message in releasable():
                            yield message
                        return
                    for message in releasable():
                        yield message
        finally:
            for task in tasks:
                task.cancel()
            moderation.cancel()

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
