"""The Reasoner's local backend as an upstream: a transformers causal LM in this process, the one
backend that can steer (the SAE's hook sits on its decoder layer).

It speaks the ``server.upstream.Upstream`` interface, so the Reasoner drives it exactly like the
vLLM adapters: ``generate`` yields one delta per token; ``abort`` asks the decode loop to stop
(it ends by itself with finish reason "abort"); closing the generator stops it too. The decode
loop runs on a worker thread; one generation runs at a time (a steering hook is attached to the
model itself, so two generations must not share it), and at most ``max_waiting`` more wait their
turn (RESOURCE_EXHAUSTED beyond).
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any

from guard.errors import LimitExceeded
from guard.session.release import IncrementalDetokenizer
from server.upstream import Sampling, UpstreamDelta, UpstreamPrompt

_DONE = object()


class LocalUpstream:
    name = "local"
    can_steer = True

    def __init__(self, lm: Any, *, layer: int | None = None, limits: Any = None, max_waiting: int = 8) -> None:
        """``layer``: the SAE's decoder layer (where steers act); ``limits``: the steering bounds."""
        self.lm = lm  # guard.reasoning.local_lm.LocalCausalLM
        self.tokenizer = lm.tokenizer
        self.layer, self.limits = layer, limits
        self.max_waiting = max_waiting
        self._turn = asyncio.Lock()
        self._waiting = 0
        self._stops: dict[str, threading.Event] = {}
        self.finish_reasons: dict[str, str] = {}

    async def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    async def abort(self, request_id: str) -> bool:
        stop = self._stops.get(request_id)
        if stop is None:
            return False
        stop.set()
        return True

    async def close(self) -> None:
        for stop in list(self._stops.values()):
            stop.set()

    async def generate(
        self,
        request_id: str,
        prompt: UpstreamPrompt,
        sampling: Sampling,
        *,
        steers: Sequence[Any] = (),
        triggered: Sequence[Any] = (),
    ) -> AsyncIterator[UpstreamDelta]:
        if not prompt.token_ids:
            raise ValueError("the local backend takes token ids")
        if self._waiting >= self.max_waiting:
            raise LimitExceeded(
                f"the local reasoner is busy: {self._waiting} generations waiting (max {self.max_waiting})"
            )
        self._waiting += 1
        try:
            await self._turn.acquire()
        finally:
            self._waiting -= 1
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()  # bounded by sampling.max_tokens (one item per token)
        stop = threading.Event()
        self._stops[request_id] = stop
        stop_ids = tuple(self.lm.stop_ids)
        detokenizer = IncrementalDetokenizer(self.tokenizer)

        def run() -> None:
            try:
                for token in self.lm.generate(
                    list(prompt.token_ids),
                    max_tokens=sampling.max_tokens,
                    temperature=sampling.temperature,
                    top_p=sampling.top_p,
                    seed=sampling.seed,
                    steers=steers,
                    triggered=triggered,
                    layer=self.layer if steers or triggered else None,
                    limits=self.limits,
                    stop_ids=stop_ids,
                    should_stop=stop.is_set,
                ):
                    loop.call_soon_threadsafe(queue.put_nowait, token)
                loop.call_soon_threadsafe(queue.put_nowait, _DONE)
            except Exception as exc:  # the worker never dies silently: the stream gets the error
                loop.call_soon_threadsafe(queue.put_nowait, exc)

        worker = asyncio.ensure_future(asyncio.to_thread(run))
        produced = 0
        last: int | None = None
        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                if isinstance(item, Exception):
                    raise item
                produced += 1
                last = item
                finish = None
                if last in stop_ids:
                    finish = "stop"
                yield UpstreamDelta([item], detokenizer.push([item]), finish)
            reason = "abort" if stop.is_set() else ("stop" if last in stop_ids else "length")
            self.finish_reasons[request_id] = reason
            if reason != "stop":
                yield UpstreamDelta([], "", reason)
        finally:
            stop.set()
            await asyncio.gather(worker, return_exceptions=True)
            self._stops.pop(request_id, None)
            self._turn.release()
