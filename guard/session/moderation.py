"""Moderated streams: a session of the engine plus a domain policy and text-delta input.

This is the API the sidecar's services build on: open a stream with a conversation (or prompt
ids), get the prompt verdict, feed response chunks as ids or text deltas, get per-token
verdicts and the index at which the response is flagged.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import Future, InvalidStateError
from dataclasses import dataclass
from typing import Any

from guard.errors import InvalidInput
from guard.model.engine import ChunkScores, EngineSession, PromptScores, StreamEngine
from guard.model.labels import RiskLevel
from guard.policy.actions import Action
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


@dataclass(frozen=True)
class ChunkVerdict:
    tokens: tuple[TokenVerdict, ...]
    flag_index: int | None  # response index at which the debounce rule fired (this or an earlier chunk)
    span_start: int | None  # first token of the non-safe run that fired it
    newly_flagged: bool  # the rule fired inside this chunk
    unsafe_run: int  # non-safe tokens at the end of this chunk still pending the rule (snapshot)
    queue_s: float
    compute_s: float

    @property
    def action(self) -> Action:
        """INTERRUPT once the rule has fired; else REDACT, FLAG or CONTINUE by the tokens' actions."""
        if self.flag_index is not None:
            return Action.INTERRUPT
        actions = {t.action for t in self.tokens}
        if Action.REDACT in actions:
            return Action.REDACT
        if Action.FLAG in actions or Action.INTERRUPT in actions:
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

    def __init__(
        self, moderator: StreamModerator, session: EngineSession, prompt: Future[PromptScores], policy: Policy
    ) -> None:
        self._moderator = moderator
        self._engine = moderator.engine
        self.session = session
        self.policy = policy
        self._tracker = DebounceTracker(policy.debounce)
        self._text: IncrementalTokenizer | None = None
        self._fed_ids = False
        self.last_submitted_ids: list[int] = []  # ids of the latest feed (text: what the tokenizer released)
        self.flag_category: str | None = None  # category of the token at which the rule fired
        self.prompt: Future[PromptVerdict] = _chain(prompt, self._judge_prompt)

    @property
    def id(self) -> str:
        return self.session.id

    @property
    def flag_index(self) -> int | None:
        return self._tracker.flag_index

    def feed_ids(self, token_ids: Sequence[int]) -> Future[ChunkVerdict]:
        if self._text is not None:
            raise InvalidInput("this stream takes text deltas; do not mix text and token ids in one stream")
        self._fed_ids = True
        return self._submit(token_ids)

    def feed_text(self, delta: str) -> Future[ChunkVerdict]:
        """Judge the stable part of the text so far; the unstable tail waits for more text."""
        return self._submit(self._text_stream().push(delta))

    def end_text(self) -> Future[ChunkVerdict]:
        """The text stream is complete: judge the held-back tail."""
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

    def _submit(self, ids: Sequence[int]) -> Future[ChunkVerdict]:
        future = _chain(self._engine.submit(self.session, ids), self._judge)
        self.last_submitted_ids = list(ids)
        return future

    def _judge_prompt(self, scores: PromptScores) -> PromptVerdict:
        cfg = self._engine.config
        verdict = Verdict.from_probs(cfg.query_risk, cfg.query_categories, scores.risk_probs, scores.category_probs)
        level, action = self.policy.prompt_action(verdict, cfg.query_risk)
        return PromptVerdict(verdict, level, action, scores.prompt_tokens, scores.compute_s)

    def _judge(self, scores: ChunkScores) -> ChunkVerdict:
        """Runs in chunk order (one worker resolves a session's chunks FIFO)."""
        cfg = self._engine.config
        policy = self.policy
        tracker = self._tracker
        fired = False
        tokens = []
        verdicts = Verdict.many(cfg.response_risk, cfg.response_categories, scores.risk_probs, scores.category_probs)
        for i, (tid, verdict) in enumerate(zip(scores.token_ids, verdicts, strict=True)):
            level, action = policy.response_action(verdict, cfg.response_risk)
            index = scores.first_index + i
            if tracker.observe(index, action is Action.INTERRUPT):
                fired = True
                self.flag_category = policy.category_of(verdict)
            tokens.append(TokenVerdict(index, tid, verdict, level, action))
        return ChunkVerdict(
            tuple(tokens), tracker.flag_index, tracker.span_start, fired, tracker.run, scores.queue_s, scores.compute_s
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
        session, prompt = self.engine.open_session(rendered.prompt_ids, rendered.preamble_ids, session_id=session_id)
        return ModeratedStream(self, session, prompt, policy or Policy())
