"""`qwen3guard.v1.GuardedGeneration`: the sidecar generates through the upstream vLLM itself,
moderates each delta as it arrives (the StreamGuard session machinery), streams back only what
is released, and on INTERRUPT closes the upstream request so no more tokens are spent.

The prompt is checked first: a BLOCK action ends the stream before any generation.

Input path, decided once per upstream by tokenizing a probe on both sides: when the upstream's
ids are Qwen3 ids, they are judged as they come ("token_ids"); otherwise the upstream renders the
conversation with its own template and its text deltas go through the guard's incremental
tokenizer ("text"). If the upstream fails midway, the domain's fail mode decides what of the
held-back part is released (open: the partial response, judged to its end; closed: nothing more),
and the stream ends with UNAVAILABLE.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from guard.conversation import RenderedPrompt, parse_messages
from guard.errors import EngineError, FailedPrecondition, InvalidInput
from guard.moderation import ModeratedStream
from guard.policy import FailMode, Policy
from guard.release import ReleaseTracker
from server.qwen3guard.v1 import guard_pb2 as pb
from server.qwen3guard.v1 import guard_pb2_grpc as pb_grpc
from server.stream_guard import ModelFailure, StreamGuardService, _StreamState, _Unavailable, status_of
from server.upstream import Sampling, Upstream, UpstreamError, UpstreamPrompt

log = logging.getLogger(__name__)

MAX_TOKENS = 4096
INPUT_PATHS = ("auto", "token_ids", "text")
# Special tokens, CJK, emoji, runs of spaces, tabs and code: tokenizers that agree on this agree.
TOKENIZER_PROBE = "<|im_start|>user\nHello, 世界! 🙂👍🏽  x += 1;\n\tdef f(a):  return a  # done<|im_end|>\n"


@dataclass
class _Progress:
    """Where one generation stands."""

    generated: int = 0  # upstream tokens received
    judged: int = 0  # guard tokens judged
    released_before: int = 0  # guard tokens already handed to the caller
    finish_reason: str | None = None


class GuardedGenerationService(pb_grpc.GuardedGenerationServicer):
    def __init__(self, guard: StreamGuardService, upstream: Upstream | None, input_path: str = "auto") -> None:
        if input_path not in INPUT_PATHS:
            raise ValueError(f"upstream input path must be one of {', '.join(INPUT_PATHS)}, got {input_path!r}")
        self.guard = guard  # shares the policies, metrics, release and fail-mode logic of StreamGuard
        self.upstream = upstream
        self._path = None if input_path == "auto" else input_path
        self._path_lock = asyncio.Lock()

    async def input_path(self, runtime) -> str:
        """ "token_ids" when the upstream tokenizes exactly like the guard, else "text" (cached)."""
        async with self._path_lock:
            if self._path is None:
                theirs = await self.upstream.tokenize(TOKENIZER_PROBE)
                ours = runtime.tokenizer.hf.encode(TOKENIZER_PROBE, add_special_tokens=False)
                self._path = "token_ids" if list(theirs) == list(ours) else "text"
                log.info("event=upstream_input_path upstream=%s path=%s", self.upstream.name, self._path)
            return self._path

    async def Generate(
        self, request: pb.GenerateRequest, context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.GenerateResponse]:
        stream: ModeratedStream | None = None
        request_id = ""
        code = grpc.StatusCode.OK
        try:
            runtime = self.guard.holder.ready()
            if self.upstream is None:
                raise _Unavailable("no upstream engine is configured (guard serve --upstream-url / --upstream-grpc)")
            sampling = self._sampling(request.sampling)
            policy = self.guard.policies.get(request.domain)
            rendered = self._rendered(runtime, request)
            path = await self.input_path(runtime)
            if path == "token_ids":
                upstream_prompt = UpstreamPrompt(token_ids=(*rendered.prompt_ids, *rendered.preamble_ids))
            elif request.messages:
                messages = tuple({"role": m.role, "content": m.content} for m in request.messages)
                upstream_prompt = UpstreamPrompt(messages=messages)
            else:
                raise FailedPrecondition(
                    "the upstream's tokenizer is not Qwen3's (text path): send `messages`, not `prompt_token_ids`"
                )
            stream = runtime.moderator.open(
                prompt_ids=rendered.prompt_ids, preamble_ids=rendered.preamble_ids, policy=policy
            )
            request_id = request.request_id or uuid.uuid4().hex
            state = _StreamState()
            prompt = (await self.guard._prompt_response(stream, policy, state)).prompt
            yield pb.GenerateResponse(
                start=pb.GenerationStart(
                    prompt=prompt, upstream=self.upstream.name, input_path=path, upstream_request_id=request_id
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
            generation = _Generation(self, stream, policy, release, state, request_id, path == "text")
            async for response in generation.run(upstream_prompt, sampling):
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
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            if stream is not None:
                stream.close("ended" if code == grpc.StatusCode.OK else f"ended: {code.name}")
            if request_id:  # a stream that ended early (cancelled) did not take the engine's reason
                getattr(self.upstream, "finish_reasons", {}).pop(request_id, None)
            if code != grpc.StatusCode.OK:
                self.guard.metrics.errors.labels(code.name).inc()

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


_END = object()  # the upstream finished normally
ABORT_WAIT_S = 2.0  # how long an aborted upstream stream may take to end by itself


class _Generation:
    """One guarded generation: upstream deltas in, moderated and released chunks out."""

    def __init__(
        self,
        service: GuardedGenerationService,
        stream: ModeratedStream,
        policy: Policy,
        release: ReleaseTracker,
        state: _StreamState,
        request_id: str,
        text_path: bool,
    ) -> None:
        self.guard = service.guard
        self.upstream = service.upstream
        self.stream = stream
        self.policy = policy
        self.release = release
        self.state = state
        self.request_id = request_id
        self.text_path = text_path
        self.progress = _Progress()
        self.max_chunk_tokens = service.guard.settings.max_chunk_tokens  # coalesced chunks stay within limits
        self.max_text_chars = service.guard.settings.max_text_chars

    async def run(self, prompt: UpstreamPrompt, sampling: Sampling) -> AsyncIterator[pb.GenerateResponse]:
        """A reader task drains the upstream into a queue while the guard judges; whatever has
        queued up meanwhile is judged as one chunk, so a guard slower than the engine catches up
        instead of falling further behind (and an interrupt lands sooner upstream)."""
        queue: asyncio.Queue = asyncio.Queue()
        reader = asyncio.create_task(self._read(self.upstream.generate(self.request_id, prompt, sampling), queue))
        interrupt: pb.GenerateResponse | None = None
        error: UpstreamError | None = None
        try:
            done = False
            while not done and interrupt is None:
                ids, text = [], ""
                item = await queue.get()
                while True:
                    if item is _END or isinstance(item, UpstreamError):
                        done, error = True, item if isinstance(item, UpstreamError) else None
                        break
                    ids += item.token_ids
                    text += item.text
                    if queue.empty() or len(ids) >= self.max_chunk_tokens // 2 or len(text) >= self.max_text_chars // 2:
                        break
                    item = queue.get_nowait()
                response = await self._moderate(ids, text)
                if response is None:
                    continue
                if response.chunk.verdict.action == pb.INTERRUPT:
                    interrupt = response  # abort upstream first, then tell the caller
                    break
                yield response
            if interrupt is not None:
                await self._abort(reader)
        finally:
            if not reader.done():
                reader.cancel()  # closes the upstream generator: an unfinished request is aborted
            await asyncio.gather(reader, return_exceptions=True)
        if error is not None:
            async for response in self._upstream_failed(error):
                yield response
            raise error
        if interrupt is not None:
            yield interrupt
            yield self._interrupted(interrupt.chunk.verdict)
            return
        async for response in self._finish(self.progress.finish_reason or "stop", "completed"):
            yield response

    async def _abort(self, reader: asyncio.Task) -> None:
        """Abort upstream and let its stream end by itself (counting what still arrives and
        keeping the engine's finish reason); where there is no abort call, or it is slow, the
        reader is cancelled, which closes the stream."""
        try:
            graceful = await self.upstream.abort(self.request_id)
        except UpstreamError:
            graceful = False
        if graceful:
            await asyncio.wait({reader}, timeout=ABORT_WAIT_S)

    async def _read(self, deltas: AsyncIterator, queue: asyncio.Queue) -> None:
        """Upstream deltas into the queue, then _END or the UpstreamError; counts what arrives."""
        try:
            async for delta in deltas:
                self.progress.generated += len(delta.token_ids)
                self.progress.finish_reason = delta.finish_reason or self.progress.finish_reason
                queue.put_nowait(delta)
            queue.put_nowait(_END)
        except UpstreamError as exc:
            queue.put_nowait(exc)
        finally:
            await deltas.aclose()

    async def _moderate(self, token_ids: list[int], text: str) -> pb.GenerateResponse | None:
        """Judge one delta; None when it brings nothing to judge yet."""
        if self.text_path:
            if not text:
                return None
            if self.state.degraded:
                response = self.guard._unjudged_response(self.release, self.progress.judged, text=text)
                return self._chunk(response.chunk)
            future = self.stream.feed_text(text)
            self.release.receive(list(self.stream.last_submitted_ids), text)
        else:
            if not token_ids:
                return None
            self.release.receive(token_ids)
            if self.state.degraded:
                return self._chunk(self.guard._unjudged_response(self.release, self.progress.judged).chunk)
            future = self.stream.feed_ids(token_ids)
        return await self._verdict(future)

    async def _verdict(self, future) -> pb.GenerateResponse:
        try:
            chunk = await self.guard._await_verdict(future, self.policy)
        except ModelFailure as failure:
            response = self.guard._fail(self.policy, str(failure), self.release, self.progress.judged, self.state)
        else:
            self.progress.judged = chunk.tokens[-1].index + 1 if chunk.tokens else self.progress.judged
            response = self.guard._chunk_response(chunk, self.release, self.progress.judged, False)
        return self._chunk(response.chunk)

    def _chunk(self, verdict: pb.ChunkVerdict) -> pb.GenerateResponse:
        """A released chunk: the text always, guard token ids on the token path (they are the upstream's)."""
        ids = [] if self.text_path else self.release.released_ids(self.progress.released_before)
        self.progress.released_before = self.release.released
        return pb.GenerateResponse(chunk=pb.GenerationChunk(token_ids=ids, text=verdict.released_text, verdict=verdict))

    async def _judge_text_tail(self) -> pb.GenerateResponse | None:
        """Text path: the incremental tokenizer's held-back tail is judged at the end."""
        if not self.text_path or self.state.degraded or not self.stream.text_mode:
            return None
        future = self.stream.end_text()
        self.release.receive(list(self.stream.last_submitted_ids), "")
        return await self._verdict(future)

    async def _finish(self, finish_reason: str, reason: str) -> AsyncIterator[pb.GenerateResponse]:
        tail = await self._judge_text_tail()
        if tail is not None:
            yield tail
            if tail.chunk.verdict.action == pb.INTERRUPT:
                yield self._interrupted(tail.chunk.verdict)
                return
        text = self.release.finish(interrupted=False)
        ids = [] if self.text_path else self.release.released_ids(self.progress.released_before)
        self.progress.released_before = self.release.released
        if ids or text:
            yield pb.GenerateResponse(chunk=pb.GenerationChunk(token_ids=ids, text=text))
        yield pb.GenerateResponse(
            end=pb.GenerationEnd(
                finish_reason=finish_reason,
                upstream_finish_reason=self._upstream_finish_reason(),
                released_tokens=self.release.released,
                generated_tokens=self.progress.generated,
                reason=reason,
            )
        )

    async def _upstream_failed(self, exc: UpstreamError) -> AsyncIterator[pb.GenerateResponse]:
        """Fail open: the partial response is judged to its end and released like a finished one.
        Fail closed: nothing held back is released. Either way the caller then gets UNAVAILABLE."""
        self.guard.metrics.fail_mode.labels(self.policy.name, self.policy.fail_mode.value, "upstream").inc()
        log.warning(
            "event=upstream_failure request_id=%s fail_mode=%s generated=%d",
            self.request_id,
            self.policy.fail_mode.value,
            self.progress.generated,
        )
        if self.policy.fail_mode is FailMode.OPEN:
            async for response in self._finish("upstream_error", f"upstream failed: {exc}; fail open"):
                yield response
            return
        withheld = self.release.received - self.release.released
        yield pb.GenerateResponse(
            end=pb.GenerationEnd(
                finish_reason="upstream_error",
                stopped=True,
                reason=f"upstream failed: {exc}; fail closed: {withheld} held-back tokens withheld",
                upstream_finish_reason=self._upstream_finish_reason(),
                released_tokens=self.release.released,
                generated_tokens=self.progress.generated,
            )
        )

    def _upstream_finish_reason(self) -> str:
        """What the engine reported for this request, where the adapter records it (taken once)."""
        return getattr(self.upstream, "finish_reasons", {}).pop(self.request_id, "")

    def _interrupted(self, verdict: pb.ChunkVerdict) -> pb.GenerateResponse:
        index = self.stream.flag_index
        category = self.stream.flag_category or ""
        reason = verdict.reason or f"interrupted at response token {index} ({category or 'unsafe'})"
        self.guard.metrics.interrupts.labels(category).inc()
        end = pb.GenerationEnd(
            finish_reason="interrupted",
            stopped=True,
            reason=reason,
            category=category,
            released_tokens=self.release.released,
            generated_tokens=self.progress.generated,
        )
        end.upstream_finish_reason = self._upstream_finish_reason()
        if index is not None:
            end.offset = index
            if not self.text_path:  # upstream tokens are guard tokens: count those past the flag
                end.tokens_after_interrupt = self.progress.generated - (index + 1)
        log.info(
            "event=generation_interrupted request_id=%s offset=%s generated=%d",
            self.request_id,
            index,
            self.progress.generated,
        )
        return pb.GenerateResponse(end=end)
