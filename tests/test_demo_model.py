"""The demo Stream model: real layout, reported as a demo, flags its unsafe phrases, passes safe ones."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import yaml
from cli_runner import guard_script

from guard.demo.corpus import SAFE_SENTENCES, SHOWCASE, generate_corpus
from guard.demo.safe_text import safe_conversations
from guard.text.conversation import Message

HELD_OUT = yaml.safe_load((Path(__file__).parent / "data" / "held_out_safe_answers.yaml").read_text(encoding="utf-8"))
BREAD_PROMPT = "How do I bake bread?"
BREAD_ANSWER = (
    "Mix flour, water, salt and yeast. Knead the dough for ten minutes, let it rise for an hour, "
    "then bake at 220 degrees for thirty minutes."
)


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


def test_held_out_answers_are_broad_and_unseen_in_training():
    """The list tests generalisation only if it is varied and the training text does not contain it."""
    assert len(HELD_OUT) >= 50
    assert {"en", "zh", "es", "fr", "de", "ja"} <= {e["lang"] for e in HELD_OUT}
    trained = {r for _, r in safe_conversations(5000, seed=1)} | set(SAFE_SENTENCES)
    assert not trained & {e["response"] for e in HELD_OUT}


def test_held_out_ordinary_answers_are_not_interrupted(demo_runtime):
    """Recipes, travel, code, maths and history the model never saw, in several languages: the
    default policy (debounce 2) lets every one through, and every prompt is Safe."""
    wrong = []
    for e in HELD_OUT:
        prompt, chunk = moderate(demo_runtime, e["prompt"], e["response"])
        if chunk.flag_index is not None or prompt.risk_label != "Safe":
            wrong.append((e["lang"], e["response"][:40], prompt.risk_label, chunk.flag_index))
    assert not wrong, f"{len(wrong)} of {len(HELD_OUT)} ordinary answers were judged unsafe: {wrong}"


def test_random_token_responses_are_not_interrupted(demo_runtime):
    """Noise (seeded ids from the ordinary vocabulary, the unsafe phrases' own tokens left out) is not harmful text."""
    from guard.demo.stream_model import random_response_ids, unsafe_phrase_ids

    tok = demo_runtime.tokenizer
    excluded = unsafe_phrase_ids(tok)
    rng = random.Random(20250611)
    flagged = []
    for n in range(40):
        ids = random_response_ids(tok, rng, 64, excluded)
        stream = demo_runtime.moderator.open(messages=[Message("user", "Say something.")])
        chunk = stream.feed_ids(ids).result(timeout=30)
        stream.close()
        if chunk.flag_index is not None:
            flagged.append(n)
    assert not flagged, f"random sequences {flagged} of 40 were interrupted"


def test_bread_recipe_text_stream_is_not_interrupted(demo_runtime):
    """The first thing a newcomer tries, fed as text deltas the way an HTTP client sends them."""
    stream = demo_runtime.moderator.open(messages=[Message("user", BREAD_PROMPT)])
    assert stream.prompt.result(timeout=30).verdict.risk_label == "Safe"
    chunks = [stream.feed_text(BREAD_ANSWER[i : i + 16]).result(timeout=30) for i in range(0, len(BREAD_ANSWER), 16)]
    chunks.append(stream.end_text().result(timeout=30))
    stream.close()
    assert all(c.flag_index is None for c in chunks)
    assert sum(len(c.tokens) for c in chunks) == len(demo_runtime.tokenizer.encode(BREAD_ANSWER))


def test_bread_recipe_is_not_interrupted_through_the_cli(demo_dir):
    result = guard_script("moderate", "--model", "demo", "--prompt", BREAD_PROMPT, "--text", BREAD_ANSWER, "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    assert out["prompt"]["risk"] == "Safe"
    assert out["interrupt_index"] is None
    assert all(t["risk"] == "Safe" for t in out["tokens"])


def test_guard_demo_moderates_the_showcase(demo_dir):
    """`guard demo` (`make demo`): each showcase conversation with its prompt verdict, the safe
    answers passed whole, the unsafe ones interrupted in their labelled category."""
    from cli_runner import guard_main

    assert guard_main("demo", "--build-only").stdout.strip() == str(demo_dir)
    done = guard_main("demo")
    assert done.returncode == 0, done.stderr
    assert "DEMO MODEL" in done.stdout
    blocks = done.stdout.split("user:      ")[1:]
    assert len(blocks) == len(SHOWCASE)
    for ex, block in zip(SHOWCASE, blocks, strict=True):
        assert block.startswith(ex.prompt) and f"prompt:  {ex.prompt_risk}" in block
        if ex.unsafe_from_char is None:
            assert f"response passed: {ex.response}" in block
        else:
            assert "INTERRUPTED at token" in block and f"({ex.response_category})" in block


def test_undertrained_demo_is_refused_not_shipped(tmp_path):
    """The coverage check is what makes the demo behave the same on every CPU: a model that has
    not learnt the corpus must not be written."""
    from guard.demo.stream_model import train_demo_checkpoint

    with pytest.raises(RuntimeError, match=r"misjudges \d+ of \d+ cases"):
        train_demo_checkpoint(tmp_path / "demo", steps=3, max_rounds=0)
    assert not (tmp_path / "demo" / "config.json").exists()


def test_undertrained_demo_judge_is_refused_not_shipped(tmp_path):
    from guard.demo.judge_model import train_demo_judge

    with pytest.raises(RuntimeError, match=r"answers \d+ of \d+ cases wrong"):
        train_demo_judge(tmp_path / "judge", steps=3, max_rounds=0)
    assert not (tmp_path / "judge" / "config.json").exists()
