"""A domain's policy, compiled: verdicts -> actions for the prompt and for each response token.

- Risk level of a position: with thresholds, Unsafe if p(Unsafe) >= ``unsafe_threshold``, else
  Controversial if p(Controversial) >= ``controversial_threshold``, else Safe; without them,
  the argmax. Strict mode then counts Controversial as Unsafe (the report's strict metric);
  loose mode keeps it Controversial, which gets its own action (FLAG by default, never an
  interrupt unless the policy says so).
- Action: a per-category override when the position is not safe, else the risk level's action.
- The response is interrupted at the first token where ``debounce`` consecutive tokens have the
  INTERRUPT action; REDACT tokens are replaced by ``redact_marker`` in what is released.
- ``fail_mode``: what happens when the model is unavailable or slower than ``model_timeout_ms``.
- ``moderate_reasoning``: the Reasoner judges a thinking model's reasoning trace as well as its
  answer (default), or only the answer (Qwen3Guard is less timely on thinking traces).
"""

from __future__ import annotations

import enum
from collections.abc import Mapping
from dataclasses import dataclass, field

import numpy as np

from guard.model.labels import RiskLabels, RiskLevel
from guard.policy.actions import Action
from guard.session.verdict import ControversialMode, Verdict


class FailMode(enum.Enum):
    OPEN = "open"  # keep streaming unjudged, count it
    CLOSED = "closed"  # interrupt the response / block the prompt, with a reason


class ReleaseDefault(enum.Enum):
    HOLD_BACK = "hold_back"
    OPTIMISTIC = "optimistic"


# Stream-checkpoint short names and Generative long names mean the same category.
CATEGORY_ALIASES = {
    "sexual content or sexual acts": "sexual content",
    "suicide & self-harm": "self-harm",
    "politically sensitive topics": "political",
    "copyright violation": "copyright",
    "non-violent illegal acts": "illegal acts",
    "unethical acts": "unethical",
}


def category_key(name: str) -> str:
    key = name.strip().casefold()
    return CATEGORY_ALIASES.get(key, key)


@dataclass(frozen=True)
class Topic:
    """A named topic: a prompt whose embedding is within ``threshold`` (cosine similarity) of any
    example gets ``action`` (BLOCK or FLAG), unless the model's verdict is stricter."""

    name: str
    action: Action
    threshold: float
    examples: tuple[str, ...]
    description: str = ""


@dataclass(frozen=True)
class Policy:
    name: str = "builtin"
    description: str = ""
    prompt_actions: Mapping[RiskLevel, Action] = field(
        default_factory=lambda: {
            RiskLevel.SAFE: Action.ALLOW,
            RiskLevel.CONTROVERSIAL: Action.FLAG,
            RiskLevel.UNSAFE: Action.BLOCK,
        }
    )
    response_actions: Mapping[RiskLevel, Action] = field(
        default_factory=lambda: {
            RiskLevel.SAFE: Action.CONTINUE,
            RiskLevel.CONTROVERSIAL: Action.FLAG,
            RiskLevel.UNSAFE: Action.INTERRUPT,
        }
    )
    prompt_category_actions: Mapping[str, Action] = field(default_factory=dict)  # category_key -> action
    response_category_actions: Mapping[str, Action] = field(default_factory=dict)
    unsafe_threshold: float | None = None
    controversial_threshold: float | None = None
    controversial: ControversialMode = ControversialMode.STRICT
    debounce: int = 2
    release_mode: ReleaseDefault = ReleaseDefault.HOLD_BACK
    redact_marker: str = "[REDACTED]"
    fail_mode: FailMode = FailMode.CLOSED
    model_timeout_ms: int = 2000
    moderate_reasoning: bool = True  # the Reasoner: judge the reasoning trace too, not only the answer
    topics: tuple[Topic, ...] = ()
    source: str = ""  # file the policy came from
    version: str = ""  # content hash of the effective policy

    def __post_init__(self) -> None:
        if self.debounce < 1:
            raise ValueError(f"`debounce` must be >= 1, got {self.debounce}")

    # ------------------------------------------------------------------ evaluation

    def decide(
        self, stage: str, level: RiskLevel, category: str | None, probs: Mapping[RiskLevel, float] | None = None
    ) -> tuple[RiskLevel, Action]:
        """Effective risk level and action for one position of ``stage`` ("prompt" or "response")."""
        if probs is not None and (self.unsafe_threshold is not None or self.controversial_threshold is not None):
            level = self._thresholded(probs)
        if level is RiskLevel.CONTROVERSIAL and self.controversial is ControversialMode.STRICT:
            level = RiskLevel.UNSAFE
        actions, overrides = (
            (self.prompt_actions, self.prompt_category_actions)
            if stage == "prompt"
            else (self.response_actions, self.response_category_actions)
        )
        if level is RiskLevel.SAFE:
            return level, actions[RiskLevel.SAFE]
        override = overrides.get(category_key(category)) if category else None
        return level, override or actions[level]

    def thresholded(self, level: RiskLevel, probs: Mapping[RiskLevel, float]) -> RiskLevel:
        """The model's level under this policy's thresholds (its own label without thresholds),
        before the strict/loose rule: what an evaluation scores, strict and loose."""
        if self.unsafe_threshold is None and self.controversial_threshold is None:
            return level
        return self._thresholded(probs)

    def _thresholded(self, probs: Mapping[RiskLevel, float]) -> RiskLevel:
        unsafe_t = 0.5 if self.unsafe_threshold is None else self.unsafe_threshold
        if probs.get(RiskLevel.UNSAFE, 0.0) >= unsafe_t:
            return RiskLevel.UNSAFE
        contro = probs.get(RiskLevel.CONTROVERSIAL, 0.0)
        if self.controversial_threshold is not None and contro >= self.controversial_threshold:
            return RiskLevel.CONTROVERSIAL
        return RiskLevel.SAFE

    @staticmethod
    def category_of(verdict: Verdict) -> str:
        """The verdict's category, or the category head's argmax when the risk became non-safe by threshold."""
        return verdict.category or verdict.category_names[int(np.argmax(verdict.category_vector))]

    def _judge(self, stage: str, verdict: Verdict, labels: RiskLabels) -> tuple[RiskLevel, Action]:
        if self.unsafe_threshold is None and self.controversial_threshold is None:  # the per-token fast path
            return self.decide(stage, verdict.risk, verdict.category)
        probs = {level: float(verdict.risk_vector[i]) for i, level in enumerate(labels.levels)}
        return self.decide(stage, verdict.risk, self.category_of(verdict), probs)

    def prompt_action(self, verdict: Verdict, labels: RiskLabels) -> tuple[RiskLevel, Action]:
        return self._judge("prompt", verdict, labels)

    def response_action(self, verdict: Verdict, labels: RiskLabels) -> tuple[RiskLevel, Action]:
        return self._judge("response", verdict, labels)

    def tightened(self, *, debounce: int | None = None, strict: bool | None = None) -> Policy:
        """A caller may make a stream stricter than its policy, never looser."""
        from dataclasses import replace

        out = self
        if debounce and debounce < out.debounce:
            out = replace(out, debounce=debounce)
        if strict and out.controversial is ControversialMode.LOOSE:
            out = replace(out, controversial=ControversialMode.STRICT)
        return out
