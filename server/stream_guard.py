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
import contextlib
import logging
from collections.abc import AsyncIterator, Awaitable, Sequence
from dataclasses import dataclass

import grpc

import guard
from guard.errors import InvalidInput
from guard.policy.actions import Action
from guard.policy.loader import PolicyStore
from guard.policy.rules import Policy, ReleaseDefault
from guard.policy.topics import TopicMatch, TopicMatcher
from guard.runtime import GuardRuntime
from guard.session.audit import AuditContext, AuditTrail
from guard.session.moderation import ModeratedStream
from guard.session.release import ReleaseMode
from guard.session.response_session import ChunkOutcome, Pending, PromptOutcome, ResponseSession
from server.audit import AuditLog
from server.metrics import Metrics
from server.qwen3guard.v1 import guard_pb2 as pb
from server.qwen3guard.v1 import guard_pb2_grpc as pb_grpc
from server.settings import ServeSettings
from server.tenants import current_tenant
from server.tracing import span_sink
from server.wire import ACTION, Unavailable, check_token_detail, error_status, fill_chunk, final_pb, verdict_pb

log = logging.getLogger(__name__)

READ_AHEAD = 64  # chunks submitted to the engine and not yet answered, per stream (backpressure beyond)
DRAIN_AFTER_STOP_S = 5.0  # after an interrupt, how long chunks still in flight are read and dropped


class RuntimeHolder:
    """The runtime once loaded; None while loading and after draining starts."""

    def __init__(self) -> None:
        self.runtime: GuardRuntime | None = None
        self.draining = False

    def ready(self) -> GuardRuntime:
        if self.draining:
            raise Unavailable("the sidecar is draining (shutting down); retry on another replica")
        if self.runtime is None:
            raise Unavailable("the model is still loading; retry shortly")
        return self.runtime


@dataclass
class _Item:
    """One request, read and submitted, for the responder to answer in order."""

    pending: Pending | None = None
    last: bool = False  # close or end of the request stream
    error: BaseException | None = None


class StreamGuardService(pb_grpc.StreamGuardServicer):
    def __init__(
        self,
        holder: RuntimeHolder,
        settings: ServeSettings,
        metrics: Metrics,
        policies: PolicyStore,
        topics: TopicMatcher | None = None,
        audit: AuditLog | None = None,
    ) -> None:
        self.holder = holder
        self.settings = settings
        self.metrics = metrics
        self.policies = policies
        self.topics = topics  # the Embedder's topic matcher; None without the Embedder
        self.audit = audit  # the decision audit log; None when turned off

    def audit_trail(
        self, policy: Policy, request_id: str, front_end: str, *, end_record: bool = True
    ) -> AuditTrail | None:
        """The audit trail of one response (any front end): to the audit log and the call's trace
        span, or None when neither is on. ``end_record=False``: its decisions only (a document
        window of a longer request)."""
        to_span = span_sink()
        if self.audit is None and to_span is None:
            return None
        runtime = self.holder.ready()
        tenant = current_tenant.get()
        context = AuditContext(request_id, front_end, tenant=tenant.name if tenant else "",
                               model=runtime.guard.path.name, model_digest=runtime.digest)  # fmt: skip
        if self.audit is None:
            return AuditTrail(to_span, context, policy, end_record=end_record)
        return self.audit.trail(policy, context, end_record=end_record, also=to_span)

    def topic_check(
        self, policy: Policy, messages: Sequence, prompt_token_ids: Sequence[int] = ()
    ) -> Awaitable[TopicMatch | None] | None:
        """The prompt's topic match for ``judge_prompt`` (any front end), or None when the policy
        has no topics. ``messages`` (anything with ``role`` and ``content``) or the prompt's ids."""
        if not policy.topics or self.topics is None:
            return None
        return self.topics.match(policy, topic_text(self.holder.ready(), messages, prompt_token_ids))

    # ------------------------------------------------------------------------------ Info

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        try:
            runtime = self.holder.ready()
        except Unavailable as exc:
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
        session: ResponseSession | None = None
        reader: asyncio.Task | None = None
        request_id = ""
        code, message = grpc.StatusCode.OK, ""
        ended = False  # `final` was sent: a cancel from here on is the caller hanging up, not an error
        try:
            runtime = self.holder.ready()
            first = await anext(aiter(request_iterator), None)
            if first is None:
                return
            if first.WhichOneof("kind") != "open":
                raise InvalidInput(f"the first message must be `open`, got `{first.WhichOneof('kind') or 'empty'}`")
            opened = first.open
            request_id = opened.request_id
            policy = self._policy_for(opened)
            stream = self._open(runtime, opened, policy)
            session = ResponseSession(
                stream,
                policy,
                requested_release_mode(opened.release_mode, policy),
                runtime.tokenizer.hf,
                draining=lambda: self.holder.draining,
                audit=self.audit_trail(policy, request_id or stream.id, "moderate"),
            )
            self.metrics.live_sessions.set(runtime.engine.live_sessions)
            log.info(
                "event=stream_open session=%s request_id=%s domain=%s policy=%s",
                session.id,
                request_id,
                policy.name,
                policy.version,
            )
            if self.settings.log_content:  # operator opt-in only: the conversation text
                log.info(
                    "event=stream_prompt session=%s messages=%r",
                    session.id,
                    [(m.role, m.content) for m in opened.messages],
                )
            prompt = await session.judge_prompt(self.topic_check(policy, opened.messages, opened.prompt_token_ids))
            self.record_prompt(policy, prompt)
            yield pb.ModerateResponse(prompt=prompt_pb(prompt, policy))
            if prompt.fail_closed:
                self.metrics.interrupts.labels("").inc()
                yield pb.ModerateResponse(final=final_pb(session.final()))
                return
            probabilities = opened.include_probabilities
            detail = opened.token_detail or pb.ALL_TOKENS
            queue: asyncio.Queue[_Item] = asyncio.Queue(maxsize=READ_AHEAD)
            reader = asyncio.create_task(self._read(request_iterator, session, queue))
            while True:
                item = await queue.get()
                if item.error is not None:
                    raise item.error
                outcome = await session.resolve(item.pending) if item.pending is not None else None
                if outcome is not None:
                    self.record_chunk(policy, outcome)
                    response = pb.ModerateResponse()
                    fill_chunk(response.chunk, outcome, probabilities, detail)
                    yield response
                if session.stopped or item.last:
                    final = session.final()
                    if final.interrupted:
                        self.metrics.interrupts.labels(final.category).inc()
                    yield pb.ModerateResponse(final=final_pb(final))
                    ended = True
                    if not item.last:
                        session.close("interrupted")  # its KV slot is free while the caller catches up
                        await _drain_after_stop(queue)
                    return
        except asyncio.CancelledError:
            code = grpc.StatusCode.OK if ended else grpc.StatusCode.CANCELLED
            raise
        except Exception as exc:
            code, message = error_status(exc, request_id=request_id, rpc="StreamGuard.Moderate")
        finally:
            # Synchronous cleanup first: a cancellation arriving at the await below must not
            # skip it (the session's KV slot is freed here, never by the garbage collector).
            if reader is not None:
                reader.cancel()
            if session is not None:
                session.close("ended" if code == grpc.StatusCode.OK else f"ended: {code.name}")
                self.metrics.live_sessions.set(self.holder.runtime.engine.live_sessions if self.holder.runtime else 0)
                log.info("event=stream_end session=%s request_id=%s code=%s", session.id, request_id, code.name)
                if self.settings.log_content:  # operator opt-in only
                    log.info("event=stream_response session=%s text=%r", session.id, session.release.received_text())
            if code != grpc.StatusCode.OK:
                self.metrics.errors.labels(code.name).inc()
            if reader is not None:
                await asyncio.gather(reader, return_exceptions=True)
        if code != grpc.StatusCode.OK:
            await context.abort(code, message)

    def _policy_for(self, opened: pb.OpenRequest) -> Policy:
        """The domain's policy; a caller may tighten debounce or Controversial, never loosen them."""
        if opened.debounce > 64:
            raise InvalidInput(f"open: `debounce` must be <= 64, got {opened.debounce}")
        check_token_detail(opened.token_detail, "open")
        policy = self.policies.get(opened.domain)
        return policy.tightened(debounce=opened.debounce or None, strict=opened.controversial == pb.STRICT)

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
            return runtime.moderator.open(messages=messages, policy=policy, loop=asyncio.get_running_loop())
        return runtime.moderator.open(
            prompt_ids=list(opened.prompt_token_ids), policy=policy, loop=asyncio.get_running_loop()
        )

    async def _read(
        self, requests: AsyncIterator[pb.ModerateRequest], session: ResponseSession, queue: asyncio.Queue[_Item]
    ) -> None:
        """Validate and submit requests as they arrive; the handler answers them in order. The
        queue is bounded: a caller far ahead of its verdicts waits (gRPC flow control)."""
        try:
            async for request in requests:
                kind = request.WhichOneof("kind")
                if kind == "open":
                    raise InvalidInput("a second `open` on a stream that is already open")
                if kind == "close":
                    await queue.put(_Item(session.submit_end(), last=True))
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
                pending = session.submit_text(chunk.text) if chunk.text else session.submit_ids(chunk.token_ids)
                await queue.put(_Item(pending))
            await queue.put(_Item(session.submit_end(), last=True))
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # handed to the handler, which turns it into a status
            await queue.put(_Item(error=exc))

    # ------------------------------------------------------------------------------ shared with other front ends

    def record_prompt(self, policy: Policy, outcome: PromptOutcome) -> None:
        """Metrics and the fail-mode log line of a prompt verdict (any front end)."""
        if outcome.model_failure:
            self._count_failure(policy, "prompt")
            return
        if outcome.reason:  # the topic check failed, fail open
            self._count_failure(policy, "prompt")
        verdict = outcome.verdict
        category = verdict.verdict.category or ""
        self.metrics.verdicts.labels("prompt", verdict.level.name, category).inc()
        self.metrics.actions.labels("prompt", outcome.action.name, category).inc()
        if outcome.topic is not None:
            self.metrics.topic_matches.labels(policy.name, outcome.topic.topic.name, outcome.action.name).inc()
            log.info(
                "event=prompt_topic domain=%s topic=%s similarity=%.3f action=%s",
                policy.name,
                outcome.topic.topic.name,
                outcome.topic.similarity,
                outcome.action.name,
            )

    def record_chunk(self, policy: Policy, outcome: ChunkOutcome) -> None:
        """Metrics of one chunk outcome (any front end): one counter update per kind of verdict
        in the chunk, not one per token."""
        m = self.metrics
        if outcome.model_failure:
            self._count_failure(policy, "response")
        chunk = outcome.verdict
        if chunk is None or not chunk.count:
            return
        for (level, category), count in chunk.verdict_counts().items():
            m.verdict_counter("response", level.name, category).inc(count)
        m.tokens.inc(chunk.count)
        m.chunk_seconds.observe(outcome.queue_s + outcome.compute_s)
        m.queue_seconds.observe(outcome.queue_s)
        action = outcome.action
        if action is not Action.CONTINUE:
            at = chunk.first_with(action)
            m.actions.labels("response", action.name, chunk.category_at(at) if at is not None else "").inc()

    def _count_failure(self, policy: Policy, stage: str) -> None:
        self.metrics.fail_mode.labels(policy.name, policy.fail_mode.value, stage).inc()
        log.warning(
            "event=guard_model_failure domain=%s fail_mode=%s stage=%s", policy.name, policy.fail_mode.value, stage
        )


async def _drain_after_stop(queue: asyncio.Queue[_Item]) -> None:
    """The response was stopped while the caller may still be writing (a pipelining caller has
    chunks in flight). Ending the stream now would make gRPC fail the caller's next write with
    INTERNAL and drop the interrupt and `final` it has not read yet; so what still arrives is
    read and dropped (never judged) until the caller half-closes or hangs up, at most
    DRAIN_AFTER_STOP_S, and the stream then ends OK."""
    with contextlib.suppress(TimeoutError):
        async with asyncio.timeout(DRAIN_AFTER_STOP_S):
            while True:
                item = await queue.get()
                if item.last or item.error is not None:
                    return


def requested_release_mode(requested: int, policy: Policy) -> ReleaseMode:
    """The caller's release mode, or the domain's default when the caller leaves it unset."""
    if requested == pb.OPTIMISTIC:
        return ReleaseMode.OPTIMISTIC
    if requested == pb.HOLD_BACK:
        return ReleaseMode.HOLD_BACK
    return ReleaseMode.OPTIMISTIC if policy.release_mode is ReleaseDefault.OPTIMISTIC else ReleaseMode.HOLD_BACK


def topic_text(runtime: GuardRuntime, messages, prompt_token_ids) -> str:
    """What a prompt's topics are matched against: the last user turn, else the decoded ids."""
    users = [m.content for m in messages if m.role == "user"]
    if users:
        return users[-1]
    return runtime.tokenizer.hf.decode(list(prompt_token_ids), skip_special_tokens=True)


def prompt_pb(outcome: PromptOutcome, policy: Policy) -> pb.PromptVerdict:
    if outcome.verdict is None:  # the fail mode decided
        return pb.PromptVerdict(
            verdict=pb.Verdict(action=ACTION[outcome.action]),
            reason=outcome.model_failure,
            policy_version=policy.version,
        )
    v = outcome.verdict
    out = pb.PromptVerdict(
        verdict=verdict_pb(v.verdict, v.level, outcome.action, True),
        prompt_tokens=v.prompt_tokens,
        timing=pb.Timing(compute_ms=v.compute_s * 1e3),
        policy_version=policy.version,
        reason=outcome.reason,
    )
    if outcome.topic is not None:
        out.topic, out.topic_similarity = outcome.topic.topic.name, outcome.topic.similarity
    return out
