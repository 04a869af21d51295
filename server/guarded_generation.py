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
import contextlib
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import grpc

from guard.errors import FailedPrecondition, InvalidInput
from guard.policy.rules import FailMode, Policy
from guard.session.response_session import ChunkOutcome, FinalOutcome, ResponseSession
from guard.text.conversation import RenderedPrompt, parse_messages
from server.qwen3guard.v1 import guard_pb2 as pb
from server.qwen3guard.v1 import guard_pb2_grpc as pb_grpc
from server.stream_guard import StreamGuardService, prompt_pb, requested_release_mode
from server.upstream import Sampling, Upstream, UpstreamError, UpstreamPrompt, take_finish_reason
from server.wire import Unavailable, check_token_detail, error_status, fill_chunk

log = logging.getLogger(__name__)

MAX_TOKENS = 4096
MAX_STOP_STRINGS, MAX_STOP_CHARS = 16, 256  # stop strings are matched on every token: keep them few and short
INPUT_PATHS = ("auto", "token_ids", "text")
# Special tokens, CJK, emoji, runs of spaces, tabs and code: tokenizers that agree on this agree.
TOKENIZER_PROBE = "<|im_start|>user\nHello, 世界! 🙂👍🏽  x += 1;\n\tdef f(a):  return a  # done<|im_end|>\n"


class GuardedGenerationService(pb_grpc.GuardedGenerationServicer):
    def __init__(
        self,
        guard: StreamGuardService,
        upstream: Upstream | None,
        input_path: str = "auto",
        *,
        front_end: str = "generate",
    ) -> None:
        if input_path not in INPUT_PATHS:
            raise ValueError(f"upstream input path must be one of {', '.join(INPUT_PATHS)}, got {input_path!r}")
        self.guard = guard  # shares the policies, metrics, release and fail-mode logic of StreamGuard
        self.upstream = upstream
        self._path = None if input_path == "auto" else input_path
        self._path_lock = asyncio.Lock()
        self.front_end = front_end  # the audit log's name for this front end (ParScale's instance says "parscale")

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
        code, message = grpc.StatusCode.OK, ""
        try:
            async with contextlib.aclosing(self.stream(request)) as responses:
                async for response in responses:
                    yield response
        except asyncio.CancelledError:
            self.guard.metrics.errors.labels(grpc.StatusCode.CANCELLED.name).inc()
            raise
        except UpstreamError as exc:
            code, message = grpc.StatusCode.UNAVAILABLE, f"upstream: {exc}"
        except Exception as exc:
            code, message = error_status(exc, request_id=request.request_id, rpc="GuardedGeneration.Generate")
        if code != grpc.StatusCode.OK:
            self.guard.metrics.errors.labels(code.name).inc()
            await context.abort(code, message)

    async def stream(
        self, request: pb.GenerateRequest, *, raw_prompt: str = "", front_end: str = ""
    ) -> AsyncIterator[pb.GenerateResponse]:
        """The guarded generation, transport-free (the gRPC method and the OpenAI endpoint drive it):
        raises the caller's errors (InvalidInput, Unavailable, UpstreamError, ...) for the front end
        to map. ``raw_prompt``: a completion prompt (no chat template), judged as one user turn,
        sent to the upstream as it is."""
        session: ResponseSession | None = None
        request_id = request.request_id
        outcome = "ended: error"
        try:
            runtime = self.guard.holder.ready()
            if self.upstream is None:
                raise Unavailable("no upstream engine is configured (guard serve --upstream-url / --upstream-grpc)")
            sampling = self._sampling(request.sampling)
            check_token_detail(request.token_detail, "GenerateRequest")
            policy = self.guard.policies.get(request.domain)
            if raw_prompt and (request.messages or request.prompt_token_ids):
                raise InvalidInput("a raw completion prompt comes alone, without `messages` or `prompt_token_ids`")
            messages = [pb.ChatMessage(role="user", content=raw_prompt)] if raw_prompt else request.messages
            rendered = await asyncio.to_thread(self._rendered, runtime, messages, request.prompt_token_ids)
            path = await self.input_path(runtime)
            if raw_prompt:
                ids = runtime.tokenizer.hf.encode(raw_prompt) if path == "token_ids" else ()
                upstream_prompt = UpstreamPrompt(token_ids=tuple(ids), text=raw_prompt)
            elif path == "token_ids":
                upstream_prompt = UpstreamPrompt(token_ids=(*rendered.prompt_ids, *rendered.preamble_ids))
            elif request.messages:
                messages = tuple({"role": m.role, "content": m.content} for m in request.messages)
                upstream_prompt = UpstreamPrompt(messages=messages)
            else:
                raise FailedPrecondition(
                    "the upstream's tokenizer is not Qwen3's (text path): send `messages`, not `prompt_token_ids`"
                )
            stream = runtime.moderator.open(
                prompt_ids=rendered.prompt_ids,
                preamble_ids=rendered.preamble_ids,
                policy=policy,
                loop=asyncio.get_running_loop(),
            )
            request_id = request_id or uuid.uuid4().hex
            session = ResponseSession(
                stream,
                policy,
                requested_release_mode(request.release_mode, policy),
                runtime.tokenizer.hf,
                draining=lambda: self.guard.holder.draining,
                audit=self.guard.audit_trail(policy, request_id, front_end or self.front_end),
            )
            topic = self.guard.topic_check(policy, messages, request.prompt_token_ids)
            prompt = await session.judge_prompt(topic)
            self.guard.record_prompt(policy, prompt)
            prompt_msg = prompt_pb(prompt, policy)
            yield pb.GenerateResponse(
                start=pb.GenerationStart(
                    prompt=prompt_msg, upstream=self.upstream.name, input_path=path, upstream_request_id=request_id
                )
            )
            if prompt.blocked:
                reason = prompt.model_failure or (
                    f"prompt blocked by the {policy.name} policy ({prompt_msg.verdict.category})"
                )
                yield pb.GenerateResponse(end=pb.GenerationEnd(finish_reason="blocked", stopped=True, reason=reason))
                outcome = "ended"
                return
            generation = _Generation(self, session, request_id, path == "text", request.token_detail or pb.ALL_TOKENS)
            async with contextlib.aclosing(generation.run(upstream_prompt, sampling)) as responses:
                async for response in responses:
                    yield response
            outcome = "ended"
        except asyncio.CancelledError:
            outcome = "ended: CANCELLED"
            raise
        except GeneratorExit:
            outcome = "ended: closed by the caller"
            raise
        finally:
            if session is not None:
                session.close(outcome)
            if request_id:  # a stream that ended early (cancelled) did not take the engine's reason
                take_finish_reason(self.upstream, request_id)

    @staticmethod
    def _sampling(params: pb.SamplingParams) -> Sampling:
        if params.max_tokens > MAX_TOKENS:
            raise InvalidInput(f"sampling.max_tokens must be <= {MAX_TOKENS}, got {params.max_tokens}")
        if params.temperature < 0:
            raise InvalidInput(f"sampling.temperature must be >= 0, got {params.temperature}")
        if len(params.stop) > MAX_STOP_STRINGS:
            raise InvalidInput(f"sampling.stop has {len(params.stop)} strings; at most {MAX_STOP_STRINGS}")
        for i, stop in enumerate(params.stop):
            if not 0 < len(stop) <= MAX_STOP_CHARS:
                raise InvalidInput(f"sampling.stop[{i}] is empty or longer than {MAX_STOP_CHARS} characters")
        return Sampling(
            temperature=params.temperature,
            top_p=params.top_p or None,
            max_tokens=params.max_tokens or 256,
            seed=params.seed if params.HasField("seed") else None,
            stop=tuple(params.stop),
        )

    @staticmethod
    def _rendered(runtime, messages, prompt_token_ids) -> RenderedPrompt:
        if messages and prompt_token_ids:
            raise InvalidInput("give `messages` or `prompt_token_ids`, not both")
        if messages:
            parsed = parse_messages([{"role": m.role, "content": m.content} for m in messages])
            return runtime.tokenizer.render_prompt(parsed)
        ids = list(prompt_token_ids)
        if not ids:
            raise InvalidInput("the conversation is empty; give `messages` or `prompt_token_ids`")
        im_end = runtime.tokenizer.im_end_id
        if im_end not in ids:
            raise InvalidInput(f"`prompt_token_ids` must contain the <|im_end|> (id {im_end}) closing the user turn")
        last = len(ids) - 1 - ids[::-1].index(im_end)
        return RenderedPrompt(tuple(ids[: last + 1]), tuple(ids[last + 1 :]))


_END = object()  # the upstream finished normally
ABORT_WAIT_S = 2.0  # how long an aborted upstream stream may take to end by itself
READ_AHEAD = 1024  # upstream deltas queued ahead of the guard (the upstream waits beyond)


@dataclass
class _Progress:
    """Where one generation stands."""

    generated: int = 0  # upstream tokens received
    finish_reason: str | None = None
    stopped: bool = False  # interrupted: what still arrives is counted, not queued


class _Generation:
    """One guarded generation: upstream deltas in, the session's outcomes out as released chunks."""

    def __init__(
        self,
        service: GuardedGenerationService,
        session: ResponseSession,
        request_id: str,
        text_path: bool,
        token_detail: int = pb.ALL_TOKENS,
    ) -> None:
        self.guard = service.guard
        self.upstream = service.upstream
        self.session = session
        self.policy: Policy = session.policy
        self.request_id = request_id
        self.text_path = text_path
        self.token_detail = token_detail
        self.progress = _Progress()
        self.max_chunk_tokens = service.guard.settings.max_chunk_tokens  # coalesced chunks stay within limits
        self.max_text_chars = service.guard.settings.max_text_chars

    async def run(self, prompt: UpstreamPrompt, sampling: Sampling) -> AsyncIterator[pb.GenerateResponse]:
        """A reader task drains the upstream into a bounded queue while the guard judges; whatever
        has queued up meanwhile is judged as one chunk, so a guard slower than the engine catches up
        instead of falling further behind (and an interrupt lands sooner upstream)."""
        queue: asyncio.Queue = asyncio.Queue(maxsize=READ_AHEAD)
        deltas = self.upstream.generate(self.request_id, prompt, sampling)
        reader = asyncio.create_task(self._read(deltas, queue))
        interrupt: ChunkOutcome | None = None
        error: UpstreamError | None = None
        try:
            done = False
            while not done and interrupt is None:
                ids, text = [], ""
                item = await queue.get()
                while True:
                    if isinstance(item, Exception) and not isinstance(item, UpstreamError):
                        if not self.progress.generated:
                            raise item  # the request itself was refused (a limit, bad input): its own status
                        item = UpstreamError(f"{type(item).__name__}: {item}")  # midway: the fail mode decides
                    if item is _END or isinstance(item, UpstreamError):
                        done, error = True, item if isinstance(item, UpstreamError) else None
                        break
                    ids += item.token_ids
                    text += item.text
                    if queue.empty() or len(ids) >= self.max_chunk_tokens // 2 or len(text) >= self.max_text_chars // 2:
                        break
                    item = queue.get_nowait()
                outcome = await self._moderate(ids, text)
                if outcome is None:
                    continue
                if outcome.interrupted:
                    interrupt = outcome  # abort upstream first, then tell the caller
                    break
                yield self._chunk(outcome)
            if interrupt is not None:
                self.progress.stopped = True
                _drain(queue)
                await self._abort(reader)
        finally:
            if not reader.done():
                reader.cancel()  # closes the upstream generator: an unfinished request is aborted
            # Shielded: a caller cancelled again while this waits (anyio, under the OpenAI endpoint,
            # cancels at every await) must not cancel the reader a second time, midway through
            # closing the upstream connection, which would leave vLLM generating into it.
            await asyncio.shield(asyncio.gather(reader, return_exceptions=True))
        if error is not None:
            async for response in self._upstream_failed(error):
                yield response
            raise error
        if interrupt is not None:
            yield self._chunk(interrupt)
            yield self._end(self.session.final())
            return
        async for response in self._finish(self.progress.finish_reason or "stop"):
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
        """Upstream deltas into the queue, then _END or the error; counts what arrives.
        The upstream generator is closed explicitly, whatever ends the reader."""
        try:
            async for delta in deltas:
                self.progress.generated += len(delta.token_ids)
                self.progress.finish_reason = delta.finish_reason or self.progress.finish_reason
                if not self.progress.stopped:
                    await queue.put(delta)
            if not self.progress.stopped:
                await queue.put(_END)
        except Exception as exc:  # UpstreamError: the fail mode decides; anything else ends the call
            if not self.progress.stopped:
                await queue.put(exc)
        finally:
            await deltas.aclose()

    async def _moderate(self, token_ids: list[int], text: str) -> ChunkOutcome | None:
        """Judge one delta; None when it brings nothing to judge yet."""
        if self.text_path:
            if not text:
                return None
            pending = self.session.submit_text(text)
        else:
            if not token_ids:
                return None
            pending = self.session.submit_ids(token_ids)
        outcome = await self.session.resolve(pending)
        if outcome is not None:
            self.guard.record_chunk(self.policy, outcome)
        return outcome

    def _chunk(self, outcome: ChunkOutcome) -> pb.GenerateResponse:
        """A released chunk: the text always, guard token ids on the token path (they are the upstream's)."""
        response = pb.GenerateResponse()
        chunk = response.chunk
        if not self.text_path:
            chunk.token_ids.extend(outcome.released_ids)
        chunk.text = outcome.released_text
        fill_chunk(chunk.verdict, outcome, False, self.token_detail)
        return response

    async def _finish(self, finish_reason: str, reason: str = "completed") -> AsyncIterator[pb.GenerateResponse]:
        """The upstream ended: judge a text stream's held-back tail, release the rest, end."""
        tail = await self.session.resolve(self.session.submit_end())
        if tail is not None:
            self.guard.record_chunk(self.policy, tail)
            yield self._chunk(tail)
        final = self.session.final()
        if final.interrupted:
            yield self._end(final)
            return
        ids = [] if self.text_path else list(final.released_ids)
        if ids or final.released_text:
            yield pb.GenerateResponse(chunk=pb.GenerationChunk(token_ids=ids, text=final.released_text))
        yield pb.GenerateResponse(
            end=pb.GenerationEnd(
                finish_reason=finish_reason,
                upstream_finish_reason=self._upstream_finish_reason(),
                released_tokens=final.released,
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
            self.session.fail_open(f"upstream failed: {exc}; fail open")
            async for response in self._finish("upstream_error", f"upstream failed: {exc}; fail open"):
                yield response
            return
        final = self.session.withhold(f"upstream failed: {exc}; fail closed")
        yield pb.GenerateResponse(
            end=pb.GenerationEnd(
                finish_reason="upstream_error",
                stopped=True,
                reason=f"{final.reason}: {final.withheld} held-back tokens withheld",
                upstream_finish_reason=self._upstream_finish_reason(),
                released_tokens=final.released,
                generated_tokens=self.progress.generated,
            )
        )

    def _upstream_finish_reason(self) -> str:
        """What the engine reported for this request, where the adapter records it (taken once)."""
        return take_finish_reason(self.upstream, self.request_id)

    def _end(self, final: FinalOutcome) -> pb.GenerateResponse:
        """The end of an interrupted generation (the rule fired, or the model failed closed)."""
        self.guard.metrics.interrupts.labels(final.category).inc()
        end = pb.GenerationEnd(
            finish_reason="interrupted",
            stopped=True,
            reason=final.reason,
            category=final.category,
            released_tokens=final.released,
            generated_tokens=self.progress.generated,
        )
        end.upstream_finish_reason = self._upstream_finish_reason()
        if final.flag_index is not None:
            end.offset = final.flag_index
            if not self.text_path:  # upstream tokens are guard tokens: count those past the flag
                end.tokens_after_interrupt = self.progress.generated - (final.flag_index + 1)
        log.info(
            "event=generation_interrupted request_id=%s offset=%s generated=%d",
            self.request_id,
            final.flag_index,
            self.progress.generated,
        )
        return pb.GenerateResponse(end=end)


def _drain(queue: asyncio.Queue) -> None:
    """Drop what is queued (after an interrupt nothing more is judged)."""
    while not queue.empty():
        queue.get_nowait()
