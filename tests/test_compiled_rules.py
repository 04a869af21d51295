"""The array path of judging (CompiledRules, debounce over a chunk, ChunkVerdict) gives exactly
what the per-token reference (Policy.decide, DebounceTracker.observe, Verdict) gives."""

from __future__ import annotations

import itertools

import numpy as np
import pytest

from guard.model.engine import ChunkScores
from guard.model.labels import LabelSet, RiskLabels, RiskLevel
from guard.policy.actions import Action
from guard.policy.compiled import ACTIONS, CompiledRules
from guard.policy.rules import Policy
from guard.session.moderation import ChunkVerdict, chunk_action
from guard.session.verdict import ControversialMode, DebounceTracker, Verdict

# A label order unlike the official one, so no code may assume Safe is column 0.
LABELS = RiskLabels.from_labels("m", LabelSet(("Unsafe", "Safe", "Controversial")))
CATEGORIES = LabelSet(("Violent", "PII", "Jailbreak"))

POLICIES = {
    "builtin": Policy(),
    "loose": Policy(controversial=ControversialMode.LOOSE),
    "thresholds": Policy(unsafe_threshold=0.3, controversial_threshold=0.2),
    "unsafe-threshold-only": Policy(unsafe_threshold=0.7, controversial=ControversialMode.LOOSE),
    "overrides": Policy(
        response_category_actions={"pii": Action.REDACT, "jailbreak": Action.FLAG},
        controversial=ControversialMode.LOOSE,
    ),
    "flag-everything": Policy(
        response_actions={RiskLevel.SAFE: Action.CONTINUE, RiskLevel.CONTROVERSIAL: Action.FLAG,
                          RiskLevel.UNSAFE: Action.FLAG},
    ),
    "thresholds-and-overrides": Policy(
        unsafe_threshold=0.4, controversial_threshold=0.3, response_category_actions={"violent": Action.REDACT}
    ),
}


def random_probs(rng: np.random.Generator, rows: int, safe_bias: float) -> tuple[np.ndarray, np.ndarray]:
    risk = rng.dirichlet([1.0, 1.0 + safe_bias, 1.0], size=rows).astype(np.float32)
    category = rng.dirichlet([1.0, 1.0, 1.0], size=rows).astype(np.float32)
    return risk, category


def reference(policy: Policy, risk: np.ndarray, category: np.ndarray) -> list[tuple[RiskLevel, Action]]:
    verdicts = Verdict.many(LABELS, CATEGORIES, risk, category)
    return [policy.response_action(v, LABELS) for v in verdicts]


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_compiled_rules_match_decide_on_random_probabilities(name):
    policy = POLICIES[name]
    rules = CompiledRules(policy, LABELS, CATEGORIES)
    rng = np.random.default_rng(7)
    seen_levels, seen_all_safe = set(), set()
    for trial in range(300):
        risk, category = random_probs(rng, int(rng.integers(1, 12)), safe_bias=float(trial % 4) * 3)
        judgement = rules.judge(risk, risk.argmax(axis=1).tolist(), category.argmax(axis=1).tolist())
        expected = reference(policy, risk, category)
        assert [RiskLevel(v) for v in judgement.level] == [level for level, _ in expected]
        assert [ACTIONS[a] for a in judgement.action] == [action for _, action in expected]
        assert judgement.all_safe == all(level is RiskLevel.SAFE for level, _ in expected)
        labels_safe = all(LABELS.levels[r] is RiskLevel.SAFE for r in risk.argmax(axis=1))
        assert judgement.model_safe == (judgement.all_safe and labels_safe)
        seen_levels |= {level for level, _ in expected}
        seen_all_safe.add(judgement.all_safe)
    assert seen_all_safe == {True, False}  # both paths were exercised
    assert len(seen_levels) >= 2


def test_prompt_stage_uses_the_prompt_actions():
    policy = Policy(prompt_category_actions={"pii": Action.ALLOW})
    rules = CompiledRules(policy, LABELS, CATEGORIES, stage="prompt")
    rng = np.random.default_rng(3)
    risk, category = random_probs(rng, 200, safe_bias=0)
    judgement = rules.judge(risk, risk.argmax(axis=1).tolist(), category.argmax(axis=1).tolist())
    verdicts = Verdict.many(LABELS, CATEGORIES, risk, category)
    assert [ACTIONS[a] for a in judgement.action] == [policy.prompt_action(v, LABELS)[1] for v in verdicts]
    with pytest.raises(ValueError, match="stage"):
        CompiledRules(policy, LABELS, CATEGORIES, stage="both")


def sequential(debounce: int, chunks: list[list[bool]]) -> list[tuple[int | None, int | None, int, int | None]]:
    tracker = DebounceTracker(debounce)
    out, index = [], 0
    for chunk in chunks:
        fired_at = None
        for i, unsafe in enumerate(chunk):
            if tracker.observe(index + i, unsafe):
                fired_at = i
        index += len(chunk)
        out.append((tracker.flag_index, tracker.span_start, tracker.run, fired_at))
    return out


def chunked(debounce: int, chunks: list[list[bool]]) -> list[tuple[int | None, int | None, int, int | None]]:
    tracker = DebounceTracker(debounce)
    out, index = [], 0
    for chunk in chunks:
        fired_at = tracker.observe_chunk(index, [bool(u) for u in chunk])
        index += len(chunk)
        out.append((tracker.flag_index, tracker.span_start, tracker.run, fired_at))
    return out


def test_debounce_over_a_chunk_matches_token_by_token():
    rng = np.random.default_rng(11)
    for _ in range(2000):
        debounce = int(rng.integers(1, 6))
        p = float(rng.choice([0.1, 0.5, 0.9]))
        chunks = [list(rng.random(int(rng.integers(0, 7))) < p) for _ in range(int(rng.integers(1, 6)))]
        assert chunked(debounce, chunks) == sequential(debounce, chunks), (debounce, chunks)


def test_debounce_run_crosses_chunks_and_empty_chunks_keep_it():
    # One unsafe token at the end of each chunk, with empty chunks between: fires at the second.
    assert chunked(2, [[False, True], [], [True, False]]) == [(None, None, 1, None), (None, None, 1, None),
                                                              (2, 1, 0, 0)]


def make_chunk(policy: Policy, risk, category, ids, first_index=0) -> ChunkVerdict:
    rules = CompiledRules(policy, LABELS, CATEGORIES)
    risk_index, category_index = risk.argmax(axis=1).tolist(), category.argmax(axis=1).tolist()
    judgement = rules.judge(risk, risk_index, category_index)
    chosen = risk.max(axis=1).tolist()
    scores = ChunkScores(tuple(ids), first_index, risk, category, risk_index, category_index, chosen, 0.0, 0.0, 1)
    return ChunkVerdict(scores, judgement, None, None, False, 0, chunk_action(None, judgement), LABELS, CATEGORIES)


@pytest.mark.parametrize("name", sorted(POLICIES))
def test_chunk_verdict_tokens_counts_and_action_match_the_per_token_objects(name):
    policy = POLICIES[name]
    rng = np.random.default_rng(5)
    for trial in range(100):
        rows = int(rng.integers(1, 9))
        risk, category = random_probs(rng, rows, safe_bias=float(trial % 3) * 4)
        ids = rng.integers(0, 1000, size=rows).tolist()
        chunk = make_chunk(policy, risk, category, ids, first_index=40)
        verdicts = Verdict.many(LABELS, CATEGORIES, risk, category)
        expected = reference(policy, risk, category)
        tokens = chunk.tokens
        assert [(t.index, t.token_id) for t in tokens] == [(40 + i, tid) for i, tid in enumerate(ids)]
        for t, v, (level, action) in zip(tokens, verdicts, expected, strict=True):
            assert (t.verdict.risk_label, t.verdict.category, t.level, t.action) == (
                v.risk_label, v.category, level, action
            )
        counts: dict = {}
        for v, (level, _) in zip(verdicts, expected, strict=True):
            counts[(level, v.category or "")] = counts.get((level, v.category or ""), 0) + 1
        assert chunk.verdict_counts() == counts
        actions = {a for _, a in expected}
        want = (
            Action.REDACT if Action.REDACT in actions
            else Action.FLAG if actions & {Action.FLAG, Action.INTERRUPT}
            else Action.CONTINUE
        )
        assert chunk.action is want
        redacted = chunk.redacted()
        assert (redacted if redacted is not None else [False] * rows) == [
            a is Action.REDACT for _, a in expected
        ]
        for action in Action:
            first = next((i for i, (_, a) in enumerate(expected) if a is action), None)
            assert chunk.first_with(action) == first
        assert [chunk.category_at(i) for i in range(rows)] == [v.category or "" for v in verdicts]


def test_every_label_order_and_mode_combination_agrees():
    """All 6 label orders x strict/loose x thresholds on/off, on rows at exact threshold edges."""
    edges = np.array([[0.3, 0.5, 0.2], [0.5, 0.3, 0.2], [0.2, 0.3, 0.5], [0.34, 0.33, 0.33]], dtype=np.float32)
    for order in itertools.permutations(("Safe", "Unsafe", "Controversial")):
        labels = RiskLabels.from_labels("m", LabelSet(order))
        perm = [("Safe", "Unsafe", "Controversial").index(name) for name in order]
        risk = edges[:, perm]
        category = np.tile(np.array([[0.2, 0.5, 0.3]], dtype=np.float32), (len(risk), 1))
        for controversial, thresholds in itertools.product(ControversialMode, [(None, None), (0.5, 0.3)]):
            policy = Policy(controversial=controversial, unsafe_threshold=thresholds[0],
                            controversial_threshold=thresholds[1])
            judgement = CompiledRules(policy, labels, CATEGORIES).judge(
                risk, risk.argmax(1).tolist(), category.argmax(1).tolist()
            )
            expected = [policy.response_action(v, labels) for v in Verdict.many(labels, CATEGORIES, risk, category)]
            got = [(RiskLevel(lv), ACTIONS[a]) for lv, a in zip(judgement.level, judgement.action, strict=True)]
            assert got == expected
