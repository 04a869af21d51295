"""The demo Reasoner: a tiny Qwen3 causal LM in the released layout, marked as a demo, that through
``LocalCausalLM`` (the serving path) writes each showcase answer exactly, with and without its
thinking; and its SAE, which fits the model, names strategies, lets logit recall find the planted
backtracking feature, and visibly changes the output when steered with it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from guard.demo.reasoner_model import (
    DEMO_SAE_LAYER,
    REASONER_VERSION,
    SHOWCASE,
    STRATEGY_FEATURES,
    demo_reasoner_dir,
)
from guard.model.config import DEMO_MARKER
from guard.reasoning.local_lm import LocalCausalLM
from guard.reasoning.sae import SparseAutoencoder
from guard.reasoning.steering import Steer, TriggeredSteer

PAPER_STRATEGIES = {
    "problem_understanding",
    "procedural_planning",
    "backtracking",
    "multi_perspective_verification",
    "hypothesis_reasoning",
}
ALPHA = 20.0  # "large": the server's default bound is 50


@pytest.fixture(scope="session")
def reasoner_dir() -> Path:
    return demo_reasoner_dir()


@pytest.fixture(scope="session")
def lm(reasoner_dir: Path) -> LocalCausalLM:
    return LocalCausalLM(reasoner_dir)


@pytest.fixture(scope="session")
def sae(reasoner_dir: Path) -> SparseAutoencoder:
    return SparseAutoencoder.load(reasoner_dir / "sae")


def prompt_ids(lm: LocalCausalLM, prompt: str, *, thinking: bool) -> list[int]:
    messages = [{"role": "user", "content": prompt}]
    text = lm.tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking
    )
    expected_end = "<|im_start|>assistant\n" if thinking else "<|im_start|>assistant\n<think>\n\n</think>\n\n"
    assert text.endswith(expected_end)
    return lm.tokenizer.encode(text, add_special_tokens=False)


def greedy(lm: LocalCausalLM, ids: list[int], **steering: object) -> list[int]:
    return list(lm.generate(ids, max_tokens=120, stop_ids=lm.stop_ids, **steering))


def ids_of(lm: LocalCausalLM, text: str) -> list[int]:
    return lm.tokenizer.encode(text, add_special_tokens=False)


@pytest.mark.parametrize("index", range(len(SHOWCASE)))
def test_thinking_on_writes_reasoning_then_answer(lm: LocalCausalLM, index: int) -> None:
    prompt, reasoning, answer = SHOWCASE[index]
    expected = ids_of(lm, f"<think>\n{reasoning}\n</think>\n\n{answer}<|im_end|>")
    assert greedy(lm, prompt_ids(lm, prompt, thinking=True)) == expected


@pytest.mark.parametrize("index", range(len(SHOWCASE)))
def test_thinking_off_writes_the_answer_only(lm: LocalCausalLM, index: int) -> None:
    prompt, _, answer = SHOWCASE[index]
    assert greedy(lm, prompt_ids(lm, prompt, thinking=False)) == ids_of(lm, f"{answer}<|im_end|>")


def test_some_reasoning_says_wait_and_check_for_trigger_demos() -> None:
    assert sum("Wait" in reasoning and "check" in reasoning for _, reasoning, _ in SHOWCASE) >= 2


def test_checkpoint_is_a_qwen3_causal_lm_marked_demo(reasoner_dir: Path) -> None:
    config = json.loads((reasoner_dir / "config.json").read_text())
    assert config["architectures"] == ["Qwen3ForCausalLM"]
    assert config[DEMO_MARKER]["version"] == REASONER_VERSION
    assert "DEMO" in config[DEMO_MARKER]["notice"] and "not a reasoning model" in config[DEMO_MARKER]["notice"]


def test_sae_fits_the_model_and_names_the_paper_strategies(lm: LocalCausalLM, sae: SparseAutoencoder) -> None:
    sae.check_against(lm.config)
    assert sae.layer == DEMO_SAE_LAYER
    assert set(sae.strategies()) == PAPER_STRATEGIES


def test_recall_finds_the_planted_backtracking_feature_only_among_planted(
    lm: LocalCausalLM, sae: SparseAutoencoder
) -> None:
    recalled = sae.recall(["wait", "check", "verify"], lm.unembedding, lm.tokenizer, top_k=10, min_hits=2)
    indices = [feature.index for feature in recalled]
    assert sae.features_for("backtracking")[0] in indices
    assert set(indices) <= {index for index, _ in sae.features}  # the background features promote no keyword


def test_each_planted_feature_promotes_its_own_keywords(lm: LocalCausalLM, sae: SparseAutoencoder) -> None:
    for strategy, (index, words) in STRATEGY_FEATURES.items():
        recalled = sae.recall(words, lm.unembedding, lm.tokenizer, top_k=10, min_hits=2)
        assert index in [feature.index for feature in recalled], strategy


def test_steering_with_backtracking_changes_the_greedy_output(lm: LocalCausalLM, sae: SparseAutoencoder) -> None:
    ids = prompt_ids(lm, SHOWCASE[0][0], thinking=True)
    direction = sae.direction(sae.features_for("backtracking")[0])
    steered = greedy(lm, ids, steers=[Steer(direction, ALPHA, start=0, tokens=16)], layer=sae.layer)
    assert steered != greedy(lm, ids)


def test_steering_triggered_by_wait_changes_only_what_follows_it(lm: LocalCausalLM, sae: SparseAutoencoder) -> None:
    ids = prompt_ids(lm, SHOWCASE[0][0], thinking=True)
    plain = greedy(lm, ids)
    trigger_end = next(n for n in range(1, len(plain) + 1) if "Wait" in lm.decode(plain[:n]))
    direction = sae.direction(sae.features_for("backtracking")[0])
    steer = TriggeredSteer("Wait", direction, ALPHA, tokens=8)
    steered = greedy(lm, ids, triggered=[steer], layer=sae.layer)
    assert steered[:trigger_end] == plain[:trigger_end]
    assert steered[trigger_end:] != plain[trigger_end:]
