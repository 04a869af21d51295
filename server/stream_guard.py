"""`qwen3guard.v1.StreamGuard`: the Moderate bidi stream and Info, over the stream engine.

Each stream runs under the policy of its domain, fixed when it opens (a live policy edit
applies to new streams). When the model does not answer within the policy's timeout, or fails,
the policy's fail mode decides: closed interrupts with a reason, open releases unjudged.

Requests are read by a task of their own and submitted to the engine as soon as they arrive
(pipelined: the engine may batch and coalesce them); verdicts are sent back in order, one
response per chunk. Validation happens here, once, with messages that name the field and the
limit. Whatever ends a stream (close, interrupt, error, cancel, deadline), its session is
closed in ``finally`` so its KV cache slot is freed at once.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from concurrent.futures import Future
from dataclasses import dataclass

import grpc

import guard
from guard.actions import Action
from guard.errors import EngineError, FailedPrecondition, InvalidInput, LimitExceeded, SessionClosed
from guard.labels import RiskLevel
from guard.moderation import ChunkVerdict, ModeratedStream
from guard.policy import FailMode, Policy, ReleaseDefault
from guard.policy_loader import PolicyStore
from guard.release import ReleaseMode, ReleaseTracker
from guard.runtime import GuardRuntime
from guard.verdict import Verdict
from server.metrics import Metrics
from server.qwen3guard.v1 import guard_pb2 as pb
from server.qwen3guard.v1 import guard_pb2_grpc as pb_grpc
from server.settings import ServeSettings

log = logging.getLogger(__name__)

RISK = {"SAFE": pb.SAFE, "CONTROVERSIAL": pb.CONTROVERSIAL, "UNSAFE": pb.UNSAFE}
ACTION = {a: pb.Action.Value(a.name) for a in Action}


def status_of(error: EngineError) -> grpc.StatusCode:
    if isinstance(error, InvalidInput):
        return grpc.StatusCode.INVALID_ARGUMENT
    if isinstance(error, LimitExceeded):
        return grpc.StatusCode.RESOURCE_EXHAUSTED
    if isinstance(error, FailedPrecondition):
        return grpc.StatusCode.FAILED_PRECONDITION
    if isinstance(error, SessionClosed) and "shutting down" in str(error):
        return grpc.StatusCode.UNAVAILABLE
    return grpc.StatusCode.ABORTED


class RuntimeHolder:
    """The runtime once loaded; None while loading and after draining starts."""

    def __init__(self) -> None:
        self.runtime: GuardRuntime | None = None
        self.draining = False

    def ready(self) -> GuardRuntime:
        if self.draining:
            raise _Unavailable("the sidecar is draining (shutting down); retry on another replica")
        if self.runtime is None:
            raise _Unavailable("the model is still loading; retry shortly")
        return self.runtime


class _Unavailable(Exception):
    pass


@dataclass
class _Item:
    kind: str  # chunk | close | eof | error
    future: object = None
    error: BaseException | None = None
    unjudged_text: str | None = None  # fail open, text stream: released as it came


@dataclass
class _StreamState:
    """What the request reader and the responder share."""

    degraded: bool = False  # fail open happened: further chunks are released unjudged


class ModelFailure(Exception):
    """The guard model did not answer in time, or failed; the policy's fail mode applies."""


def verdict_pb(verdict: Verdict, level: RiskLevel, action: Action, probabilities: bool) -> pb.Verdict:
    msg = pb.Verdict(
        risk=RISK[level.name],
        risk_label=verdict.risk_label,
        risk_probability=verdict.risk_probability,
        category=verdict.category or "",
        action=ACTION[action],
    )
    if probabilities:
        msg.risk_probs.update(verdict.risk_probs)
        msg.category_probs.update(verdict.category_probs)
    return msg


class StreamGuardService(pb_grpc.StreamGuardServicer):
    def __init__(self, holder: RuntimeHolder, settings: ServeSettings, metrics: Metrics, policies: PolicyStore) -> None:
        self.holder = holder
        self.settings = settings
        self.metrics = metrics
        self.policies = policies

    # ------------------------------------------------------------------------------ Info

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        try:
            runtime = self.holder.ready()
        except _Unavailable as exc:
            await context.abort(grpc.StatusCode.UNAVAILABLE, str(exc))
        cfg = runtime.guard.config
        limits = runtime.engine.limits
        return pb.InfoResponse(
            version=guard.__version__,
            model_name=runtime.guard.path.name,
            demo=cfg.is_demo,
            notice=(cfg.demo or {}).get("notice", "") if cfg.is_demo else "",
            num_layers=cfg.num_hidden_layers,
            hidden_size=cfg.hidden_size,
            num_attention_heads=cfg.num_attention_heads,
            num_key_value_heads=cfg.num_key_value_heads,
            head_dim=cfg.head_dim,
            vocab_size=cfg.vocab_size,
            risk_labels=cfg.response_risk.labels.names,
            categories=cfg.response_categories.names,
            query_risk_labels=cfg.query_risk.labels.names,
            query_categories=cfg.query_categories.names,
            device=self.settings.device,
            dtype=self.settings.dtype,
            limits=pb.Limits(
                max_sessions=limits.max_sessions,
                max_tokens_per_session=limits.max_tokens_per_session,
                max_chunk_tokens=limits.max_chunk_tokens,
                max_queued_chunks=limits.max_queued_chunks,
                idle_timeout_s=limits.idle_timeout_s,
                max_step_tokens=limits.max_step_tokens,
                max_kv_cache_bytes=limits.max_kv_cache_bytes or 0,
                max_text_chars=self.settings.max_text_chars,
            ),
            live_sessions=runtime.engine.live_sessions,
            kv_cache_bytes=runtime.engine.kv_cache_bytes,
        )

    # ------------------------------------------------------------------------------ Moderate

    async def Moderate(
        self, request_iterator: AsyncIterator[pb.ModerateRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[pb.ModerateResponse]:
        stream: ModeratedStream | None = None
        release: ReleaseTracker | None = None
        reader: asyncio.Task | None = None
        code = grpc.StatusCode.OK
        try:
            runtime = self.holder.ready()
            first = await anext(aiter(request_iterator), None)
            if first is None:
                return
            if first.WhichOneof("kind") != "open":
                raise InvalidInput(f"the first message must be `open`, got `{first.WhichOneof('kind') or 'empty'}`")
            opened = first.open
            policy = self._policy_for(opened)
            stream = self._open(runtime, opened, policy)
            self.metrics.live_sessions.set(runtime.engine.live_sessions)
            log.info(
                "event=stream_open session=%s request_id=%s domain=%s policy=%s",
                stream.id,
                opened.request_id,
                policy.name,
                policy.version,
            )
            if self.settings.log_content:  # operator opt-in only: the conversation text
                log.info(
                    "event=stream_prompt session=%s messages=%r",
                    stream.id,
                    [(m.role, m.content) for m in opened.messages],
                )
            probabilities = opened.include_probabilities
            state = _StreamState()
            prompt_response = await self._prompt_response(stream, policy, state)
            yield prompt_response
            if prompt_response.prompt.verdict.action == pb.BLOCK and prompt_response.prompt.reason:
                yield self._final_failed(prompt_response.prompt.reason, release=None)
                return
            mode = self._release_mode(opened, policy)
            release = ReleaseTracker(mode, runtime.tokenizer.hf, policy.redact_marker)
            queue: asyncio.Queue[_Item] = asyncio.Queue()
            reader = asyncio.create_task(self._read(request_iterator, stream, release, queue, state))
            judged = 0
            while True:
                item = await queue.get()
                if item.kind == "error":
                    raise item.error
                if item.future is None:  # close/eof with nothing to judge, or a degraded chunk
                    if item.kind == "chunk":
                        yield self._unjudged_response(release, judged, text=item.unjudged_text)
                        continue
                    yield self._final(stream, release, judged, interrupted=False)
                    return
                try:
                    chunk = await self._await_verdict(item.future, policy)
                except ModelFailure as failure:
                    response = self._fail(policy, str(failure), release, judged, state, item.unjudged_text)
                    yield response
                    if response.chunk.action == pb.INTERRUPT:
                        yield self._final_failed(response.chunk.reason, release)
                        return
                    if item.kind in ("close", "eof"):
                        yield self._final(stream, release, judged, interrupted=False)
                        return
                    continue
                judged = chunk.tokens[-1].index + 1 if chunk.tokens else judged
                response = self._chunk_response(chunk, release, judged, probabilities)
                yield response
                if response.chunk.action == pb.INTERRUPT:
                    yield self._final(stream, release, judged, interrupted=True)
                    return
                if item.kind in ("close", "eof"):
                    yield self._final(stream, release, judged, interrupted=False)
                    return
        except _Unavailable as exc:
            code = grpc.StatusCode.UNAVAILABLE
            await context.abort(code, str(exc))
        except EngineError as exc:
            code = status_of(exc)
            await context.abort(code, str(exc))
        except asyncio.CancelledError:
            code = grpc.StatusCode.CANCELLED
            raise
        finally:
            if reader is not None:
                reader.cancel()
            if stream is not None:
                stream.close("ended" if code == grpc.StatusCode.OK else f"ended: {code.name}")
                self.metrics.live_sessions.set(self.holder.runtime.engine.live_sessions if self.holder.runtime else 0)
                log.info("event=stream_end session=%s code=%s", stream.id, code.name)
                if self.settings.log_content and release is not None:  # operator opt-in only
                    log.info("event=stream_response session=%s text=%r", stream.id, release.received_text())
            if code != grpc.StatusCode.OK:
                self.metrics.errors.labels(code.name).inc()

    def _policy_for(self, opened: pb.OpenRequest) -> Policy:
        """The domain's policy; a caller may tighten debounce or Controversial, never loosen them."""
        if opened.debounce > 64:
            raise InvalidInput(f"open: `debounce` must be <= 64, got {opened.debounce}")
        policy = self.policies.get(opened.domain)
        return policy.tightened(debounce=opened.debounce or None, strict=opened.controversial == pb.STRICT)

    @staticmethod
    def _release_mode(opened: pb.OpenRequest, policy: Policy) -> ReleaseMode:
        if opened.release_mode == pb.OPTIMISTIC:
            return ReleaseMode.OPTIMISTIC
        if opened.release_mode == pb.HOLD_BACK:
            return ReleaseMode.HOLD_BACK
        return ReleaseMode.OPTIMISTIC if policy.release_mode is ReleaseDefault.OPTIMISTIC else ReleaseMode.HOLD_BACK

    def _open(self, runtime: GuardRuntime, opened: pb.OpenRequest, policy: Policy) -> ModeratedStream:
        if opened.messages and opened.prompt_token_ids:
            raise InvalidInput("open: give `messages` or `prompt_token_ids`, not both")
        if not opened.messages and not opened.prompt_token_ids:
            raise InvalidInput("open: the conversation is empty; give `messages` or `prompt_token_ids`")
        total_chars = sum(len(m.content) for m in opened.messages)
        limit_chars = self.settings.max_text_chars * 8
        if total_chars > limit_chars:
            raise InvalidInput(f"open: the conversation has {total_chars} characters; at most {limit_chars}")
        if opened.messages:
            messages = [{"role": m.role, "content": m.content} for m in opened.messages]
            return runtime.moderator.open(messages=messages, policy=policy)
        return runtime.moderator.open(prompt_ids=list(opened.prompt_token_ids), policy=policy)

    async def _await_verdict(self, future, policy: Policy):
        """The engine's answer within the policy's timeout; ModelFailure otherwise."""
        try:
            return await asyncio.wait_for(asyncio.wrap_future(future), policy.model_timeout_ms / 1000)
        except TimeoutError:
            raise ModelFailure(f"the guard model did not answer within {policy.model_timeout_ms} ms") from None
        except SessionClosed as exc:
            if "shutting down" in str(exc) and self.holder.draining:
                raise
            raise ModelFailure(f"the guard model is unavailable ({exc})") from None

    async def _prompt_response(self, stream: ModeratedStream, policy: Policy, state: _StreamState):
        try:
            prompt = await self._await_verdict(stream.prompt, policy)
        except ModelFailure as failure:
            action = Action.BLOCK if policy.fail_mode is FailMode.CLOSED else Action.ALLOW
            self._count_failure(policy, "prompt")
            state.degraded = policy.fail_mode is FailMode.OPEN
            reason = f"{failure}; fail {policy.fail_mode.value}"
            return pb.ModerateResponse(
                prompt=pb.PromptVerdict(
                    verdict=pb.Verdict(action=ACTION[action]), reason=reason, policy_version=policy.version
                )
            )
        category = prompt.verdict.category or ""
        self.metrics.verdicts.labels("prompt", prompt.level.name, category).inc()
        self.metrics.actions.labels("prompt", prompt.action.name, category).inc()
        return pb.ModerateResponse(
            prompt=pb.PromptVerdict(
                verdict=verdict_pb(prompt.verdict, prompt.level, prompt.action, True),
                prompt_tokens=prompt.prompt_tokens,
                timing=pb.Timing(compute_ms=prompt.compute_s * 1e3),
                policy_version=policy.version,
            )
        )

    def _count_failure(self, policy: Policy, stage: str) -> None:
        self.metrics.fail_mode.labels(policy.name, policy.fail_mode.value, stage).inc()
        log.warning(
            "event=guard_model_failure domain=%s fail_mode=%s stage=%s", policy.name, policy.fail_mode.value, stage
        )

    async def _read(
        self,
        requests: AsyncIterator[pb.ModerateRequest],
        stream: ModeratedStream,
        release: ReleaseTracker,
        queue: asyncio.Queue[_Item],
        state: _StreamState,
    ) -> None:
        """Validate and submit requests as they arrive; the handler answers them in order."""
        try:
            async for request in requests:
                kind = request.WhichOneof("kind")
                if kind == "open":
                    raise InvalidInput("a second `open` on a stream that is already open")
                if kind == "close":
                    await queue.put(_Item("close", None if state.degraded else self._end_text(stream, release)))
                    return
                if kind != "chunk":
                    raise InvalidInput("empty request: set `chunk` or `close`")
                chunk = request.chunk
                if chunk.text and chunk.token_ids:
                    raise InvalidInput("chunk: `text` and `token_ids` are both set; send one of them")
                if chunk.text and len(chunk.text) > self.settings.max_text_chars:
                    raise InvalidInput(
                        f"chunk: `text` has {len(chunk.text)} characters; at most {self.settings.max_text_chars}"
                    )
                if state.degraded:  # fail open: no more judging, release on arrival
                    if chunk.text:
                        await queue.put(_Item("chunk", None, unjudged_text=chunk.text))
                    else:
                        release.receive(list(chunk.token_ids))
                        await queue.put(_Item("chunk", None))
                    continue
                try:
                    if chunk.text:
                        future = stream.feed_text(chunk.text)
                        release.receive(list(stream.last_submitted_ids), chunk.text)
                    else:
                        ids = list(chunk.token_ids)
                        future = stream.feed_ids(ids)
                        release.receive(ids)
                except SessionClosed as exc:  # the model went away under this stream: fail mode, not an error
                    if self.holder.draining:
                        raise
                    future = Future()
                    future.set_exception(exc)
                    if not chunk.text:
                        release.receive(list(chunk.token_ids))
                    await queue.put(_Item("chunk", future, unjudged_text=chunk.text or None))
                    continue
                await queue.put(_Item("chunk", future))
            await queue.put(_Item("eof", None if state.degraded else self._end_text(stream, release)))
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # handed to the handler, which turns it into a status
            await queue.put(_Item("error", error=exc))

    @staticmethod
    def _end_text(stream: ModeratedStream, release: ReleaseTracker):
        """Text streams: judge the held-back tail (its text was counted when it arrived)."""
        if not stream.text_mode:
            return None
        future = stream.end_text()
        release.receive(stream.last_submitted_ids, "")
        return future

    def _fail(
        self,
        policy: Policy,
        why: str,
        release: ReleaseTracker,
        judged: int,
        state: _StreamState,
        unjudged_text: str | None = None,
    ) -> pb.ModerateResponse:
        """The model failed on a chunk: interrupt (closed) or release unjudged (open)."""
        self._count_failure(policy, "response")
        reason = f"{why}; fail {policy.fail_mode.value}"
        if policy.fail_mode is FailMode.CLOSED:
            return pb.ModerateResponse(
                chunk=pb.ChunkVerdict(
                    action=pb.INTERRUPT,
                    released=release.released,
                    released_chars=release.released_chars,
                    judged=judged,
                    received=release.received,
                    reason=reason,
                )
            )
        state.degraded = True
        return self._unjudged_response(release, judged, reason, text=unjudged_text)

    def _unjudged_response(
        self, release: ReleaseTracker, judged: int, reason: str = "", text: str | None = None
    ) -> pb.ModerateResponse:
        text = release.release_unjudged_text(text) if text is not None else release.release_received()
        return pb.ModerateResponse(
            chunk=pb.ChunkVerdict(
                action=pb.CONTINUE,
                released=release.released,
                released_text=text,
                released_chars=release.released_chars,
                judged=judged,
                received=release.received,
                unjudged=True,
                reason=reason or "released unjudged: the guard model failed earlier in this stream (fail open)",
            )
        )

    def _chunk_response(
        self, chunk: ChunkVerdict, release: ReleaseTracker, judged: int, probabilities: bool
    ) -> pb.ModerateResponse:
        m = self.metrics
        tokens = []
        for t in chunk.tokens:
            release.mark(t.action is Action.REDACT)
            tokens.append(
                pb.TokenVerdict(
                    index=t.index, token_id=t.token_id, verdict=verdict_pb(t.verdict, t.level, t.action, probabilities)
                )
            )
            m.verdicts.labels("response", t.level.name, t.verdict.category or "").inc()
        m.tokens.inc(len(chunk.tokens))
        m.chunk_seconds.observe(chunk.queue_s + chunk.compute_s)
        m.queue_seconds.observe(chunk.queue_s)
        action = chunk.action
        text = release.judged(judged, chunk.unsafe_run, chunk.span_start)
        if action is Action.INTERRUPT:
            text += release.finish(interrupted=True)
        out = pb.ChunkVerdict(
            tokens=tokens,
            action=ACTION[action],
            released=release.released,
            released_text=text,
            released_chars=release.released_chars,
            judged=judged,
            received=release.received,
            timing=pb.Timing(queue_ms=chunk.queue_s * 1e3, compute_ms=chunk.compute_s * 1e3),
            redactions=[pb.Span(start=a, end=b) for a, b in release.drain_spans()],
        )
        if chunk.flag_index is not None:
            out.first_unsafe_index = chunk.flag_index
        if action is not Action.CONTINUE:
            category = next((t.verdict.category for t in chunk.tokens if t.action is action), None) or ""
            m.actions.labels("response", action.name, category).inc()
        return pb.ModerateResponse(chunk=out)

    def _final(
        self, stream: ModeratedStream, release: ReleaseTracker, judged: int, interrupted: bool
    ) -> pb.ModerateResponse:
        tail = "" if interrupted else release.finish(interrupted=False)
        final = pb.FinalResponse(
            action=pb.INTERRUPT if interrupted else pb.CONTINUE,
            judged=judged,
            released=release.released,
            released_chars=release.released_chars,
            released_text=tail,
            redactions=[pb.Span(start=a, end=b) for a, b in release.drain_spans()],
        )
        if interrupted:
            category = stream.flag_category or ""
            final.first_unsafe_index = stream.flag_index
            final.category = category
            final.reason = f"interrupted at response token {stream.flag_index} ({category or 'unsafe'})"
            self.metrics.interrupts.labels(category).inc()
        else:
            final.reason = "completed"
        return pb.ModerateResponse(final=final)

    def _final_failed(self, reason: str, release: ReleaseTracker | None) -> pb.ModerateResponse:
        """End of a stream stopped by the fail mode (closed)."""
        self.metrics.interrupts.labels("").inc()
        return pb.ModerateResponse(
            final=pb.FinalResponse(
                action=pb.INTERRUPT,
                reason=reason,
                released=release.released if release else 0,
                released_chars=release.released_chars if release else 0,
            )
        )
