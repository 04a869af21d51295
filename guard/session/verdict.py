"""From probabilities to verdicts, and the debounce rule that decides where a response is
interrupted.

The report's streaming rule: a response is flagged at the first token i where tokens
i-n+1 .. i are all non-safe (n = 2 by default). Which tokens count is the policy's business
(``guard.policy.rules``): those whose action is INTERRUPT.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

import numpy as np

from guard.model.labels import LabelSet, RiskLabels, RiskLevel
from guard.policy.actions import Action


class ControversialMode(enum.Enum):
    STRICT = "strict"  # Controversial counts as unsafe
    LOOSE = "loose"  # Controversial counts as safe


@dataclass(frozen=True)
class Verdict:
    """One judgement: the argmax risk, the category when not safe, and the probabilities.

    Probabilities are kept as the head's vectors (checkpoint label order); the label -> value
    dicts are built only when asked for, so judging a token on the hot path costs no dicts.
    """

    risk: RiskLevel
    risk_label: str  # the checkpoint's own label string
    category: str | None  # None when the risk is Safe: the heads have no "None" category
    risk_vector: np.ndarray = field(repr=False)
    category_vector: np.ndarray = field(repr=False)
    risk_names: tuple[str, ...] = field(repr=False)
    category_names: tuple[str, ...] = field(repr=False)

    @property
    def risk_probs(self) -> dict[str, float]:
        return dict(zip(self.risk_names, self.risk_vector.tolist(), strict=True))

    @property
    def category_probs(self) -> dict[str, float]:
        return dict(zip(self.category_names, self.category_vector.tolist(), strict=True))

    @property
    def risk_probability(self) -> float:
        """Probability of the chosen risk label."""
        return float(self.risk_vector[self.risk_names.index(self.risk_label)])

    @classmethod
    def from_probs(
        cls, risk_labels: RiskLabels, categories: LabelSet, risk_probs: np.ndarray, category_probs: np.ndarray
    ) -> Verdict:
        return cls.many(risk_labels, categories, risk_probs[None], category_probs[None])[0]

    @classmethod
    def many(
        cls, risk_labels: RiskLabels, categories: LabelSet, risk_probs: np.ndarray, category_probs: np.ndarray
    ) -> list[Verdict]:
        """Verdicts for rows ``[T, num_risk]`` / ``[T, num_category]`` with one argmax per array."""
        risk_idx = risk_probs.argmax(axis=1).tolist()
        cat_idx = category_probs.argmax(axis=1).tolist()
        names, levels, cats = risk_labels.labels.names, risk_labels.levels, categories.names
        return [
            cls(
                levels[r],
                names[r],
                None if levels[r] is RiskLevel.SAFE else cats[c],
                risk_probs[i],
                category_probs[i],
                names,
                cats,
            )
            for i, (r, c) in enumerate(zip(risk_idx, cat_idx, strict=True))
        ]


@dataclass(frozen=True)
class TokenVerdict:
    index: int  # position in the response, 0-based
    token_id: int
    verdict: Verdict
    level: RiskLevel  # after the policy's thresholds and strict/loose rule
    action: Action  # the policy's action for this token

    @property
    def counts_unsafe(self) -> bool:
        """Counts toward the interrupt rule."""
        return self.action is Action.INTERRUPT


class DebounceTracker:
    """Remembers the run of non-safe tokens across chunks and the first flagged index."""

    def __init__(self, debounce: int) -> None:
        self.debounce = debounce
        self.run = 0
        self.flag_index: int | None = None  # token at which the rule fired
        self.span_start: int | None = None  # first token of the non-safe run that fired it

    def observe(self, index: int, unsafe: bool) -> bool:
        """Feed one token in order; True exactly when the rule fires at this token."""
        self.run = self.run + 1 if unsafe else 0
        if self.flag_index is None and self.run >= self.debounce:
            self.flag_index = index
            self.span_start = index - self.run + 1
            return True
        return False

    def observe_chunk(self, first_index: int, unsafe: list[bool]) -> int | None:
        """Feed a chunk's tokens at once (``unsafe[i]``: token ``first_index + i`` counts toward
        the rule); the position in the chunk where the rule fires, if it fires in this chunk."""
        if not any(unsafe):
            if unsafe:
                self.run = 0  # the common chunk: nothing counts, the run is broken
            return None
        fired = None
        for i, counts in enumerate(unsafe):
            if self.observe(first_index + i, counts):
                fired = i
        return fired
