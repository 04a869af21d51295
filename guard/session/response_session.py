"""One response under moderation, transport-free: the one state machine every service drives.

StreamGuard.Moderate, GuardedGeneration.Generate and every later front end (Reasoner, ParScale,
the Envoy processor) hand response chunks to a :class:`ResponseSession` and turn its outcomes
into their own wire messages. The session owns, for one response:

- judging: chunks (token ids or text deltas) go to the stream engine through the moderated
  stream (debounce, thresholds, categories come from the domain policy);
- release: what may be shown and when (HOLD_BACK / OPTIMISTIC), redaction spans, the released
  text (special tokens never appear in it), ids and counters;
- the fail mode: the model failing (too slow, a failed step, gone) applies the policy's
  ``fail_mode``; a caller's own fault (an idle session that expired, a limit) does NOT: it raises
  the engine's error, and the front end ends the stream with a status.

Submitting and resolving are separate so a front end can pipeline: ``submit_*`` hands a chunk to
the engine at once (synchronous, in arrival order), ``resolve`` awaits its scores, judges them
(in the same order; a whole chunk at once) and says what to release. Open the stream with the
running loop (``StreamModerator.open(loop=...)``) so the engine settles its futures on the loop
in one hand-off per step; a stream opened without one works too, through thread-safe futures.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from guard.delivery import AnyFuture
from guard.errors import EngineStopped, ModelFailed
from guard.policy.actions import PROMPT_ACTIONS, Action
from guard.policy.rules import FailMode, Policy
from guard.policy.topics import TopicMatch
from guard.session.audit import AuditTrail
from guard.session.metering import TokenMeter, current_meter
from guard.session.moderation import ChunkVerdict, ModeratedStream, PromptVerdict
from guard.session.release import ReleaseMode, ReleaseTracker
from guard.session.verdict import TokenVerdict


@dataclass(frozen=True)
class PromptOutcome:
    """The prompt's verdict and action; ``verdict`` is None when the model failed (fail mode)."""

    verdict: PromptVerdict | None
    action: Action
    model_failure: str = ""  # why the fail mode applied ("" when the model answered)
    topic: TopicMatch | None = None  # the policy topic the prompt falls under (the Embedder)
    reason: str = ""  # the model answered but the topic check failed and the policy fails open

    @property
    def blocked(self) -> bool:
        return self.action is Action.BLOCK

    @property
    def fail_closed(self) -> bool:
        """The model failed and the policy fails closed: the stream ends here."""
        return bool(self.model_failure) and self.action is Action.BLOCK


@dataclass
class Pending:
    """One submitted chunk, waiting to be resolved (in submission order)."""

    future: AnyFuture | None  # the engine's ChunkScores
    arrived_text: str = ""  # released on arrival (OPTIMISTIC)
    unjudged_text: str | None = None  # fail open, text path: the delta goes out as it came
    failure: str = ""  # the model had already failed when it was submitted
    end: bool = False  # the end of the response (a text stream's tail, or nothing)


@dataclass(frozen=True)
class ChunkOutcome:
    """What one chunk's verdict means for the caller."""

    action: Action
    verdict: ChunkVerdict | None  # the chunk's verdicts (None when nothing was judged: fail mode)
    released_text: str  # newly released text
    released_ids: tuple[int, ...]  # newly released token ids (the guard tokenizer's)
    released: int  # cumulative released tokens
    released_chars: int  # cumulative released characters
    judged: int  # response tokens judged so far
    received: int  # response tokens received so far
    flag_index: int | None = None
    redactions: tuple[tuple[int, int], ...] = ()
    unjudged: bool = False  # released without a verdict (fail open)
    reason: str = ""
    model_failure: str = ""  # set when the fail mode applied in this chunk
    queue_s: float = 0.0
    compute_s: float = 0.0

    @property
    def interrupted(self) -> bool:
        return self.action is Action.INTERRUPT

    @property
    def tokens(self) -> tuple[TokenVerdict, ...]:
        """Per-token verdicts (built on first use; the hot path reads ``verdict``'s lists)."""
        return self.verdict.tokens if self.verdict is not None else ()


@dataclass(frozen=True)
class FinalOutcome:
    """How the response ended."""

    interrupted: bool
    reason: str
    judged: int
    released: int
    released_chars: int
    released_text: str = ""  # the tail released at the end
    released_ids: tuple[int, ...] = ()
    redactions: tuple[tuple[int, int], ...] = ()
    flag_index: int | None = None  # set when the debounce rule fired
    category: str = ""
    withheld: int = 0  # received tokens never released (interrupt, fail closed)


UNJUDGED_REASON = "released unjudged: the guard model failed earlier in this stream (fail open)"


@dataclass
class _State:
    judged: int = 0
    ids_mark: int = 0  # released ids already handed out
    degraded: bool = False  # fail open happened: the rest is released unjudged
    failure: str = ""  # fail closed happened: the reason
    interrupted: bool = False
    ended: bool = False


class ResponseSession:
    """Judging, release, redaction, debounce and fail mode of one response (see the module doc)."""

    def __init__(
        self,
        stream: ModeratedStream,
        policy: Policy,
        mode: ReleaseMode,
        hf_tokenizer: Any,
        *,
        draining: Callable[[], bool] = lambda: False,
        audit: AuditTrail | None = None,
        meter: TokenMeter | None = None,
    ) -> None:
        self.stream = stream
        self._meter = meter if meter is not None else current_meter.get()  # the caller's token limit
        self.policy = policy
        self.release = ReleaseTracker(mode, hf_tokenizer, policy.redact_marker)
        self._hf = hf_tokenizer
        self._draining = draining
        self._state = _State()
        self.audit = audit  # decisions and the end written to the audit log (no text)
        self._prompt_action: Action | None = None
        self._fail_open = ""

    # ------------------------------------------------------------------ state

    @property
    def id(self) -> str:
        return self.stream.id

    @property
    def mode(self) -> ReleaseMode:
        return self.release.mode

    @property
    def judged(self) -> int:
        return self._state.judged

    @property
    def degraded(self) -> bool:
        return self._state.degraded

    @property
    def stopped(self) -> bool:
        """Interrupted (by the rule or by fail closed): nothing more is released."""
        return self._state.interrupted

    @property
    def flag_index(self) -> int | None:
        return self.stream.flag_index

    def mark_boundary(self, index: int) -> None:
        """Response token ``index`` starts a new part (the answer after a reasoning trace); see
        ``boundary_chars``."""
        self.release.set_boundary(index)

    @property
    def boundary_chars(self) -> int | None:
        """Released characters before the marked boundary, once a release has reached it (None
        before): text released across the boundary splits there."""
        return self.release.boundary_chars

    def close(self, reason: str = "closed") -> None:
        """Free the engine session (idempotent); every front end calls it in ``finally``."""
        self.stream.close(reason)
        if self.audit is not None and not self.audit.ended:
            state, release = self._state, self.release
            if self._prompt_action is Action.BLOCK:
                outcome = "blocked"
            elif state.failure:
                outcome = "fail_closed"
            elif state.interrupted:
                outcome = "interrupted" if self.stream.flag_index is not None else "withheld"
            elif state.degraded or self._fail_open:
                outcome = "fail_open"
            else:
                outcome = "completed" if state.ended else "ended early"
            self.audit.end(outcome, reason, state.judged, release.released, release.received - release.released,
                           state.failure or self._fail_open, release.received_text)  # fmt: skip

    def fail_open(self, reason: str) -> None:
        """The front end released what it had unjudged or partly judged (the upstream failed and
        the policy fails open): recorded as a fail-mode decision."""
        self._fail_open = reason
        if self.audit is not None:
            self.audit.failure("response", Action.CONTINUE, reason)

    # ------------------------------------------------------------------ prompt

    async def judge_prompt(self, topic: Awaitable[TopicMatch | None] | None = None) -> PromptOutcome:
        """The prompt's verdict and action. ``topic`` (the policy's topic match, computed by the
        Embedder) runs beside the model; the stricter action wins. The Embedder failing or being
        too slow is a model failure too: the policy's fail mode decides. The prompt's tokens count
        against the caller's token limit like the response's (RateLimited when it is in debt)."""
        if self._meter is not None:
            self._meter.admit()
            self._meter.charge(len(self.stream.prompt_ids))
        outcome = await self._judge_prompt(topic)
        self._prompt_action = outcome.action
        if self.audit is not None:
            v = outcome.verdict
            category = (v.verdict.category if v is not None else "") or ""
            if not category and outcome.topic is not None:
                category = outcome.topic.topic.name
            risk = v.level.name if v is not None else ""
            failure = outcome.model_failure or outcome.reason
            self.audit.prompt(outcome.action, category, risk, failure, self._prompt_text)
        return outcome

    def _prompt_text(self) -> str:
        return self._hf.decode(self.stream.prompt_ids)

    async def _judge_prompt(self, topic: Awaitable[TopicMatch | None] | None) -> PromptOutcome:
        matching = asyncio.ensure_future(topic) if topic is not None else None
        try:
            verdict = self.stream.judge_prompt(await self._await(self.stream.prompt_scores))
            match = await self._topic(matching) if matching is not None else None
        except _ModelFailure as failure:
            if matching is not None and not matching.done():
                matching.cancel()
                await asyncio.gather(matching, return_exceptions=True)
            closed = self.policy.fail_mode is FailMode.CLOSED
            reason = f"{failure}; fail {self.policy.fail_mode.value}"
            if closed:
                self._state.failure = reason
                self._state.interrupted = True
                return PromptOutcome(None, Action.BLOCK, reason)
            if matching is None or not failure.topic:  # the guard model itself failed
                self._state.degraded = True
                return PromptOutcome(None, Action.ALLOW, reason)
            return PromptOutcome(verdict, verdict.action, reason=reason)  # fail open on the topic check only
        action = verdict.action
        if match is not None and PROMPT_ACTIONS.index(match.action) > PROMPT_ACTIONS.index(action):
            action = match.action
        return PromptOutcome(verdict, action, topic=match)

    async def _topic(self, matching: asyncio.Future) -> TopicMatch | None:
        timeout = self.policy.model_timeout_ms / 1000
        try:
            return await asyncio.wait_for(matching, timeout)
        except TimeoutError:
            raise _ModelFailure(
                f"the topic check (Embedder) did not answer within {self.policy.model_timeout_ms} ms", topic=True
            ) from None
        except Exception as exc:  # the Embedder failed, is full or shutting down: a model failure
            raise _ModelFailure(f"the topic check (Embedder) failed ({exc})", topic=True) from None

    # ------------------------------------------------------------------ submit (arrival order)

    def submit_ids(self, token_ids: Sequence[int]) -> Pending:
        if self._state.interrupted:  # stopped: what still arrives is dropped, never judged
            return Pending(None)
        ids = list(token_ids)
        if self._state.degraded:
            return Pending(None, arrived_text=self.release.receive(ids))
        if self._meter is not None:
            self._meter.admit()
        try:
            future = self.stream.submit_ids(ids)
        except (ModelFailed, EngineStopped) as exc:
            failure = self._failure_of(exc)
            return Pending(None, arrived_text=self.release.receive(ids), failure=failure)
        if self._meter is not None:
            self._meter.charge(len(ids))
        return Pending(future, arrived_text=self.release.receive(ids))

    def submit_text(self, text: str) -> Pending:
        if self._state.interrupted:
            return Pending(None)
        if self._state.degraded:
            return Pending(None, unjudged_text=text)
        if self._meter is not None:
            self._meter.admit()
        try:
            future = self.stream.submit_text(text)
        except (ModelFailed, EngineStopped) as exc:
            return Pending(None, unjudged_text=text, failure=self._failure_of(exc))
        if self._meter is not None:
            self._meter.charge(len(self.stream.last_submitted_ids))
        return Pending(future, arrived_text=self.release.receive(self.stream.last_submitted_ids, text))

    def submit_end(self) -> Pending:
        """The response is complete: a text stream's held-back tail is judged (ids: nothing to do)."""
        if self._state.interrupted or self._state.degraded or not self.stream.text_mode:
            return Pending(None, end=True)
        try:
            future = self.stream.submit_end()
        except (ModelFailed, EngineStopped) as exc:
            return Pending(None, failure=self._failure_of(exc), end=True)
        self.release.receive(self.stream.last_submitted_ids, "")
        return Pending(future, end=True)

    def _failure_of(self, exc: Exception) -> str:
        if isinstance(exc, EngineStopped) and self._draining():
            raise exc
        return f"the guard model is unavailable ({exc})"

    # ------------------------------------------------------------------ resolve (same order)

    async def resolve(self, pending: Pending) -> ChunkOutcome | None:
        """The chunk's outcome; None when there is nothing to report (an id stream's end, or the
        response was already stopped). Raises the engine's error for a caller's fault (expired
        session, limits): the front end ends the stream with its status."""
        outcome = await self._resolve(pending)
        if self.audit is not None and outcome is not None:
            self._audit_chunk(outcome)
        return outcome

    def _audit_chunk(self, outcome: ChunkOutcome) -> None:
        """The chunk's decision: the token it concerns (where the rule fired, or the first token
        with the action), its category, and the SHA-256 of the chunk's judged text."""
        if outcome.action in (Action.CONTINUE, Action.ALLOW) and not outcome.model_failure:
            return  # the common chunk: nothing to record (the per-token path pays one comparison)
        v = outcome.verdict
        if v is None:  # the fail mode decided
            self.audit.chunk(outcome.action, "", None, outcome.judged, outcome.model_failure, lambda: "")
            return
        if outcome.interrupted:
            offset, category = outcome.flag_index, self.stream.flag_category or ""
        else:
            wanted = (Action.FLAG, Action.INTERRUPT) if outcome.action is Action.FLAG else (outcome.action,)
            positions = [p for a in wanted if (p := v.first_with(a)) is not None]
            position = min(positions) if positions else None
            offset = v.first_index + position if position is not None else None
            category = v.category_at(position) if position is not None else ""
        ids = list(v.scores.token_ids)
        self.audit.chunk(outcome.action, category, offset, outcome.judged, outcome.model_failure,
                         lambda: self._hf.decode(ids))  # fmt: skip

    async def _resolve(self, pending: Pending) -> ChunkOutcome | None:
        if self._state.interrupted:
            return None
        if pending.failure:
            return self._model_failed(pending.failure, pending)
        if pending.future is None and pending.end:
            return None  # an id stream's end, or a degraded stream's: nothing left to judge
        if pending.future is None or self._state.degraded:
            return self._unjudged(pending, "")
        try:
            scores = await self._await(pending.future)
        except _ModelFailure as failure:
            return self._model_failed(str(failure), pending)
        return self._judged(self.stream.judge(scores), pending)

    async def _await(self, future: AnyFuture) -> Any:
        """The engine's answer within the policy's timeout; _ModelFailure when the model failed."""
        timeout = self.policy.model_timeout_ms / 1000
        if not isinstance(future, asyncio.Future):
            future = asyncio.wrap_future(future)
        try:
            if future.done():  # pipelined chunks are often judged before they are awaited: no timer
                return future.result()
            return await asyncio.wait_for(future, timeout)
        except TimeoutError:
            raise _ModelFailure(f"the guard model did not answer within {self.policy.model_timeout_ms} ms") from None
        except ModelFailed as exc:
            raise _ModelFailure(f"the guard model failed ({exc})") from None
        except EngineStopped as exc:
            if self._draining():
                raise
            raise _ModelFailure(f"the guard model is unavailable ({exc})") from None

    def _judged(self, chunk: ChunkVerdict, pending: Pending) -> ChunkOutcome:
        state, release = self._state, self.release
        if chunk.count:
            state.judged = chunk.first_index + chunk.count
        release.mark_chunk(chunk.count, chunk.redacted())
        action = chunk.action
        text = pending.arrived_text + release.judged(state.judged, chunk.unsafe_run, chunk.span_start)
        if action is Action.INTERRUPT:
            state.interrupted = True
            text += release.finish(interrupted=True)
        return ChunkOutcome(
            action=action,
            verdict=chunk,
            released_text=text,
            released_ids=self._new_ids(),
            released=release.released,
            released_chars=release.released_chars,
            judged=state.judged,
            received=release.received,
            flag_index=chunk.flag_index,
            redactions=tuple(release.drain_spans()),
            queue_s=chunk.queue_s,
            compute_s=chunk.compute_s,
        )

    def _model_failed(self, why: str, pending: Pending) -> ChunkOutcome:
        """Closed: interrupt with the reason. Open: release what was received, unjudged, from now on."""
        reason = f"{why}; fail {self.policy.fail_mode.value}"
        if self.policy.fail_mode is FailMode.CLOSED:
            self._state.failure = reason
            self._state.interrupted = True
            return ChunkOutcome(
                action=Action.INTERRUPT,
                verdict=None,
                released_text=pending.arrived_text,
                released_ids=self._new_ids(),
                released=self.release.released,
                released_chars=self.release.released_chars,
                judged=self._state.judged,
                received=self.release.received,
                reason=reason,
                model_failure=reason,
            )
        self._state.degraded = True
        return self._unjudged(pending, reason, model_failure=reason)

    def _unjudged(self, pending: Pending, reason: str, model_failure: str = "") -> ChunkOutcome:
        release = self.release
        text = pending.arrived_text + self._flush_text_stream()
        if pending.unjudged_text is not None:
            text += release.release_unjudged_text(pending.unjudged_text)
        else:
            text += release.release_received()
        return ChunkOutcome(
            action=Action.CONTINUE,
            verdict=None,
            released_text=text,
            released_ids=self._new_ids(),
            released=release.released,
            released_chars=release.released_chars,
            judged=self._state.judged,
            received=release.received,
            unjudged=True,
            reason=reason or UNJUDGED_REASON,
            model_failure=model_failure,
        )

    def _flush_text_stream(self) -> str:
        """Fail open on a text stream: the tokenizer's held-back text goes out with the rest."""
        if not self.stream.text_mode or self.stream.text_finished:
            return ""
        echoed = self.mode is ReleaseMode.OPTIMISTIC  # its text went out on arrival
        self.release.receive(self.stream.take_pending_ids(), "" if echoed else None)
        return self.release.release_received()

    def _new_ids(self) -> tuple[int, ...]:
        ids = self.release.released_ids(self._state.ids_mark)
        self._state.ids_mark = self.release.released
        return tuple(ids)

    # ------------------------------------------------------------------ end

    def final(self) -> FinalOutcome:
        """How the response ended: interrupted (the rule or fail closed), or completed (the
        unfinished non-safe run and any partial character are released)."""
        state, release = self._state, self.release
        if state.ended:
            raise RuntimeError("final() was already called for this response")
        state.ended = True
        withheld = release.received - release.released
        if state.interrupted:
            spans = tuple(release.drain_spans())
            if state.failure:
                return FinalOutcome(
                    True,
                    state.failure,
                    state.judged,
                    release.released,
                    release.released_chars,
                    redactions=spans,
                    withheld=withheld,
                )
            index = self.stream.flag_index
            category = self.stream.flag_category or ""
            return FinalOutcome(
                True,
                f"interrupted at response token {index} ({category or 'unsafe'})",
                state.judged,
                release.released,
                release.released_chars,
                redactions=spans,
                flag_index=index,
                category=category,
                withheld=withheld,
            )
        tail = release.finish(interrupted=False)
        return FinalOutcome(
            False,
            "completed",
            state.judged,
            release.released,
            release.released_chars,
            released_text=tail,
            released_ids=self._new_ids(),
            redactions=tuple(release.drain_spans()),
        )

    def withhold(self, reason: str) -> FinalOutcome:
        """End without releasing what is held back (the upstream failed and the policy fails closed)."""
        state, release = self._state, self.release
        state.ended = state.interrupted = True
        state.failure = state.failure or reason
        if self.audit is not None:
            self.audit.failure("response", Action.INTERRUPT, reason)
        return FinalOutcome(
            True,
            reason,
            state.judged,
            release.released,
            release.released_chars,
            redactions=tuple(release.drain_spans()),
            withheld=release.received - release.released,
        )


class _ModelFailure(Exception):
    """The guard model did not answer in time, or failed; the policy's fail mode applies."""

    def __init__(self, message: str, *, topic: bool = False) -> None:
        super().__init__(message)
        self.topic = topic  # the topic check (Embedder), not the guard model
