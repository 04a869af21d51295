"""Moderated streams over a real engine: prompt verdicts, per-token verdicts, text deltas, errors."""

from __future__ import annotations

import re

import pytest

from guard.errors import InvalidInput
from guard.runtime import load_runtime
from guard.text.conversation import Message


@pytest.fixture(scope="module")
def runtime(tiny_checkpoint):
    rt = load_runtime(str(tiny_checkpoint))
    yield rt
    rt.close()


def test_text_deltas_are_judged_like_the_same_ids(runtime):
    text = "Sure! Here is 一个 example 😀 with  spaces.\n\nDone."
    messages = [Message("user", "Hi")]
    by_ids = runtime.moderator.open(messages=messages)
    ids = runtime.tokenizer.encode(text)
    expected = by_ids.feed_ids(ids).result(timeout=30).tokens
    by_text = runtime.moderator.open(messages=messages)
    got = []
    for i in range(0, len(text), 3):
        got += by_text.feed_text(text[i : i + 3]).result(timeout=30).tokens
    got += by_text.end_text().result(timeout=30).tokens
    assert [t.token_id for t in got] == ids
    for a, b in zip(got, expected, strict=True):
        assert a.index == b.index
        assert a.verdict.risk_probs == pytest.approx(b.verdict.risk_probs, abs=1e-5)
    by_ids.close()
    by_text.close()


def test_prompt_ids_must_end_with_im_end(runtime):
    with pytest.raises(InvalidInput, match=re.escape("must end with the <|im_end|> token")):
        runtime.moderator.open(prompt_ids=[1, 2, 3])


def test_open_with_ids_gives_a_prompt_verdict_with_checkpoint_labels(runtime):
    stream = runtime.moderator.open(prompt_ids=[*runtime.tokenizer.encode("hi"), runtime.tokenizer.im_end_id])
    verdict = stream.prompt.result(timeout=30).verdict
    assert set(verdict.risk_probs) == set(runtime.guard.config.query_risk.labels.names)
    assert set(verdict.category_probs) == set(runtime.guard.config.query_categories.names)
    stream.close()


def test_mixing_text_and_ids_is_invalid(runtime):
    stream = runtime.moderator.open(messages=[Message("user", "Hi")])
    stream.feed_ids([1]).result(timeout=30)
    with pytest.raises(InvalidInput, match="takes token ids"):
        stream.feed_text("x")
    stream.close()


def test_open_needs_exactly_one_prompt_form(runtime):
    with pytest.raises(InvalidInput, match="either messages or prompt token ids"):
        runtime.moderator.open()
