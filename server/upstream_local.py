"""The Reasoner's local backend as an upstream: a transformers causal LM in this process, the one
backend that can steer (the SAE's hook sits on its decoder layer).

It speaks the ``server.upstream.Upstream`` interface, so the Reasoner drives it exactly like the
vLLM adapters: ``generate`` yields one delta per token; ``abort`` asks the decode loop to stop
(it ends by itself with finish reason "abort"); closing the generator stops it too. Stop strings
behave as in vLLM (``guard.text.stop_strings``). A thinking budget is applied inside the decode
loop (``close_thinking``): the closing ids are written into the response in the same pass, so the
KV cache, the sampler and the steering positions carry on unchanged.

The decode loop runs on a worker thread; one generation runs at a time (a steering hook is
attached to the model itself, so two generations must not share it), and at most ``max_waiting``
more wait their turn (RESOURCE_EXHAUSTED beyond). The turn passes on only when the worker thread
has finished, however the consumer went away.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Sequence
from typing import Any

from guard.errors import LimitExceeded
from guard.reasoning.thinking import BudgetCloser, PhaseTracker
from guard.session.release import IncrementalDetokenizer
from guard.text.stop_strings import StopStrings
from server.upstream import Sampling, UpstreamDelta, UpstreamPrompt

_DONE = object()


class LocalUpstream:
    name = "local"
    can_steer = True
    closes_thinking = True  # takes ``close_thinking``: the budget is applied in the decode loop

    def __init__(self, lm: Any, *, layer: int | None = None, limits: Any = None, max_waiting: int = 8) -> None:
        """``layer``: the SAE's decoder layer (where steers act); ``limits``: the steering bounds."""
        self.lm = lm  # guard.reasoning.local_lm.LocalCausalLM
        self.tokenizer = lm.tokenizer
        self.layer, self.limits = layer, limits
        self.max_waiting = max_waiting
        self._turn = asyncio.Lock()
        self._waiting = 0
        self._stops: dict[str, threading.Event] = {}

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
        close_thinking: PhaseTracker | None = None,
    ) -> AsyncIterator[UpstreamDelta]:
        """``close_thinking``: a tracker in the state the prompt leaves (its budget set); the
        closing ids go in when the budget is spent."""
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
        try:
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue = asyncio.Queue()  # bounded by sampling.max_tokens (one item per token)
            stop = threading.Event()
            self._stops[request_id] = stop
            worker = asyncio.ensure_future(asyncio.to_thread(self._run, prompt, sampling, steers, triggered,
                                                             close_thinking, stop, loop, queue))  # fmt: skip
        except BaseException:
            self._turn.release()
            raise
        worker.add_done_callback(lambda _: self._turn.release())  # only once the thread is done
        stop_ids = tuple(self.lm.stop_ids)
        detokenizer = IncrementalDetokenizer(self.tokenizer)
        stops = StopStrings(sampling.stop)

        def tail() -> str:  # the end: what the detokenizer and the stop strings still hold
            text = stops.push(detokenizer.flush())
            return text if stops.stopped else text + stops.flush()

        try:
            while True:
                item = await queue.get()
                if item is _DONE:
                    break
                if isinstance(item, Exception):
                    raise item
                text = stops.push(detokenizer.push([item]))
                if stops.stopped or item in stop_ids:
                    stop.set()
                    yield UpstreamDelta([item], text if stops.stopped else text + tail(), "stop")
                    return
                yield UpstreamDelta([item], text, None)
            yield UpstreamDelta([], tail(), "abort" if stop.is_set() else "length")
        finally:
            stop.set()
            self._stops.pop(request_id, None)
            await asyncio.shield(asyncio.gather(worker, return_exceptions=True))

    def _run(self, prompt, sampling, steers, triggered, close_thinking, stop, loop, queue) -> None:
        """The decode loop (worker thread): every token onto the loop's queue, then _DONE or the error."""
        closer = BudgetCloser(close_thinking) if close_thinking is not None else None
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
                stop_ids=tuple(self.lm.stop_ids),
                should_stop=stop.is_set,
                inject=closer.inject if closer is not None else None,
            ):
                if closer is not None:
                    closer.observe(token)
                loop.call_soon_threadsafe(queue.put_nowait, token)
            loop.call_soon_threadsafe(queue.put_nowait, _DONE)
        except Exception as exc:  # the worker never dies silently: the stream gets the error
            loop.call_soon_threadsafe(queue.put_nowait, exc)
