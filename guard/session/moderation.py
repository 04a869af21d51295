"""Moderated streams: a session of the engine plus a domain policy and text-delta input.

This is the API the sidecar's services build on: open a stream with a conversation (or prompt
ids), get the prompt verdict, feed response chunks as ids or text deltas, get per-token
verdicts and the index at which the response is flagged.

Two ways to drive a stream. Synchronous callers (the CLI, tests) use ``feed_*`` and get futures
of finished :class:`ChunkVerdict` objects. The sidecar's event loop opens the stream with its
loop, submits with ``submit_*`` (futures of the engine's scores, settled on the loop) and calls
:meth:`ModeratedStream.judge` itself, in order: a whole chunk is judged at once (the engine
computed the argmaxes for its whole batch; the policy is a lookup table, ``guard.policy.compiled``),
and per-token verdict objects are only built when someone reads ``ChunkVerdict.tokens``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from functools import cached_property
from typing import Any

from guard.delivery import AnyFuture
from guard.errors import InvalidInput
from guard.model.engine import ChunkScores, EngineSession, PromptScores, StreamEngine
from guard.model.labels import LabelSet, RiskLabels, RiskLevel
from guard.policy.actions import Action
from guard.policy.compiled import ACTION_CODE, ACTIONS, ChunkJudgement, CompiledRules
from guard.policy.rules import Policy
from guard.session.verdict import DebounceTracker, TokenVerdict, Verdict
from guard.text.conversation import GuardTokenizer, Message, RenderedPrompt, parse_messages
from guard.text.incremental_tokenizer import IncrementalTokenizer


@dataclass(frozen=True)
class PromptVerdict:
    verdict: Verdict
    level: RiskLevel  # after the policy's thresholds and strict/loose rule
    action: Action  # the policy's prompt action
    prompt_tokens: int
    compute_s: float


_REDACT, _INTERRUPT = ACTION_CODE[Action.REDACT], ACTION_CODE[Action.INTERRUPT]


@dataclass(frozen=True)
class ChunkVerdict:
    """One chunk's verdicts, kept as the judgement's lists; ``tokens`` builds per-token objects
    on demand (the hot path never does)."""

    scores: ChunkScores
    judgement: ChunkJudgement
    flag_index: int | None  # response index at which the debounce rule fired (this or an earlier chunk)
    span_start: int | None  # first token of the non-safe run that fired it
    newly_flagged: bool  # the rule fired inside this chunk
    unsafe_run: int  # non-safe tokens at the end of this chunk still pending the rule (snapshot)
    action: Action  # INTERRUPT once the rule has fired; else REDACT, FLAG or CONTINUE by the tokens' actions
    risk_labels: RiskLabels
    categories: LabelSet

    @property
    def count(self) -> int:
        return len(self.scores.token_ids)

    @property
    def first_index(self) -> int:
        return self.scores.first_index

    @property
    def queue_s(self) -> float:
        return self.scores.queue_s

    @property
    def compute_s(self) -> float:
        return self.scores.compute_s

    @property
    def all_safe(self) -> bool:
        return self.judgement.all_safe

    def redacted(self) -> list[bool] | None:
        """Per token: the policy redacts it; None when no token of the chunk is redacted."""
        actions = self.judgement.action
        if _REDACT not in actions:
            return None
        return [a == _REDACT for a in actions]

    def category_at(self, i: int) -> str:
        """The model's category of the chunk's i-th token, as ``Verdict.category`` has it ("" where
        the model's own risk label is Safe)."""
        s = self.scores
        if self.risk_labels.levels[s.risk_index[i]] is RiskLevel.SAFE:
            return ""
        return self.categories.names[s.category_index[i]]

    def verdict_counts(self) -> dict[tuple[RiskLevel, str], int]:
        """Tokens per (effective level, model category): what the verdict metrics count."""
        j = self.judgement
        if j.all_safe and j.model_safe:
            return {(RiskLevel.SAFE, ""): self.count} if self.count else {}
        counts: dict[tuple[RiskLevel, str], int] = {}
        for i, level in enumerate(j.level):
            key = (RiskLevel(level), self.category_at(i))
            counts[key] = counts.get(key, 0) + 1
        return counts

    def first_with(self, action: Action) -> int | None:
        """The chunk position of the first token with ``action``, if any."""
        code = ACTION_CODE[action]
        actions = self.judgement.action
        return actions.index(code) if code in actions else None

    @cached_property
    def tokens(self) -> tuple[TokenVerdict, ...]:
        """Per-token verdicts, built on first use."""
        s, j = self.scores, self.judgement
        verdicts = Verdict.many(self.risk_labels, self.categories, s.risk_probs, s.category_probs)
        return tuple(
            TokenVerdict(s.first_index + i, tid, verdict, RiskLevel(level), ACTIONS[action])
            for i, (tid, verdict, level, action) in enumerate(
                zip(s.token_ids, verdicts, j.level, j.action, strict=True)
            )
        )


_FLAGGING = frozenset({Action.FLAG, Action.INTERRUPT})


def chunk_action(flag_index: int | None, judgement: ChunkJudgement) -> Action:
    """INTERRUPT once the rule has fired; else REDACT, FLAG or CONTINUE by the tokens' actions."""
    if flag_index is not None:
        return Action.INTERRUPT
    codes = judgement.action[:1] if judgement.all_safe else set(judgement.action)
    actions = {ACTIONS[c] for c in codes}
    if Action.REDACT in actions:
        return Action.REDACT
    if actions & _FLAGGING:
        return Action.FLAG
    return Action.CONTINUE


def _chain(source: Future, convert) -> Future:
    """A future resolving to ``convert(source.result())``; errors propagate. ``convert`` runs even
    when the caller has given up on (cancelled) the result, so per-stream state stays in order."""
    out: Future = Future()

    def done(f: Future) -> None:
        try:
            if f.cancelled():
                out.cancel()
                return
            if f.exception() is not None:
                out.set_exception(f.exception())
                return
            try:
                value = convert(f.result())
            except Exception as exc:
                out.set_exception(exc)
                return
            out.set_result(value)
        except InvalidStateError:  # the caller cancelled `out` (e.g. a fail-mode timeout)
            pass

    source.add_done_callback(done)
    return out


class ModeratedStream:
    """One response under moderation. Feed ids or text, not both."""

    def __init__(self, moderator: StreamModerator, session: EngineSession, prompt: AnyFuture, policy: Policy) -> None:
        self._moderator = moderator
        self._engine = moderator.engine
        cfg = self._engine.config
        self.session = session
        self.policy = policy
        self._rules = CompiledRules(policy, cfg.response_risk, cfg.response_categories)
        self._tracker = DebounceTracker(policy.debounce)
        self._text: IncrementalTokenizer | None = None
        self._fed_ids = False
        self.last_submitted_ids: list[int] = []  # ids of the latest feed (text: what the tokenizer released)
        self.flag_category: str | None = None  # category of the token at which the rule fired
        self.prompt_scores = prompt  # the engine's future (of the stream's loop, when opened with one)
        self.prompt_ids: tuple[int, ...] = ()  # what the prompt verdict judged (the audit hashes its text)

    @property
    def id(self) -> str:
        return self.session.id

    @property
    def flag_index(self) -> int | None:
        return self._tracker.flag_index

    @cached_property
    def prompt(self) -> Future[PromptVerdict]:
        """The prompt verdict, for synchronous callers."""
        return _chain(self.prompt_scores, self.judge_prompt)

    # ------------------------------------------------------------------ synchronous callers

    def feed_ids(self, token_ids: Sequence[int]) -> Future[ChunkVerdict]:
        return _chain(self.submit_ids(token_ids), self.judge)

    def feed_text(self, delta: str) -> Future[ChunkVerdict]:
        """Judge the stable part of the text so far; the unstable tail waits for more text."""
        return _chain(self.submit_text(delta), self.judge)

    def end_text(self) -> Future[ChunkVerdict]:
        """The text stream is complete: judge the held-back tail."""
        return _chain(self.submit_end(), self.judge)

    # ------------------------------------------------------------------ submit, then judge in order

    def submit_ids(self, token_ids: Sequence[int]) -> AnyFuture:
        """Hand ids to the engine; the future gives their ChunkScores, for :meth:`judge`."""
        if self._text is not None:
            raise InvalidInput("this stream takes text deltas; do not mix text and token ids in one stream")
        self._fed_ids = True
        return self._submit(token_ids)

    def submit_text(self, delta: str) -> AnyFuture:
        """Hand the stable part of the text so far to the engine (see :meth:`submit_ids`)."""
        return self._submit(self._text_stream().push(delta))

    def submit_end(self) -> AnyFuture:
        """The text stream is complete: hand the held-back tail to the engine."""
        return self._submit(self._text_stream().finish())

    @property
    def pending_text(self) -> str:
        return self._text.pending_text if self._text is not None else ""

    @property
    def text_finished(self) -> bool:
        return self._text is not None and self._text.finished

    def take_pending_ids(self) -> list[int]:
        """End the text stream without judging its held-back tail (fail open); its ids."""
        if self._text is None or self._text.finished:
            return []
        ids = self._text.finish()
        self.last_submitted_ids = ids
        return ids

    @property
    def text_mode(self) -> bool:
        """True once text deltas were fed (the stream then needs ``end_text`` at the end)."""
        return self._text is not None

    def close(self, reason: str = "closed") -> None:
        self._engine.close(self.session, reason)

    def _text_stream(self) -> IncrementalTokenizer:
        if self._fed_ids:
            raise InvalidInput("this stream takes token ids; do not mix text and token ids in one stream")
        if self._text is None:
            self._text = IncrementalTokenizer(self._moderator.tokenizer.hf)
        return self._text

    def _submit(self, ids: Sequence[int]) -> AnyFuture:
        future = self._engine.submit(self.session, ids)
        self.last_submitted_ids = list(ids)
        return future

    def judge_prompt(self, scores: PromptScores) -> PromptVerdict:
        cfg = self._engine.config
        verdict = Verdict.from_probs(cfg.query_risk, cfg.query_categories, scores.risk_probs, scores.category_probs)
        level, action = self.policy.prompt_action(verdict, cfg.query_risk)
        return PromptVerdict(verdict, level, action, scores.prompt_tokens, scores.compute_s)

    def judge(self, scores: ChunkScores) -> ChunkVerdict:
        """The chunk's verdicts. Call it once per chunk, in submission order: the debounce rule
        carries its run of non-safe tokens from one chunk to the next."""
        tracker = self._tracker
        judgement = self._rules.judge(scores.risk_probs, scores.risk_index, scores.category_index)
        cfg = self._engine.config
        at = tracker.observe_chunk(scores.first_index, [a == _INTERRUPT for a in judgement.action])
        if at is not None:
            self.flag_category = cfg.response_categories.names[scores.category_index[at]]
        return ChunkVerdict(
            scores,
            judgement,
            tracker.flag_index,
            tracker.span_start,
            at is not None,
            tracker.run,
            chunk_action(tracker.flag_index, judgement),
            cfg.response_risk,
            cfg.response_categories,
        )


class StreamModerator:
    """Opens moderated streams on an engine with the checkpoint's tokenizer and chat template."""

    def __init__(self, engine: StreamEngine, tokenizer: GuardTokenizer) -> None:
        self.engine = engine
        self.tokenizer = tokenizer
        if tokenizer.vocab_size > engine.config.vocab_size:
            raise InvalidInput(
                f"the tokenizer has {tokenizer.vocab_size} tokens but the model only {engine.config.vocab_size}"
            )

    def render(self, messages: Sequence[dict[str, Any] | Message]) -> RenderedPrompt:
        return self.tokenizer.render_prompt(parse_messages(messages))

    def open(
        self,
        *,
        messages: Sequence[dict[str, Any] | Message] | None = None,
        prompt_ids: Sequence[int] | None = None,
        preamble_ids: Sequence[int] = (),
        policy: Policy | None = None,
        session_id: str | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> ModeratedStream:
        """Open with a conversation ending in a user turn, or with prompt ids ending in ``<|im_end|>``.

        With messages, the assistant preamble of the template (``<|im_start|>assistant`` and the
        empty think block) is cached after the prompt, so the response ids fed next are exactly
        what the generator emits. With ids, every token after the prompt is the caller's, except
        ``preamble_ids`` (the assistant header a generator was prompted with), which is cached unjudged.
        """
        if (messages is None) == (prompt_ids is None):
            raise InvalidInput("open a stream with either messages or prompt token ids, not both or neither")
        if messages is not None:
            rendered = self.render(messages)
        else:
            ids = tuple(prompt_ids)
            if not ids or ids[-1] != self.tokenizer.im_end_id:
                raise InvalidInput(
                    "prompt token ids must end with the <|im_end|> token "
                    f"(id {self.tokenizer.im_end_id}) that closes the last user turn"
                )
            rendered = RenderedPrompt(ids, tuple(preamble_ids))
        session, prompt = self.engine.open_session(
            rendered.prompt_ids, rendered.preamble_ids, session_id=session_id, loop=loop
        )
        stream = ModeratedStream(self, session, prompt, policy or Policy())
        stream.prompt_ids = rendered.prompt_ids
        return stream
