"""Thinking control for Qwen3 thinking models: which response tokens are reasoning and which are
the answer, and when a thinking budget is spent.

A Qwen3 thinking model writes ``<think>\\n...\\n</think>\\n\\n`` and then its answer; with
``enable_thinking=False`` the chat template puts an empty think block in the prompt and every
response token is answer. The ``<think>`` / ``</think>`` ids come from the tokenizer. When the
reasoning reaches the budget before the model closes it, the caller stops the generation and
continues it with ``closing_ids`` appended (the model then answers); ``PhaseTracker`` counts the
inserted ids as reasoning, so the split stays exact.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

REASONING, ANSWER = "reasoning", "answer"
CLOSING_TEXT = "\n</think>\n\n"  # what the service inserts when the budget is spent


@dataclass(frozen=True)
class ThinkTokens:
    open_id: int
    close_id: int
    closing_ids: tuple[int, ...]  # CLOSING_TEXT's ids

    @classmethod
    def of(cls, tokenizer: Any) -> ThinkTokens:
        ids = [tokenizer.convert_tokens_to_ids(t) for t in ("<think>", "</think>")]
        if any(i is None or i == tokenizer.unk_token_id for i in ids):
            raise ValueError("the tokenizer has no <think> / </think> tokens: not a Qwen3 thinking model's")
        closing = tuple(tokenizer.encode(CLOSING_TEXT, add_special_tokens=False))
        return cls(ids[0], ids[1], closing)


class PhaseTracker:
    """Splits the response, token by token, into reasoning and answer and counts both.

    ``thinking``: the model may think (the prompt did not close the think block). Then the
    response is reasoning from its ``<think>`` (or from the start, when the prompt already opened
    the block) through ``</think>``; a response that starts with anything else is all answer."""

    def __init__(self, tokens: ThinkTokens, *, thinking: bool, prompt_opened: bool = False, budget: int = 0) -> None:
        self.tokens = tokens
        self.budget = budget
        self.phase: str | None = REASONING if thinking and prompt_opened else (None if thinking else ANSWER)
        self.reasoning_tokens = 0
        self.answer_tokens = 0

    @property
    def budget_reached(self) -> bool:
        """Still reasoning, with the budget spent: time to close the reasoning."""
        return self.phase == REASONING and self.budget > 0 and self.reasoning_tokens >= self.budget

    def accept(self, ids: list[int]) -> int:
        """How many of ``ids`` fit before the budget is spent (all of them without a budget, or
        once the reasoning is closed); the state is not changed."""
        phase, count = self.phase, self.reasoning_tokens
        for k, tid in enumerate(ids):
            if phase is None:
                phase = REASONING if tid == self.tokens.open_id else ANSWER
            if phase != REASONING:
                return len(ids)
            if self.budget > 0 and count >= self.budget:
                return k
            count += 1
            if tid == self.tokens.close_id:
                phase = ANSWER
        return len(ids)

    def push(self, ids: list[int]) -> list[tuple[str, list[int]]]:
        """``ids`` cut into consecutive (phase, ids) runs, in order."""
        runs: list[tuple[str, list[int]]] = []
        for tid in ids:
            if self.phase is None:  # the first response token decides
                self.phase = REASONING if tid == self.tokens.open_id else ANSWER
            phase = self.phase
            if phase == REASONING:
                self.reasoning_tokens += 1
                if tid == self.tokens.close_id:
                    self.phase = ANSWER
            else:
                self.answer_tokens += 1
            if runs and runs[-1][0] == phase:
                runs[-1][1].append(tid)
            else:
                runs.append((phase, [tid]))
        return runs
