"""`qwen3guard.v1.GuardedGeneration`: the sidecar generates through the upstream vLLM itself,
moderates each token delta as it arrives (the StreamGuard session machinery), streams back only
what is released, and on INTERRUPT closes the upstream request so no more tokens are spent.

The prompt is checked first: a BLOCK action ends the stream before any generation.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator

import grpc

from guard.conversation import RenderedPrompt, parse_messages
from guard.errors import EngineError, InvalidInput
from guard.moderation import ModeratedStream
from guard.release import ReleaseTracker
from server.qwen3guard.v1 import guard_pb2 as pb
from server.qwen3guard.v1 import guard_pb2_grpc as pb_grpc
from server.stream_guard import ModelFailure, StreamGuardService, _StreamState, _Unavailable, status_of
from server.upstream import Sampling, Upstream, UpstreamError

log = logging.getLogger(__name__)

MAX_TOKENS = 4096


class GuardedGenerationService(pb_grpc.GuardedGenerationServicer):
    def __init__(self, guard: StreamGuardService, upstream: Upstream | None) -> None:
        self.guard = guard  # shares the policies, metrics, release and fail-mode logic of StreamGuard
        self.upstream = upstream

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        stream: ModeratedStream | None = None
        code = grpc.StatusCode.OK
        try:
            runtime = self.guard.holder.ready()
            if self.upstream is None:
                raise _Unavailable("no upstream engine is configured (guard serve --upstream-url)")
            sampling = self._sampling(request.sampling)
            policy = self.guard.policies.get(request.domain)
            rendered = self._rendered(runtime, request)
            stream = runtime.moderator.open(
                prompt_ids=rendered.prompt_ids, preamble_ids=rendered.preamble_ids, policy=policy
            )
            request_id = request.request_id or uuid.uuid4().hex
            state = _StreamState()
            prompt = (await self.guard._prompt_response(stream, policy, state)).prompt
            yield pb.GenerateResponse(
                start=pb.GenerationStart(
                    prompt=prompt, upstream=self.upstream.name, input_path="token_ids", upstream_request_id=request_id
                )
            )
            if prompt.verdict.action == pb.BLOCK:
                reason = prompt.reason or f"prompt blocked by the {policy.name} policy ({prompt.verdict.category})"
                yield pb.GenerateResponse(end=pb.GenerationEnd(finish_reason="blocked", stopped=True, reason=reason))
                return
            opened = pb.OpenRequest(release_mode=request.release_mode)
            release = ReleaseTracker(
                self.guard._release_mode(opened, policy), runtime.tokenizer.hf, policy.redact_marker
            )
            async for response in self._generate(stream, policy, release, state, request_id, rendered, sampling):
                yield response
        except _Unavailable as exc:
            code = grpc.StatusCode.UNAVAILABLE
            await context.abort(code, str(exc))
        except UpstreamError as exc:
            code = grpc.StatusCode.UNAVAILABLE
            await context.abort(code, f"upstream: {exc}")
        except EngineError as exc:
            code = status_of(exc)
            await context.abort(code, str(exc))
        finally:
            if stream is not None:
                stream.close("ended" if code == grpc.StatusCode.OK else f"ended: {code.name}")

    async def _generate(
        self,
        stream,
        policy,
        release: ReleaseTracker,
        state: _StreamState,
        request_id: str,
        rendered: RenderedPrompt,
        sampling: Sampling,
    ) -> AsyncIterator[pb.GenerateResponse]:
        generated = judged = 0
        flag_at_generated: int | None = None
        finish_reason = None
        released_before = 0
        upstream = self.upstream.generate(request_id, [*rendered.prompt_ids, *rendered.preamble_ids], sampling)
        try:
            async for delta in upstream:
                generated += len(delta.token_ids)
                finish_reason = delta.finish_reason or finish_reason
                if not delta.token_ids:
                    continue
                release.receive(delta.token_ids)
                if state.degraded:
                    response = self.guard._unjudged_response(release, judged)
                else:
                    try:
                        chunk = await self.guard._await_verdict(stream.feed_ids(delta.token_ids), policy)
                    except ModelFailure as failure:
                        response = self.guard._fail(policy, str(failure), release, judged, state)
                    else:
                        judged = chunk.tokens[-1].index + 1 if chunk.tokens else judged
                        response = self.guard._chunk_response(chunk, release, judged, False)
                verdict = response.chunk
                ids = release.released_ids(released_before)
                released_before = release.released
                yield pb.GenerateResponse(
                    chunk=pb.GenerationChunk(token_ids=ids, text=verdict.released_text, verdict=verdict)
                )
                if verdict.action == pb.INTERRUPT:
                    flag_at_generated = generated
                    break
        finally:
            await upstream.aclose()  # closes the HTTP stream: vLLM aborts the request
        if flag_at_generated is not None:
            index = stream.flag_index
            category = stream.flag_category or ""
            reason = verdict.reason or f"interrupted at response token {index} ({category or 'unsafe'})"
            self.guard.metrics.interrupts.labels(category).inc()
            end = pb.GenerationEnd(
                finish_reason="interrupted",
                stopped=True,
                reason=reason,
                category=category,
                released_tokens=release.released,
                generated_tokens=generated,
                tokens_after_interrupt=generated - (index + 1 if index is not None else generated),
            )
            if index is not None:
                end.offset = index
            log.info("event=generation_interrupted request_id=%s offset=%s generated=%d", request_id, index, generated)
            yield pb.GenerateResponse(end=end)
            return
        tail = release.finish(interrupted=False)
        ids = release.released_ids(released_before)
        if ids or tail:
            yield pb.GenerateResponse(chunk=pb.GenerationChunk(token_ids=ids, text=tail))
        yield pb.GenerateResponse(
            end=pb.GenerationEnd(
                finish_reason=finish_reason or "stop",
                released_tokens=release.released,
                generated_tokens=generated,
                reason="completed",
            )
        )

    @staticmethod
    def _sampling(params: pb.SamplingParams) -> Sampling:
        if params.max_tokens > MAX_TOKENS:
            raise InvalidInput(f"sampling.max_tokens must be <= {MAX_TOKENS}, got {params.max_tokens}")
        if params.temperature < 0:
            raise InvalidInput(f"sampling.temperature must be >= 0, got {params.temperature}")
        return Sampling(
            temperature=params.temperature,
            top_p=params.top_p or None,
            max_tokens=params.max_tokens or 256,
            seed=params.seed if params.HasField("seed") else None,
            stop=tuple(params.stop),
        )

    @staticmethod
    def _rendered(runtime, request: pb.GenerateRequest) -> RenderedPrompt:
        if request.messages and request.prompt_token_ids:
            raise InvalidInput("give `messages` or `prompt_token_ids`, not both")
        if request.messages:
            messages = parse_messages([{"role": m.role, "content": m.content} for m in request.messages])
            return runtime.tokenizer.render_prompt(messages)
        ids = list(request.prompt_token_ids)
        if not ids:
            raise InvalidInput("the conversation is empty; give `messages` or `prompt_token_ids`")
        im_end = runtime.tokenizer.im_end_id
        if im_end not in ids:
            raise InvalidInput(f"`prompt_token_ids` must contain the <|im_end|> (id {im_end}) closing the user turn")
        last = len(ids) - 1 - ids[::-1].index(im_end)
        return RenderedPrompt(tuple(ids[: last + 1]), tuple(ids[last + 1 :]))
