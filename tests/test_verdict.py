"""The debounce rule and strict/loose treatment of Controversial."""

from __future__ import annotations

import numpy as np
import pytest

from guard.labels import LabelSet, RiskLabels, RiskLevel
from guard.verdict import ControversialMode, DebounceTracker, Verdict, VerdictRules

S, U, C = RiskLevel.SAFE, RiskLevel.UNSAFE, RiskLevel.CONTROVERSIAL


def first_flag(levels, rules):
    tracker = DebounceTracker(rules)
    for i, level in enumerate(levels):
        tracker.observe(i, rules.counts_as_unsafe(level))
    return tracker.flag_index, tracker.span_start


def test_single_unsafe_token_does_not_flag_with_debounce_two():
    assert first_flag([S, U, S, U, S], VerdictRules()) == (None, None)


def test_flag_at_the_second_of_two_consecutive_unsafe_tokens():
    assert first_flag([S, S, U, U, U], VerdictRules()) == (3, 2)


def test_flag_index_is_the_first_firing_only():
    assert first_flag([U, U, S, U, U], VerdictRules()) == (1, 0)


@pytest.mark.parametrize("n,expected", [(1, (1, 1)), (3, (5, 3)), (4, (None, None))])
def test_debounce_length_is_configurable(n, expected):
    assert first_flag([S, U, S, U, U, U, S], VerdictRules(debounce=n)) == expected


def test_strict_counts_controversial_as_unsafe_and_loose_does_not():
    levels = [S, C, C, U, S]
    assert first_flag(levels, VerdictRules(controversial=ControversialMode.STRICT)) == (2, 1)
    assert first_flag(levels, VerdictRules(controversial=ControversialMode.LOOSE)) == (None, None)


def test_debounce_must_be_positive():
    with pytest.raises(ValueError, match="debounce"):
        VerdictRules(debounce=0)


def test_verdict_uses_the_checkpoint_labels_and_has_no_category_when_safe():
    risk = RiskLabels.from_labels("m", LabelSet(("Safe", "Unsafe", "Controversial")))
    cats = LabelSet(("Violent", "PII"))
    unsafe = Verdict.from_probs(risk, cats, np.array([0.1, 0.7, 0.2]), np.array([0.3, 0.7]))
    assert (unsafe.risk, unsafe.risk_label, unsafe.category) == (U, "Unsafe", "PII")
    safe = Verdict.from_probs(risk, cats, np.array([0.8, 0.1, 0.1]), np.array([0.3, 0.7]))
    assert safe.category is None and safe.category_probs == {"Violent": 0.3, "PII": 0.7}
