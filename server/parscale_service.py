"""`qwen3guard.parscale.v1.ParScale`: ParScale checkpoints served batched and KV-cached.

``Generate`` is GuardedGeneration's code (the same class, its own instance) driving the ParScale
engine as its upstream: prompt judged first, the output through a StreamGuard session under the
domain's policy, an interrupt stopping the generation. ``Score`` feeds prompt and continuation in
one pass and returns each continuation token's log-probability; ``Info`` describes the model.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from dataclasses import dataclass
from typing import Any

import grpc

from guard.errors import InvalidInput
from guard.parscale.engine import ParScaleEngine
from server.guarded_generation import GuardedGenerationService
from server.qwen3guard.parscale.v1 import parscale_pb2 as pb
from server.qwen3guard.parscale.v1 import parscale_pb2_grpc as pb_grpc
from server.retrieval_calls import ModelHolder, NotLoaded, unary
from server.stream_guard import StreamGuardService
from server.upstream_parscale import ParScaleUpstream


@dataclass
class ParScaleModel:
    engine: ParScaleEngine
    tokenizer: Any
    name: str
    device: str
    dtype: str

    @property
    def demo(self) -> dict | None:
        return self.engine.model.config.demo


class ParScaleHolder(ModelHolder[ParScaleModel]):
    def __init__(self) -> None:
        super().__init__("ParScale")


class ParScaleService(pb_grpc.ParScaleServicer):
    def __init__(self, holder: ParScaleHolder, guard: StreamGuardService) -> None:
        self.holder = holder
        self.generation = GuardedGenerationService(guard, None, front_end="parscale")  # its upstream: set on load
        self.metrics = guard.metrics

    def attach(self, model: ParScaleModel) -> None:
        self.holder.model = model
        self.generation.upstream = ParScaleUpstream(model.engine, model.tokenizer)

    async def Generate(self, request, context: grpc.aio.ServicerContext):
        try:
            self.holder.get()
        except NotLoaded as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        async for response in self.generation.Generate(request, context):
            yield response

    async def Score(self, request: pb.ScoreRequest, context: grpc.aio.ServicerContext) -> pb.ScoreResponse:
        return await unary(lambda: self._score(request), context)

    async def _score(self, request: pb.ScoreRequest) -> pb.ScoreResponse:
        received = time.perf_counter()
        model = self.holder.get()
        prompt, continuation = self._score_ids(model, request)
        engine = model.engine
        sequence = [*prompt, *continuation]
        if len(sequence) > engine.max_tokens:
            raise InvalidInput(f"prompt and continuation have {len(sequence)} tokens; at most {engine.max_tokens}")
        # position k predicts token k + 1: the continuation is predicted from len(prompt) - 1 on
        targets = [sequence[k + 1] if k + 1 >= len(prompt) else None for k in range(len(sequence) - 1)]
        feed = sequence[:-1]
        scores, greedy = [], []
        handle = engine.open()
        try:
            size = engine.limits.max_step_tokens
            for start in range(0, len(feed), size):
                chunk_targets = targets[start : start + size]
                step = handle.step(feed[start : start + size], targets=chunk_targets)
                out = (await asyncio.wrap_future(step)).value
                scores += out.logprobs
                greedy += out.greedy
        finally:
            handle.close()
        self.metrics.parscale_tokens.labels("scored").inc(len(continuation))
        return pb.ScoreResponse(
            tokens=[
                pb.TokenScore(token_id=t, logprob=s, greedy=g)
                for t, s, g in zip(continuation, scores, greedy, strict=True)
            ],
            total_logprob=sum(scores),
            prompt_tokens=len(prompt),
            request_id=request.request_id or uuid.uuid4().hex,
            total_ms=(time.perf_counter() - received) * 1e3,
        )

    @staticmethod
    def _score_ids(model: ParScaleModel, request: pb.ScoreRequest) -> tuple[list[int], list[int]]:
        as_ids = bool(request.prompt_token_ids or request.continuation_token_ids)
        as_text = bool(request.prompt_text or request.continuation_text)
        if as_ids and as_text:
            raise InvalidInput("give token ids or text, not both")
        if as_text:
            encode = lambda text: list(model.tokenizer.encode(text, add_special_tokens=False))  # noqa: E731
            prompt, continuation = encode(request.prompt_text), encode(request.continuation_text)
        else:
            prompt, continuation = list(request.prompt_token_ids), list(request.continuation_token_ids)
        if not prompt or not continuation:
            raise InvalidInput("Score needs a non-empty prompt and a non-empty continuation")
        vocab = model.engine.vocab
        if any(t >= vocab for t in (*prompt, *continuation)):
            raise InvalidInput(f"token ids must be in [0, {vocab})")
        return prompt, continuation

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        async def call() -> pb.InfoResponse:
            model = self.holder.get()
            engine = model.engine
            config = engine.model.config
            itemsize = engine.model.model.embed_tokens.weight.element_size()
            per_position = config.kv_bytes_per_token(itemsize)
            return pb.InfoResponse(
                model=model.name,
                parscale_n=config.parscale_n,
                prefix_tokens=config.prefix_tokens,
                smoothing=config.smoothing,
                kv_bytes_per_token=per_position,
                kv_bytes_prefix=per_position * config.prefix_tokens,
                max_requests=engine.limits.max_requests,
                max_tokens_per_request=engine.max_tokens,
                max_step_tokens=engine.limits.max_step_tokens,
                dtype=model.dtype,
                device=model.device,
                vocab_size=config.shape.vocab_size,
                demo=bool(model.demo),
                notice=(model.demo or {}).get("notice", ""),
            )

        return await unary(call, context)
