"""ParScale as an upstream of GuardedGeneration's machinery (``server.upstream.Upstream``): the
ParScale service's ``Generate`` is GuardedGeneration's code driving this adapter, so its output
is guarded, released and interrupted exactly like a vLLM upstream's.

One generation is one engine request: the prompt is fed once (in chunks of at most
``max_step_tokens``), then each sampled token; every step shares its forward pass with whatever
other requests step at the same time. ``abort`` ends a generation at its next token ("abort");
closing the stream frees the request's KV slots at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

from guard.errors import InvalidInput
from guard.parscale.engine import ParScaleEngine, StepOutput
from guard.sampling import Sampler
from guard.session.release import IncrementalDetokenizer
from guard.text.stop_strings import StopStrings
from server.upstream import Sampling, UpstreamDelta, UpstreamPrompt, prompt_ids_with


class ParScaleUpstream:
    name = "parscale"

    def __init__(self, engine: ParScaleEngine, tokenizer: Any) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        self._live: dict[str, list[_Generation]] = {}  # by the caller's request id (ids may repeat)
        self.finish_reasons: dict[str, str] = {}  # taken by the caller when its stream ends

    async def tokenize(self, text: str) -> list[int]:
        return list(self.tokenizer.encode(text, add_special_tokens=False))

    async def abort(self, request_id: str) -> bool:
        generations = self._live.get(request_id, [])
        for generation in generations:
            generation.aborted = True
        return bool(generations)

    async def close(self) -> None:
        for generations in self._live.values():
            for generation in generations:
                generation.aborted = True

    async def generate(
        self, request_id: str, prompt: UpstreamPrompt, sampling: Sampling
    ) -> AsyncIterator[UpstreamDelta]:
        ids = prompt_ids_with(self.tokenizer, prompt)
        limits, context = self.engine.limits, self.engine.max_tokens
        if len(ids) + sampling.max_tokens > context:
            raise InvalidInput(
                f"the prompt has {len(ids)} tokens and up to {sampling.max_tokens} may be generated "
                f"(sampling.max_tokens); together that exceeds ParScale's {context} tokens per request"
            )
        device = self.engine.model.model.embed_tokens.weight.device
        sample = Sampler.seeded(sampling.temperature, sampling.top_p, sampling.seed, device=device)
        stop_ids = set(self.engine.model.config.eos_token_ids)
        detokenizer, stops = IncrementalDetokenizer(self.tokenizer), StopStrings(sampling.stop)
        request = self.engine.open()
        generation = _Generation()
        self._live.setdefault(request_id, []).append(generation)
        try:
            size = limits.max_step_tokens
            for start in range(0, len(ids), size):  # the prompt, in chunks; the last one samples
                last = start + size >= len(ids)
                out = await _result(request.step(ids[start : start + size], sample=sample if last else None))
            for generated in range(1, sampling.max_tokens + 1):
                token = out.next_id
                text = stops.push(detokenizer.push([token]))
                finish = None
                if stops.stopped or token in stop_ids:
                    finish = "stop"
                elif generation.aborted:
                    finish = "abort"
                elif generated == sampling.max_tokens:
                    finish = "length"
                if finish is not None and not stops.stopped:
                    text += stops.push(detokenizer.flush())
                    text += "" if stops.stopped else stops.flush()
                if finish is not None:
                    self.finish_reasons[request_id] = finish
                yield UpstreamDelta([token], text, finish)
                if finish is not None:
                    return
                out = await _result(request.step([token], sample=sample))
        finally:
            request.close()
            generations = self._live.get(request_id, [])
            generations.remove(generation)
            if not generations:
                self._live.pop(request_id, None)


class _Generation:
    aborted = False


async def _result(future) -> StepOutput:
    """A step's output; cancelling the wait withdraws a step that has not started."""
    return (await asyncio.wrap_future(future)).value
