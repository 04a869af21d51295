"""The demo Stream model: real layout, reported as a demo, flags its unsafe phrases, passes safe ones."""

from __future__ import annotations

import json

import pytest

from guard.conversation import Message
from guard.demo_corpus import SHOWCASE, generate_corpus


def moderate(runtime, prompt: str, response: str):
    _, ids = runtime.tokenizer.split_response([Message("user", prompt), Message("assistant", response)])
    stream = runtime.moderator.open(messages=[Message("user", prompt)])
    prompt_verdict = stream.prompt.result(timeout=30).verdict
    chunk = stream.feed_ids(ids).result(timeout=30)
    stream.close()
    return prompt_verdict, chunk


def test_demo_checkpoint_is_marked_as_a_demo(demo_dir, demo_runtime):
    cfg = json.loads((demo_dir / "config.json").read_text())
    assert cfg["architectures"] == ["Qwen3ForGuardModel"]
    assert demo_runtime.is_demo
    assert "not a safety model" in demo_runtime.description


@pytest.mark.parametrize("example", SHOWCASE, ids=lambda e: e.prompt[:30])
def test_showcase_conversations(demo_runtime, example):
    prompt, chunk = moderate(demo_runtime, example.prompt, example.response)
    assert prompt.risk_label == example.prompt_risk
    assert prompt.category == example.prompt_category
    if example.unsafe_from_char is None:
        assert chunk.flag_index is None
    else:
        span_token = len(demo_runtime.tokenizer.encode(example.response[: example.unsafe_from_char]))
        assert chunk.flag_index is not None and chunk.flag_index >= span_token
        assert chunk.tokens[chunk.flag_index].verdict.category == example.response_category


def test_held_out_combinations(demo_runtime):
    """Phrases recombined with a seed the training never used."""
    examples = generate_corpus(60, seed=12345)
    for ex in examples:
        prompt, chunk = moderate(demo_runtime, ex.prompt, ex.response)
        assert prompt.risk_label == ex.prompt_risk, ex.prompt
        if ex.unsafe_from_char is None:
            assert chunk.flag_index is None, ex.response
        else:
            assert chunk.flag_index is not None, ex.response
            assert chunk.tokens[chunk.flag_index].verdict.category == ex.response_category, ex.response


def test_undertrained_demo_is_refused_not_shipped(tmp_path):
    """The coverage check is what makes the demo behave the same on every CPU: a model that has
    not learnt the corpus must not be written."""
    from guard.demo import train_demo_checkpoint

    with pytest.raises(RuntimeError, match=r"misjudges \d+ of \d+ cases"):
        train_demo_checkpoint(tmp_path / "demo", steps=3, max_rounds=0)
    assert not (tmp_path / "demo" / "config.json").exists()


def test_undertrained_demo_judge_is_refused_not_shipped(tmp_path):
    from guard.demo_judge import train_demo_judge

    with pytest.raises(RuntimeError, match=r"answers \d+ of \d+ cases wrong"):
        train_demo_judge(tmp_path / "judge", steps=3, max_rounds=0)
    assert not (tmp_path / "judge" / "config.json").exists()
