"""The pieces of thinking control, on the real Qwen3 tokenizer: where a think block is open, how
a response splits into reasoning and answer (the closing line breaks included), the budget closed
inside a decode loop, vLLM's stop-string semantics, and releases split at the answer's first
token with redaction markers kept in both parts."""

from __future__ import annotations

import pytest

from guard.reasoning.thinking import ANSWER, REASONING, BudgetCloser, PhaseTracker, ThinkTokens
from guard.session.release import ReleaseMode, ReleaseTracker
from guard.text.stop_strings import StopStrings


@pytest.fixture(scope="module")
def hf(guard_tokenizer):
    return guard_tokenizer.hf


@pytest.fixture(scope="module")
def tokens(hf) -> ThinkTokens:
    return ThinkTokens.of(hf)


def ids(hf, text: str) -> list[int]:
    return hf.encode(text, add_special_tokens=False)


def assistant_prompt(hf, thinking: bool, opened: str = "") -> list[int]:
    text = hf.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True, enable_thinking=thinking
    )
    return ids(hf, text + opened)


def test_a_prompt_that_opens_the_think_block_is_seen_as_open(hf, tokens):
    assert not tokens.opened_by(assistant_prompt(hf, True))  # Qwen3: the model writes <think> itself
    assert not tokens.opened_by(assistant_prompt(hf, False))  # an empty, closed block
    assert tokens.opened_by(assistant_prompt(hf, True, "<think>"))
    assert tokens.opened_by(assistant_prompt(hf, True, "<think>\n"))  # Qwen3-2507 thinking / QwenLong
    assert tokens.opened_by(assistant_prompt(hf, True, "<think>\n\n"))
    assert not tokens.opened_by(assistant_prompt(hf, True, "<think>\nSo"))  # something was written in it
    assert not tokens.opened_by([])


def test_the_line_breaks_after_the_closing_tag_are_reasoning(hf, tokens):
    response = [*ids(hf, "<think>\nLet me see.\n</think>\n\nThe answer."), hf.convert_tokens_to_ids("<|im_end|>")]
    tracker = PhaseTracker(tokens, thinking=True)
    runs = tracker.push(response)
    assert [phase for phase, _ in runs] == [REASONING, ANSWER]
    reasoning, answer = runs[0][1], runs[1][1]
    assert hf.decode(reasoning) == "<think>\nLet me see.\n</think>\n\n"
    assert hf.decode(answer).startswith("The answer.")
    assert (tracker.reasoning_tokens, tracker.answer_tokens) == (len(reasoning), len(answer))


def test_an_opened_prompt_starts_in_the_reasoning_and_no_thinking_is_all_answer(hf, tokens):
    opened = PhaseTracker(tokens, thinking=True, prompt_opened=True)
    assert [p for p, _ in opened.push(ids(hf, "Hmm.\n</think>\n\nYes."))] == [REASONING, ANSWER]
    off = PhaseTracker(tokens, thinking=False)
    assert [p for p, _ in off.push(ids(hf, "<think>\nx\n</think>\n\nYes."))] == [ANSWER]
    plain = PhaseTracker(tokens, thinking=True)  # a thinking model that answers without thinking
    assert [p for p, _ in plain.push(ids(hf, "Yes, directly."))] == [ANSWER]


def test_accept_cuts_exactly_at_the_budget_and_changes_nothing(hf, tokens):
    response = ids(hf, "<think>\none two three four five six seven\n</think>\n\nDone.")
    tracker = PhaseTracker(tokens, thinking=True, budget=5)
    assert tracker.accept(response) == 5 and tracker.reasoning_tokens == 0  # state unchanged
    tracker.push(response[:5])
    assert tracker.budget_reached and tracker.accept(response[5:]) == 0
    twin = tracker.copy()
    twin.push(list(tokens.closing_ids))
    assert not twin.budget_reached and twin.phase == REASONING  # closed, line breaks still reasoning
    assert tracker.budget_reached  # the copy is independent
    closed = PhaseTracker(tokens, thinking=True, budget=50)
    closed.push(response)
    assert closed.accept(ids(hf, "more answer")) == len(ids(hf, "more answer"))


def test_the_budget_closer_injects_the_closing_ids_once_at_the_budget(hf, tokens):
    """As a decode loop drives it: ask ``inject`` before each step, ``observe`` every token."""
    model_writes = iter(ids(hf, "<think>\nalpha beta gamma delta epsilon zeta eta theta iota"))
    closer = BudgetCloser(PhaseTracker(tokens, thinking=True, budget=4))
    response: list[int] = []
    while len(response) < 12:
        chunk = closer.inject() or [next(model_writes)]
        for token in chunk:
            closer.observe(token)
            response.append(token)
    closing = list(tokens.closing_ids)
    assert response[4 : 4 + len(closing)] == closing and closer.closed_at == 4
    assert response.count(tokens.close_id) == 1  # injected once
    mirror = PhaseTracker(tokens, thinking=True, budget=4)
    runs = mirror.push(response)
    assert [p for p, _ in runs] == [REASONING, ANSWER] and len(runs[0][1]) == 4 + len(closing)


@pytest.mark.parametrize(
    "deltas, stops, shown, stopped",
    [
        (["Hello wor", "ld. Bye"], ["world"], "Hello ", True),  # across deltas
        (["abc", "def"], ["zz"], "abcdef", False),  # held back, then flushed at the end
        (["one STOP two"], ["STOP", "one"], "", True),  # the earliest occurrence wins
        (["x", "y", "z"], [], "xyz", False),
        (["ab", "c", "d"], ["cd", "b"], "a", True),
    ],
)
def test_stop_strings_behave_as_vllm(deltas, stops, shown, stopped):
    matcher = StopStrings(stops)
    out = "".join(matcher.push(d) for d in deltas)
    if not matcher.stopped:
        out += matcher.flush()
    assert (out, matcher.stopped) == (shown, stopped)


def test_held_back_text_never_exceeds_a_stop_string(hf):
    matcher = StopStrings(["</answer>"])
    assert matcher.push("abcdefghijklmnop") == "abcdefgh"  # 8 characters held: "</answer" could start there
    assert matcher.push("q") == "i"


def test_a_release_across_the_boundary_splits_its_text_and_marks_both_parts(hf):
    """Everything redacted and released at once across the boundary, or up to it and then past
    it: each part shows the marker, and ``boundary_chars`` says where the first part's text ends."""
    reasoning, answer = ids(hf, "<think>\nsecret plan\n</think>\n\n"), ids(hf, "secret answer")
    tracker = ReleaseTracker(ReleaseMode.HOLD_BACK, hf, "[X]")
    tracker.receive(reasoning)
    tracker.set_boundary(len(reasoning))
    tracker.receive(answer)
    for _ in range(len(reasoning) + len(answer)):
        tracker.mark(True)
    text = tracker.finish(interrupted=False)
    assert tracker.boundary_chars == 3 and text == "[X][X]"
    stepwise = ReleaseTracker(ReleaseMode.HOLD_BACK, hf, "[X]")
    stepwise.receive(reasoning)
    stepwise.set_boundary(len(reasoning))
    for _ in reasoning:
        stepwise.mark(True)
    assert stepwise.judged(len(reasoning), 0, None) == "[X]"
    stepwise.receive(answer)
    for _ in answer:
        stepwise.mark(True)
    assert stepwise.judged(len(reasoning) + len(answer), 0, None) == "[X]" and stepwise.boundary_chars == 3
    plain = ReleaseTracker(ReleaseMode.HOLD_BACK, hf)
    plain.receive(reasoning[:3])
    for _ in range(3):
        plain.mark(False)
    first = plain.judged(3, 0, None)
    plain.set_boundary(3)  # everything before it already out
    assert plain.boundary_chars is None  # nothing after it released yet
    plain.receive(answer)
    for _ in answer:
        plain.mark(False)
    rest = plain.judged(3 + len(answer), 0, None)
    assert plain.boundary_chars == len(first) and rest == "secret answer"
