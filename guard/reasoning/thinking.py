"""Thinking control for Qwen3 thinking models: which response tokens are reasoning and which are
the answer, and when a thinking budget is spent.

A Qwen3 thinking model writes ``<think>\\n...\\n</think>\\n\\n`` and then its answer; with
``enable_thinking=False`` the chat template puts an empty think block in the prompt and every
response token is answer. Some templates (Qwen3 2507 thinking, QwenLong) open the block in the
prompt (``<think>\\n``): the response then starts inside the reasoning. The ``<think>`` /
``</think>`` ids come from the tokenizer. The line breaks that follow ``</think>`` belong to the
reasoning block, so the answer starts with its first real token and an answer judged on its own
sits after an empty think block exactly as the chat template renders one.

When the reasoning reaches the budget before the model closes it, ``closing_ids`` are written into
the response (by the decode loop itself where the backend can, ``BudgetCloser``; otherwise by
stopping and continuing the request); ``PhaseTracker`` counts them as reasoning, so the split stays
exact.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

REASONING, ANSWER = "reasoning", "answer"
CLOSING_TEXT = "\n</think>\n\n"  # what the service inserts when the budget is spent
_SPACES = ("\n", "\n\n")  # what the chat templates put after <think> and </think>


@dataclass(frozen=True)
class ThinkTokens:
    open_id: int
    close_id: int
    closing_ids: tuple[int, ...]  # CLOSING_TEXT's ids
    space_ids: frozenset[int] = frozenset()  # the line-break tokens around the think tags

    @classmethod
    def of(cls, tokenizer: Any) -> ThinkTokens:
        ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<think>", "</think>")]
        if any(i is None or i == tokenizer.unk_token_id for i in ids):
            raise ValueError("the tokenizer has no <think> / </think> tokens: not a Qwen3 thinking model's")
        closing = tuple(tokenizer.encode(CLOSING_TEXT, add_special_tokens=False))
        spaces = [tokenizer.encode(s, add_special_tokens=False) for s in _SPACES]
        return cls(ids[0], ids[1], closing, frozenset(s[0] for s in spaces if len(s) == 1))

    def opened_by(self, prompt_ids: Sequence[int]) -> bool:
        """Whether the prompt leaves a think block open: its last ``<think>`` comes after its last
        ``</think>`` and only line breaks follow it (a generation prompt ending ``<think>\\n``)."""
        for tid in reversed(prompt_ids):
            if tid == self.open_id:
                return True
            if tid not in self.space_ids:
                return False
        return False


@dataclass
class _State:
    phase: str | None  # None: the first response token decides
    reasoning: int = 0
    answer: int = 0
    closed: bool = False  # `</think>` was seen: line breaks still count as reasoning


def _step(state: _State, tid: int, tokens: ThinkTokens) -> str:
    """Move ``state`` over one token; its phase."""
    if state.phase is None:
        state.phase = REASONING if tid == tokens.open_id else ANSWER
    if state.phase == REASONING and state.closed and tid not in tokens.space_ids:
        state.phase = ANSWER
    if state.phase == REASONING:
        state.reasoning += 1
        state.closed = state.closed or tid == tokens.close_id
        return REASONING
    state.answer += 1
    return ANSWER


class PhaseTracker:
    """Splits the response, token by token, into reasoning and answer and counts both.

    ``thinking``: the model may think (the prompt did not close the think block). Then the
    response is reasoning from its ``<think>`` (or from the start, when the prompt already opened
    the block) through ``</think>`` and the line breaks after it; a response that starts with
    anything else is all answer."""

    def __init__(self, tokens: ThinkTokens, *, thinking: bool, prompt_opened: bool = False, budget: int = 0) -> None:
        self.tokens = tokens
        self.budget = budget
        self._state = _State(REASONING if thinking and prompt_opened else (None if thinking else ANSWER))

    @property
    def phase(self) -> str | None:
        return self._state.phase

    @property
    def reasoning_tokens(self) -> int:
        return self._state.reasoning

    @property
    def answer_tokens(self) -> int:
        return self._state.answer

    def copy(self) -> PhaseTracker:
        """An independent tracker in the same state (for a decode loop on another thread)."""
        twin = PhaseTracker(self.tokens, thinking=True, budget=self.budget)
        twin._state = _State(**vars(self._state))
        return twin

    @property
    def budget_reached(self) -> bool:
        """Still reasoning, with the budget spent: time to close the reasoning."""
        s = self._state
        return s.phase == REASONING and not s.closed and self.budget > 0 and s.reasoning >= self.budget

    def accept(self, ids: Sequence[int]) -> int:
        """How many of ``ids`` fit before the budget is spent (all of them without a budget, or
        once the reasoning is closed); the state is not changed."""
        if self.budget <= 0:
            return len(ids)
        state = _State(**vars(self._state))
        for k, tid in enumerate(ids):
            if state.phase == REASONING and not state.closed and state.reasoning >= self.budget:
                return k
            if _step(state, tid, self.tokens) == ANSWER:
                return len(ids)
        return len(ids)

    def push(self, ids: Sequence[int]) -> list[tuple[str, list[int]]]:
        """``ids`` cut into consecutive (phase, ids) runs, in order."""
        runs: list[tuple[str, list[int]]] = []
        for tid in ids:
            phase = _step(self._state, tid, self.tokens)
            if runs and runs[-1][0] == phase:
                runs[-1][1].append(tid)
            else:
                runs.append((phase, [tid]))
        return runs


class BudgetCloser:
    """The thinking budget inside a decode loop that can write into its own response: the loop
    reports every token (``observe``) and asks ``inject`` before each step; once the budget is
    spent, the closing ids come back, and the model answers in the same pass (its KV cache, its
    sampler and any steering hook carry on, as if it had written them itself)."""

    def __init__(self, tracker: PhaseTracker) -> None:
        self.tracker = tracker
        self.closed_at: int | None = None  # response index where the closing ids went in

    def observe(self, token: int) -> None:
        self.tracker.push([token])

    def inject(self) -> list[int] | None:
        if self.closed_at is None and self.tracker.budget_reached:
            self.closed_at = self.tracker.reasoning_tokens + self.tracker.answer_tokens
            return list(self.tracker.tokens.closing_ids)
        return None
