"""What the Embedder and Reranker servicers share: awaiting a request's sequences in the shared
batcher (withdrawn when the call goes away), the timing metadata, streams that pipeline their
requests, and the truncation enum of both protos."""

from __future__ import annotations

import asyncio
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Any, Generic, TypeVar

import grpc

from guard.batcher import Batched
from guard.errors import EngineError, InvalidInput
from guard.retrieval.inputs import Truncation
from server.metrics import Metrics
from server.wire import status_of

T = TypeVar("T")
R = TypeVar("R")

# Both protos number their Truncation values the same way.
TRUNCATION = {0: Truncation.NONE, 1: Truncation.RIGHT, 2: Truncation.LEFT}
MAX_IN_FLIGHT = 16  # requests of one stream computed at once (the next are read meanwhile)


def truncation(value: int) -> Truncation:
    if value not in TRUNCATION:
        raise InvalidInput(f"`truncation` {value} is not a known value")
    return TRUNCATION[value]


class NotLoaded(Exception):
    """The service's model is still loading (UNAVAILABLE)."""


M = TypeVar("M")


class ModelHolder(Generic[M]):
    """A service's model, set by its load step; calls before that are UNAVAILABLE."""

    def __init__(self, what: str) -> None:
        self.what = what
        self.model: M | None = None

    @property
    def backend(self) -> str:
        return getattr(self.model, "backend", "local")

    def get(self) -> M:
        if self.model is None:
            raise NotLoaded(f"the {self.what} model is still loading")
        return self.model


class RequestCounters:
    """A retrieval service's per-request metrics (label children resolved once)."""

    def __init__(self, metrics: Metrics, service: str) -> None:
        self._inputs = metrics.retrieval_inputs.labels(service)
        self._tokens = metrics.retrieval_tokens.labels(service)
        self._queue = metrics.retrieval_queue_seconds.labels(service)

    def record(self, sequences: list[list[int]], timing: Timing) -> int:
        """Count one answered request; returns its tokens."""
        tokens = sum(len(s) for s in sequences)
        self._inputs.inc(len(sequences))
        self._tokens.inc(tokens)
        self._queue.observe(timing.queue_ms / 1e3)
        return tokens


@dataclass(frozen=True)
class Timing:
    queue_ms: float
    inference_ms: float
    batch_size: int


async def gather(futures: list[Future[Batched[R]]]) -> tuple[list[R], Timing]:
    """Every result, in order. If the call is cancelled, its sequences still queued leave the
    batcher (a started batch finishes; its results are dropped)."""
    waiting = [asyncio.wrap_future(f) for f in futures]
    try:
        done: list[Batched[R]] = await asyncio.gather(*waiting)
    except BaseException:
        for f in futures:
            f.cancel()  # queued ones are withdrawn; running or finished ones are unaffected
        raise
    timing = Timing(
        queue_ms=max(b.queue_s for b in done) * 1e3,
        inference_ms=max(b.compute_s for b in done) * 1e3,
        batch_size=max(b.batch_size for b in done),
    )
    return [b.value for b in done], timing


def elapsed_ms(received: float) -> float:
    return (time.perf_counter() - received) * 1e3


async def unary(call: Callable[[], Awaitable[T]], context: grpc.aio.ServicerContext) -> T:
    """One unary call with the service's errors as statuses."""
    try:
        return await call()
    except EngineError as exc:
        await context.abort(status_of(exc), str(exc))
    except NotLoaded as exc:
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
    raise AssertionError("unreachable: abort raises")


async def pipelined(
    requests: AsyncIterator[Any],
    handle: Callable[[Any], Awaitable[T]],
    context: grpc.aio.ServicerContext,
) -> AsyncIterator[T]:
    """Answer a request stream in order while up to ``MAX_IN_FLIGHT`` of its requests are being
    computed (so one stream fills batches too). A bad request ends the stream with its status,
    naming its position; pending work is cancelled, never left running."""
    pending: deque[tuple[int, asyncio.Task[T]]] = deque()
    received = 0
    try:
        async for request in requests:
            pending.append((received, asyncio.create_task(handle(request))))
            received += 1
            while len(pending) >= MAX_IN_FLIGHT or (pending and pending[0][1].done()):
                yield await _result(*pending.popleft(), context)
        while pending:
            yield await _result(*pending.popleft(), context)
    finally:
        for _, task in pending:
            task.cancel()
        if pending:
            await asyncio.gather(*(task for _, task in pending), return_exceptions=True)


async def _result(position: int, task: asyncio.Task[T], context: grpc.aio.ServicerContext) -> T:
    try:
        return await task
    except EngineError as exc:
        await context.abort(status_of(exc), f"request {position} of the stream: {exc}")
    except NotLoaded as exc:
        await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
    raise AssertionError("unreachable: abort raises")
