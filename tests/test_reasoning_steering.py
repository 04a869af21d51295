"""SAE steering on a tiny random Qwen3 causal LM written to disk in the released layout and loaded
through ``LocalCausalLM`` (the path a real checkpoint takes): the residual at the SAE's layer moves
by exactly alpha * f at the steered positions and nowhere else, in a full forward and under the KV
cache; triggered steering starts right after its text; logit recall finds a planted feature; a
malformed or mismatched SAE is refused by name; injection, stop ids and should_stop."""

from __future__ import annotations

import json
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch

from guard.errors import InvalidInput
from guard.reasoning.local_lm import LocalCausalLM
from guard.reasoning.sae import SaeError, SparseAutoencoder
from guard.reasoning.sae_writer import promoting_direction, write_sae
from guard.reasoning.steering import (
    Steer,
    SteeringHook,
    SteeringInputError,
    SteerLimits,
    TriggeredSteer,
)
from guard.retrieval.checkpoint import RetrievalCheckpointError
from guard.retrieval.checkpoint_writer import write_reranker_checkpoint

LAYER = 0  # the SAE's layer; the residual after it is read at the next layer's input
WIDTH = 256
PLANTED = 7
KEYWORDS = ("wait", "check", "verify")
PROMPT = "Solve: what is 12 * 7? Think step by step."
ATOL = 1e-5


@pytest.fixture(scope="session")
def lm(tmp_path_factory) -> LocalCausalLM:
    path = write_reranker_checkpoint(tmp_path_factory.mktemp("steer") / "qwen3-tiny-causal-lm", seed=0)
    return LocalCausalLM(path)


@pytest.fixture(scope="session")
def prompt(lm) -> list[int]:
    return lm.tokenizer.encode(PROMPT)


def single_token(lm: LocalCausalLM, text: str) -> int:
    ids = lm.tokenizer.encode(text, add_special_tokens=False)
    assert len(ids) == 1, f"{text!r} is {ids} in this tokenizer"
    return ids[0]


@pytest.fixture(scope="session")
def sae_dir(lm, tmp_path_factory) -> Path:
    keyword_ids = [single_token(lm, " " + word) for word in KEYWORDS]
    return write_sae(
        tmp_path_factory.mktemp("sae") / "layer0",
        d_model=lm.config.hidden_size,
        width=WIDTH,
        layer=LAYER,
        plant={PLANTED: promoting_direction(lm.unembedding, keyword_ids)},
        features=[(PLANTED, "Backtracking"), (3, "Backtracking"), (11, "Verification")],
    )


@pytest.fixture(scope="session")
def sae(sae_dir, lm) -> SparseAutoencoder:
    loaded = SparseAutoencoder.load(sae_dir)
    loaded.check_against(lm.config)
    return loaded


@contextmanager
def residuals(model: torch.nn.Module, layer: int) -> Iterator[list[torch.Tensor]]:
    """The residual stream after ``layer`` as every hook on it left it (the next module's input),
    one [S, D] block per forward call."""
    layers = model.model.layers
    following = layers[layer + 1] if layer + 1 < len(layers) else model.model.norm
    blocks: list[torch.Tensor] = []
    handle = following.register_forward_pre_hook(lambda module, args: blocks.append(args[0][0].detach().clone()))
    try:
        yield blocks
    finally:
        handle.remove()


def plain_residuals(lm: LocalCausalLM, ids: list[int]) -> torch.Tensor:
    """[S, D] residuals after LAYER in one full forward of ``ids`` (no cache): steered only by a hook left on."""
    with residuals(lm.model, LAYER) as blocks, torch.inference_mode():
        lm.model(input_ids=torch.tensor([ids]))
    return blocks[0]


def assert_moved_only_at(moved: torch.Tensor, base: torch.Tensor, steered: range, delta: torch.Tensor) -> None:
    """``moved`` - ``base`` is ``delta`` at the positions in ``steered`` and zero everywhere else."""
    assert moved.shape == base.shape
    expected = torch.zeros_like(base)
    expected[steered.start : steered.stop] = delta
    torch.testing.assert_close(moved - base, expected, atol=ATOL, rtol=0)


def greedy(lm: LocalCausalLM, prompt: list[int], n: int, **kwargs) -> list[int]:
    return list(lm.generate(prompt, max_tokens=n, **kwargs))


def first_completion(lm: LocalCausalLM, ids: list[int], text: str) -> int:
    """The offset of the token whose decoding first makes the response contain ``text``."""
    return next(i for i in range(len(ids)) if text in lm.decode(ids[: i + 1]))


# --- steering -------------------------------------------------------------------------------------


def test_alpha_zero_equals_the_unsteered_run_token_for_token(lm, prompt, sae):
    plain = greedy(lm, prompt, 12)
    steer = Steer(sae.direction(PLANTED), alpha=0.0, start=0, tokens=12)
    assert greedy(lm, prompt, 12, steers=[steer], layer=LAYER) == plain


def test_full_forward_moves_the_residual_by_alpha_f_only_at_steered_positions(lm, prompt, sae):
    ids = prompt + greedy(lm, prompt, 10)
    f, alpha = sae.direction(PLANTED), 3.0
    base = plain_residuals(lm, ids)
    with SteeringHook(lm.model, LAYER, prompt_len=len(prompt), steers=[Steer(f, alpha, start=2, tokens=4)]):
        moved = plain_residuals(lm, ids)
    first = len(prompt) + 2
    assert_moved_only_at(moved, base, range(first, first + 4), alpha * f)


def test_decoding_under_the_kv_cache_moves_the_residual_by_alpha_f_only_at_steered_positions(lm, prompt, sae):
    f, alpha = sae.direction(PLANTED), -5.0
    with residuals(lm.model, LAYER) as blocks:
        out = greedy(lm, prompt, 8, steers=[Steer(f, alpha, start=2, tokens=3)], layer=LAYER)
    assert [b.shape[0] for b in blocks] == [len(prompt)] + [1] * 7  # prefill, then one token a step
    fed = prompt + out[:-1]  # the last id is yielded, never fed
    first = len(prompt) + 2
    assert_moved_only_at(torch.cat(blocks), plain_residuals(lm, fed), range(first, first + 3), alpha * f)


def test_overlapping_steers_add_up(lm, prompt, sae):
    f, g = sae.direction(PLANTED), sae.direction(11)
    ids = prompt + greedy(lm, prompt, 6)
    steers = [Steer(f, 2.0, start=0, tokens=3), Steer(g, -1.5, start=2, tokens=3)]
    with SteeringHook(lm.model, LAYER, prompt_len=len(prompt), steers=steers):
        moved = plain_residuals(lm, ids)
    delta = torch.zeros(len(ids), lm.config.hidden_size)
    delta[len(prompt) : len(prompt) + 3] += 2.0 * f
    delta[len(prompt) + 2 : len(prompt) + 5] += -1.5 * g
    torch.testing.assert_close(moved - plain_residuals(lm, ids), delta, atol=ATOL, rtol=0)


def test_the_hook_is_removed_when_generation_ends_or_the_caller_walks_away(lm, prompt, sae):
    layer = lm.model.model.layers[LAYER]
    steer = Steer(sae.direction(PLANTED), 4.0, start=0, tokens=5)
    greedy(lm, prompt, 3, steers=[steer], layer=LAYER)
    assert not layer._forward_hooks
    stream = lm.generate(prompt, max_tokens=50, steers=[steer], layer=LAYER)
    next(stream)
    assert layer._forward_hooks  # attached while the stream is open
    stream.close()
    assert not layer._forward_hooks


def test_trigger_in_sampled_text_starts_steering_at_the_next_token(lm, prompt, sae):
    plain = greedy(lm, prompt, 24, temperature=1.0, seed=5)
    assert greedy(lm, prompt, 24, temperature=1.0, seed=5) == plain  # seeded sampling is reproducible
    pieces = [lm.decode(plain[j : j + 2]) for j in range(3, len(plain) - 8)]
    trigger = next(p for p in pieces if p.strip() and p.isascii() and p.isprintable())
    completed = first_completion(lm, plain, trigger)
    f, alpha, tokens = sae.direction(PLANTED), 6.0, 3
    with residuals(lm.model, LAYER) as blocks:
        out = greedy(
            lm,
            prompt,
            completed + 6,
            temperature=1.0,
            seed=5,
            triggered=[TriggeredSteer(trigger, f, alpha, tokens)],
            layer=LAYER,
        )
    assert out[: completed + 1] == plain[: completed + 1]  # nothing steered before the trigger
    first = len(prompt) + completed + 1
    assert_moved_only_at(
        torch.cat(blocks), plain_residuals(lm, prompt + out[:-1]), range(first, first + tokens), alpha * f
    )


def test_injected_wait_triggers_steering_at_the_next_token_inside_the_same_chunk(lm, prompt, sae):
    wait = [single_token(lm, " Wait"), single_token(lm, ",")]
    steps = iter([None, None, None, wait])  # three generated tokens, then " Wait," injected as one chunk
    f, alpha = sae.direction(PLANTED), 4.0
    with residuals(lm.model, LAYER) as blocks:
        out = greedy(
            lm,
            prompt,
            10,
            triggered=[TriggeredSteer("Wait", f, alpha, 2)],
            layer=LAYER,
            inject=lambda: next(steps, None),
        )
    assert out[3:5] == wait and first_completion(lm, out, "Wait") == 3
    first = len(prompt) + 4  # the injected "," is the first steered position
    assert_moved_only_at(torch.cat(blocks), plain_residuals(lm, prompt + out[:-1]), range(first, first + 2), alpha * f)


class TupleLayer(torch.nn.Module):
    """A decoder layer as transformers 4.x wrote it: the output is (hidden_states, ...)."""

    def __init__(self) -> None:
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(()))

    def forward(self, hidden: torch.Tensor, position_ids: torch.Tensor) -> tuple[torch.Tensor, str]:
        return hidden * self.scale, "attention weights"


def test_a_layer_that_returns_a_tuple_is_steered_in_its_first_element():
    model = torch.nn.Module()
    model.model = torch.nn.Module()
    model.model.layers = torch.nn.ModuleList([TupleLayer()])
    model.config = type("Config", (), {"hidden_size": 4})()
    f = torch.tensor([0.0, 1.0, 0.0, 0.0])
    hidden = torch.zeros(1, 5, 4)  # [B, S, D]
    with SteeringHook(model, 0, prompt_len=2, steers=[Steer(f, 2.0, start=1, tokens=2)]):
        out, extra = model.model.layers[0](hidden, position_ids=torch.arange(5)[None])
    assert extra == "attention weights"
    assert out[0, :, 1].tolist() == [0.0, 0.0, 0.0, 2.0, 2.0]


@pytest.mark.parametrize(
    ("alpha", "tokens", "direction", "message"),
    [
        (float("nan"), 4, "unit", "`alpha` must be a finite number"),
        (1000.0, 4, "unit", "`alpha` must be within [-100.0, 100.0]"),
        (1.0, 0, "unit", "`tokens` (T) must be an integer in [1, 4096]"),
        (1.0, 5000, "unit", "`tokens` (T) must be an integer in [1, 4096]"),
        (1.0, 4, "raw", "`direction` must be a unit vector"),
        (1.0, 4, "short", "`direction` must be a vector [64]"),
    ],
)
def test_bad_steers_are_refused_before_generation(lm, prompt, sae, alpha, tokens, direction, message):
    vector = {"unit": sae.direction(1), "raw": 3 * sae.direction(1), "short": torch.ones(8) / 8**0.5}[direction]
    with pytest.raises(SteeringInputError) as err:
        lm.generate(prompt, max_tokens=4, steers=[Steer(vector, alpha, 0, tokens)], layer=LAYER)
    assert message in str(err.value)


def test_steering_limits_are_configurable_and_layer_is_required(lm, prompt, sae):
    steer = Steer(sae.direction(1), 8.0, 0, 2)
    with pytest.raises(SteeringInputError, match=r"within \[-5.0, 5.0\]"):
        lm.generate(prompt, max_tokens=4, steers=[steer], layer=LAYER, limits=SteerLimits(max_alpha=5.0))
    with pytest.raises(InvalidInput, match="`layer` is required"):
        lm.generate(prompt, max_tokens=4, steers=[steer])
    with pytest.raises(SteeringInputError, match=r"`layer` must be in \[0, 2\)"):
        lm.generate(prompt, max_tokens=4, steers=[steer], layer=2)
    with pytest.raises(SteeringInputError, match=r"`layer` must be in \[0, 2\)"):
        SteeringHook(lm.model, 2, prompt_len=len(prompt))


# --- the decode loop ------------------------------------------------------------------------------


def test_injected_ids_are_fed_through_the_model_and_yielded(lm, prompt):
    closing = lm.tokenizer.encode("</think>\n\n", add_special_tokens=False)
    steps = iter([None, None, closing])
    out = greedy(lm, prompt, 8, inject=lambda: next(steps, None))
    before = greedy(lm, prompt, 2)
    assert out[:2] == before and out[2 : 2 + len(closing)] == closing
    # what follows is what the model says after those ids: they went through it
    assert out[2 + len(closing) :] == greedy(lm, prompt + before + closing, 8 - 2 - len(closing))


def test_injection_is_cut_at_max_tokens(lm, prompt):
    closing = lm.tokenizer.encode("</think>\n\n", add_special_tokens=False)
    out = greedy(lm, prompt, 1, inject=lambda: closing)
    assert out == closing[:1]


def test_should_stop_ends_generation_before_the_next_token(lm, prompt):
    produced: list[int] = []
    for token in lm.generate(prompt, max_tokens=20, should_stop=lambda: len(produced) >= 3):
        produced.append(token)
    assert produced == greedy(lm, prompt, 3)


def test_a_stop_id_ends_generation_and_is_yielded(lm, prompt):
    stop = single_token(lm, "<|im_end|>")
    assert stop in lm.stop_ids  # the end of a Qwen3 turn ends a response by default
    steps = iter([None, [stop]])
    out = greedy(lm, prompt, 20, stop_ids=[stop], inject=lambda: next(steps, None))
    assert out == [*greedy(lm, prompt, 1), stop]
    sampled = greedy(lm, prompt, 5)
    assert greedy(lm, prompt, 20, stop_ids=[sampled[0]]) == sampled[:1]


def test_a_vanishing_top_p_keeps_only_the_most_likely_token(lm, prompt):
    assert greedy(lm, prompt, 6, temperature=1.5, top_p=1e-6, seed=1) == greedy(lm, prompt, 6)


def test_bad_prompt_ids_are_refused(lm):
    with pytest.raises(InvalidInput, match="outside the vocabulary"):
        lm.generate([lm.vocab_size], max_tokens=2)
    with pytest.raises(InvalidInput, match="`max_tokens` must be an integer >= 1"):
        lm.generate([1, 2], max_tokens=0)


def test_a_checkpoint_without_weights_is_refused(lm, tmp_path):
    for item in lm.path.iterdir():
        if item.suffix != ".safetensors":
            shutil.copy(item, tmp_path / item.name)
    with pytest.raises(RetrievalCheckpointError, match="cannot load"):
        LocalCausalLM(tmp_path)


# --- the SAE --------------------------------------------------------------------------------------


def test_recall_finds_the_planted_feature_and_no_random_one(lm, sae):
    found = sae.recall(KEYWORDS, lm.unembedding, lm.tokenizer, top_k=10, min_hits=2)
    assert [f.index for f in found] == [PLANTED]
    assert set(found[0].hits) == set(KEYWORDS)
    assert len(found[0].tokens) == 10
    # scored a few features at a time, the answer is the same
    assert sae.recall(KEYWORDS, lm.unembedding, lm.tokenizer, block_elements=100 * lm.vocab_size) == found
    assert sae.recall(KEYWORDS, lm.unembedding, lm.tokenizer, min_hits=4) == []
    assert sae.recall(KEYWORDS, lm.unembedding, lm.tokenizer, threshold=10.0) == []


def test_encode_decode_and_topk(sae, sae_dir, tmp_path):
    x = torch.randn(5, sae.d_model)
    z = sae.encode(x)
    torch.testing.assert_close(z, torch.relu((x - sae.b_dec) @ sae.W_enc + sae.b_enc))
    torch.testing.assert_close(sae.decode(z), z @ sae.W_dec + sae.b_dec)
    shutil.copy(sae_dir / "sae.safetensors", tmp_path / "sae.safetensors")
    (tmp_path / "config.json").write_text(
        json.dumps({"layer": 0, "d_model": 64, "width": WIDTH, "activation": "topk", "k": 4})
    )
    topk = SparseAutoencoder.load(tmp_path)
    active = topk.encode(x)
    assert ((active > 0).sum(-1) <= 4).all()
    pre = (x - topk.b_dec) @ topk.W_enc + topk.b_enc
    kept = pre.topk(4, dim=-1)
    torch.testing.assert_close(active.gather(-1, kept.indices), torch.relu(kept.values))


def test_directions_and_strategies(sae):
    assert float(sae.direction(PLANTED).norm()) == pytest.approx(1.0, abs=1e-6)
    assert sae.strategies() == {"Backtracking": [PLANTED, 3], "Verification": [11]}
    assert sae.features_for("Verification") == [11]
    with pytest.raises(SaeError, match="no features for strategy 'Planning'"):
        sae.features_for("Planning")
    with pytest.raises(SaeError, match=r"outside the SAE's width \[0, 256\)"):
        sae.direction(WIDTH)


def test_an_sae_for_another_width_is_refused_naming_both_shapes(lm, tmp_path):
    other = SparseAutoencoder.load(write_sae(tmp_path, d_model=32, width=16, layer=0))
    with pytest.raises(SaeError) as err:
        other.check_against(lm.config)
    assert "d_model 32" in str(err.value) and "hidden_size is 64" in str(err.value)


def test_an_sae_for_a_layer_the_model_lacks_is_refused(lm, tmp_path):
    other = SparseAutoencoder.load(write_sae(tmp_path, d_model=64, width=16, layer=2))
    with pytest.raises(SaeError, match=r"layer 2, outside the model's layers \[0, 2\)"):
        other.check_against(lm.config.to_dict())


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"activation": "gelu"}, "`activation` must be one of ['relu', 'topk'], got 'gelu'"),
        ({"activation": "topk"}, "`k` is missing"),
        ({"activation": "topk", "k": 17}, "`k` must be <= width (16)"),
        ({"layer": -1}, "`layer` must be an integer >= 0"),
        ({"width": None}, "`width` must be an integer >= 1"),
    ],
)
def test_a_bad_config_is_refused_naming_the_field(tmp_path, config, message):
    path = write_sae(tmp_path, d_model=8, width=16, layer=0)
    data = json.loads((path / "config.json").read_text())
    (path / "config.json").write_text(json.dumps(data | config))
    with pytest.raises(SaeError) as err:
        SparseAutoencoder.load(path)
    assert "config.json" in str(err.value) and message in str(err.value)


@pytest.mark.parametrize(
    ("csv_text", "message"),
    [
        ("feature_idx,strategy\n3,Backtracking\n16,Backtracking\n", "features.csv:3: `feature_idx` 16 is outside"),
        ("feature_idx,strategy\nthree,Backtracking\n", "features.csv:2: `feature_idx` must be an integer"),
        ("feature_idx,strategy\n3,\n", "features.csv:2: `strategy` is empty"),
        ("index,name\n3,Backtracking\n", "features.csv: the header must be `feature_idx,strategy`"),
        ("feature_idx,strategy\n3,Backtracking,extra\n", "features.csv:2: expected 2 fields"),
    ],
)
def test_a_bad_features_csv_is_refused_naming_the_line_and_field(tmp_path, csv_text, message):
    path = write_sae(tmp_path, d_model=8, width=16, layer=0)
    (path / "features.csv").write_text(csv_text)
    with pytest.raises(SaeError) as err:
        SparseAutoencoder.load(path)
    assert message in str(err.value)


def test_missing_or_misshapen_weights_are_refused(tmp_path):
    from safetensors.torch import load_file, save_file

    path = write_sae(tmp_path, d_model=8, width=16, layer=0)
    tensors = load_file(str(path / "sae.safetensors"))
    save_file({k: v for k, v in tensors.items() if k != "b_enc"}, str(path / "sae.safetensors"))
    with pytest.raises(SaeError, match=r"sae.safetensors: tensor `b_enc` is missing \(expected shape \[16\]\)"):
        SparseAutoencoder.load(path)
    save_file(tensors | {"W_dec": tensors["W_dec"].T.contiguous()}, str(path / "sae.safetensors"))
    with pytest.raises(SaeError, match=r"`W_dec` has shape \[8, 16\], expected \[16, 8\]"):
        SparseAutoencoder.load(path)
    (path / "sae.safetensors").unlink()
    with pytest.raises(SaeError, match=r"sae\.safetensors: missing"):
        SparseAutoencoder.load(path)
