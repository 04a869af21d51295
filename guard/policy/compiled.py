"""A policy's rules as lookup tables over the model's argmax labels, so judging a chunk costs a
few list operations, with no per-token Python objects and no policy logic per token.

The engine computes the argmaxes (and the probability of the chosen label) for every row of a
forward pass at once; :class:`CompiledRules` maps them to levels and actions. Plain lists, not
numpy: a chunk is a handful of tokens, where one numpy call costs more than the whole lookup.
:meth:`Policy.decide` stays the reference for one position (a test checks the two agree on
random probabilities and every policy shape). Codes: a level is its ``RiskLevel`` value (SAFE is
0), an action its index in ``ACTIONS``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from guard.model.labels import LabelSet, RiskLabels, RiskLevel
from guard.policy.actions import Action
from guard.policy.rules import Policy, category_key
from guard.session.verdict import ControversialMode

ACTIONS: tuple[Action, ...] = tuple(Action)
ACTION_CODE = {a: i for i, a in enumerate(ACTIONS)}
_SAFE, _CONTROVERSIAL, _UNSAFE = int(RiskLevel.SAFE), int(RiskLevel.CONTROVERSIAL), int(RiskLevel.UNSAFE)
_NO_OVERRIDE = -1


@dataclass(frozen=True)
class ChunkJudgement:
    """Per-token results of one chunk, as lists of length T."""

    level: list[int]  # RiskLevel value after thresholds and the strict/loose rule
    action: list[int]  # index into ACTIONS
    all_safe: bool  # every level is SAFE: the common chunk, with nothing to report per token
    model_safe: bool  # all_safe, and the model's own label is Safe everywhere (no category to count)


class CompiledRules:
    """One stage's rules of ``policy`` over one checkpoint's labels (compiled once per stream)."""

    def __init__(self, policy: Policy, risk_labels: RiskLabels, categories: LabelSet, stage: str = "response") -> None:
        if stage not in ("prompt", "response"):
            raise ValueError(f"stage must be 'prompt' or 'response', got {stage!r}")
        strict = policy.controversial is ControversialMode.STRICT
        actions, overrides = (
            (policy.prompt_actions, policy.prompt_category_actions)
            if stage == "prompt"
            else (policy.response_actions, policy.response_category_actions)
        )
        self._thresholds = policy.unsafe_threshold is not None or policy.controversial_threshold is not None
        self._unsafe_t = 0.5 if policy.unsafe_threshold is None else policy.unsafe_threshold
        self._controversial_t = policy.controversial_threshold
        # The column of each level (the last one when a checkpoint repeats a level, as decide() reads them).
        column = {level: i for i, level in enumerate(risk_labels.levels)}
        self._unsafe_col = column.get(RiskLevel.UNSAFE)
        self._controversial_col = column.get(RiskLevel.CONTROVERSIAL)
        # Raw level -> effective level (the strict rule); model label -> effective level.
        self._strict = (_SAFE, _UNSAFE if strict else _CONTROVERSIAL, _UNSAFE)
        self._label_level = tuple(self._strict[int(lv)] for lv in risk_labels.levels)
        self._label_safe = tuple(lv is RiskLevel.SAFE for lv in risk_labels.levels)
        self._level_action = tuple(ACTION_CODE[actions[RiskLevel(v)]] for v in range(3))
        self._override = tuple(
            ACTION_CODE[overrides[category_key(c)]] if category_key(c) in overrides else _NO_OVERRIDE
            for c in categories.names
        )
        self._has_override = any(code != _NO_OVERRIDE for code in self._override)
        self.safe_action = actions[RiskLevel.SAFE]

    def judge(self, risk_probs: np.ndarray, risk_index: list[int], category_index: list[int]) -> ChunkJudgement:
        """Levels and actions of a chunk: the model's argmax labels per token (from the engine),
        and the probabilities ``[T, num_risk]``, read only when the policy has thresholds."""
        if self._thresholds:
            level = self._thresholded(risk_probs)
        else:
            label_level = self._label_level
            level = [label_level[r] for r in risk_index]
        if not any(level):  # SAFE is 0
            label_safe = self._label_safe
            model_safe = not self._thresholds or all(label_safe[r] for r in risk_index)
            return ChunkJudgement(level, [self._level_action[_SAFE]] * len(level), True, model_safe)
        level_action = self._level_action
        if self._has_override:
            override = self._override
            action = [
                level_action[lv] if lv == _SAFE or override[c] == _NO_OVERRIDE else override[c]
                for lv, c in zip(level, category_index, strict=True)
            ]
        else:
            action = [level_action[lv] for lv in level]
        return ChunkJudgement(level, action, False, False)

    def _thresholded(self, risk_probs: np.ndarray) -> list[int]:
        unsafe = self._column(risk_probs, self._unsafe_col) >= self._unsafe_t
        controversial = np.zeros(len(risk_probs), dtype=bool)
        if self._controversial_t is not None:
            controversial = self._column(risk_probs, self._controversial_col) >= self._controversial_t
        raw = np.where(unsafe, _UNSAFE, np.where(controversial, _CONTROVERSIAL, _SAFE))
        strict = self._strict
        return [strict[v] for v in raw.tolist()]

    @staticmethod
    def _column(risk_probs: np.ndarray, col: int | None) -> np.ndarray:
        """A level's probabilities; 0 for a level the checkpoint does not have (as decide() reads it)."""
        return risk_probs[:, col] if col is not None else np.zeros(len(risk_probs), dtype=risk_probs.dtype)
