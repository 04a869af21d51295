"""The debounce rule, and how a policy turns verdicts into levels and actions."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from guard.model.labels import LabelSet, RiskLabels, RiskLevel
from guard.policy.actions import Action
from guard.policy.rules import Policy
from guard.session.verdict import ControversialMode, DebounceTracker, Verdict

S, U, C = RiskLevel.SAFE, RiskLevel.UNSAFE, RiskLevel.CONTROVERSIAL
LABELS = RiskLabels.from_labels("m", LabelSet(("Safe", "Unsafe", "Controversial")))
CATEGORIES = LabelSet(("Violent", "PII"))


BUILTIN = Policy()


def first_flag(levels, policy: Policy = BUILTIN):
    tracker = DebounceTracker(policy.debounce)
    for i, level in enumerate(levels):
        _, action = policy.decide("response", level, "Violent")
        tracker.observe(i, action is Action.INTERRUPT)
    return tracker.flag_index, tracker.span_start


def test_single_unsafe_token_does_not_flag_with_debounce_two():
    assert first_flag([S, U, S, U, S]) == (None, None)


def test_flag_at_the_second_of_two_consecutive_unsafe_tokens():
    assert first_flag([S, S, U, U, U]) == (3, 2)


def test_flag_index_is_the_first_firing_only():
    assert first_flag([U, U, S, U, U]) == (1, 0)


@pytest.mark.parametrize("n,expected", [(1, (1, 1)), (3, (5, 3)), (4, (None, None))])
def test_debounce_length_is_configurable(n, expected):
    assert first_flag([S, U, S, U, U, U, S], Policy(debounce=n)) == expected


def test_strict_counts_controversial_as_unsafe_and_loose_does_not():
    levels = [S, C, C, U, S]
    assert first_flag(levels, Policy(controversial=ControversialMode.STRICT)) == (2, 1)
    assert first_flag(levels, Policy(controversial=ControversialMode.LOOSE)) == (None, None)


def test_debounce_must_be_positive():
    with pytest.raises(ValueError, match="debounce"):
        Policy(debounce=0)


def test_category_override_wins_over_the_risk_action():
    policy = Policy(response_category_actions={"pii": Action.REDACT})
    assert policy.decide("response", U, "PII") == (U, Action.REDACT)
    assert policy.decide("response", U, "Violent") == (U, Action.INTERRUPT)
    assert policy.decide("response", S, "PII") == (S, Action.CONTINUE)


def test_long_generative_category_names_match_short_stream_names():
    policy = Policy(prompt_category_actions={"illegal acts": Action.FLAG})
    assert policy.decide("prompt", U, "Non-violent Illegal Acts") == (U, Action.FLAG)


def test_thresholds_replace_the_argmax():
    verdict = Verdict.from_probs(LABELS, CATEGORIES, np.array([0.6, 0.35, 0.05]), np.array([0.9, 0.1]))
    assert verdict.risk is S
    lenient, careful = Policy(), Policy(unsafe_threshold=0.3)
    assert lenient.response_action(verdict, LABELS) == (S, Action.CONTINUE)
    assert careful.response_action(verdict, LABELS) == (U, Action.INTERRUPT)


def test_a_caller_may_tighten_but_not_loosen():
    loose = Policy(debounce=3, controversial=ControversialMode.LOOSE)
    assert loose.tightened(debounce=1, strict=True) == replace(
        loose, debounce=1, controversial=ControversialMode.STRICT
    )
    strict = Policy(debounce=2)
    assert strict.tightened(debounce=5, strict=False) == strict


def test_verdict_uses_the_checkpoint_labels_and_has_no_category_when_safe():
    unsafe = Verdict.from_probs(LABELS, CATEGORIES, np.array([0.1, 0.7, 0.2]), np.array([0.3, 0.7]))
    assert (unsafe.risk, unsafe.risk_label, unsafe.category) == (U, "Unsafe", "PII")
    safe = Verdict.from_probs(LABELS, CATEGORIES, np.array([0.8, 0.1, 0.1]), np.array([0.3, 0.7]))
    assert safe.category is None
    assert safe.category_probs == pytest.approx({"Violent": 0.3, "PII": 0.7})
