"""Checkpoints in the official layout load without remote code; broken ones fail with a clear error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from guard.model.checkpoint import load_stream_guard
from guard.model.config import CheckpointError
from guard.model.labels import RiskLevel


@pytest.mark.parametrize("name", ["tied-gqa", "untied-mha-sharded", "long-labels"])
def test_every_fixture_shape_loads_with_its_config_labels(checkpoints, name):
    path = checkpoints[name]
    raw = json.loads((path / "config.json").read_text())
    guard = load_stream_guard(path)
    cfg = guard.config
    assert cfg.response_categories.names == tuple(
        raw["response_category_map"][str(i)] for i in range(raw["num_category"])
    )
    assert cfg.query_categories.names == tuple(
        raw["query_category_map"][str(i)] for i in range(raw["num_query_category"])
    )
    assert cfg.response_risk.levels[cfg.response_risk.labels.names.index("Unsafe")] is RiskLevel.UNSAFE
    assert guard.model.model.embed_tokens.weight.shape == (raw["vocab_size"], raw["hidden_size"])
    assert not cfg.is_demo


def test_weights_are_loaded_under_the_official_names(checkpoints):
    path = checkpoints["tied-gqa"]
    tensors = load_file(str(path / "model.safetensors"))
    guard = load_stream_guard(path)
    assert torch.equal(guard.model.response_head.pre.weight, tensors["risk_level_category_pre.weight"])
    assert torch.equal(guard.model.query_head.category.weight, tensors["query_category_head.weight"])
    assert torch.equal(
        guard.model.model.layers[1].self_attn.k_norm.weight, tensors["model.layers.1.self_attn.k_norm.weight"]
    )


def test_bfloat16_load_keeps_the_requested_dtype(tiny_checkpoint):
    guard = load_stream_guard(tiny_checkpoint, dtype=torch.bfloat16)
    assert guard.model.model.layers[0].mlp.up_proj.weight.dtype == torch.bfloat16


@pytest.fixture()
def broken(tmp_path, tiny_checkpoint):
    """A writable copy of a good checkpoint to damage."""
    target = tmp_path / "ckpt"
    shutil.copytree(tiny_checkpoint, target)
    return target


def _edit_config(path, **changes):
    cfg = json.loads((path / "config.json").read_text())
    for key, value in changes.items():
        if value is None:
            cfg.pop(key, None)
        else:
            cfg[key] = value
    (path / "config.json").write_text(json.dumps(cfg))


def test_wrong_architecture_is_rejected_with_the_expected_name(broken):
    _edit_config(broken, architectures=["Qwen3ForCausalLM"])
    with pytest.raises(CheckpointError, match="Qwen3ForGuardModel"):
        load_stream_guard(broken)


def test_missing_head_size_is_named(broken):
    _edit_config(broken, guard_inner_size=None)
    with pytest.raises(CheckpointError, match="guard_inner_size"):
        load_stream_guard(broken)


def test_label_map_that_does_not_match_the_head_is_rejected(broken):
    _edit_config(broken, response_category_map={"0": "Violent"})
    with pytest.raises(CheckpointError, match="response_category_map"):
        load_stream_guard(broken)


def test_unknown_risk_label_is_rejected(broken):
    _edit_config(broken, response_risk_level_map={"0": "Safe", "1": "Bad", "2": "Controversial"})
    with pytest.raises(CheckpointError, match="Bad"):
        load_stream_guard(broken)


def test_missing_tensor_is_reported(broken):
    tensors = load_file(str(broken / "model.safetensors"))
    del tensors["query_risk_level_head.weight"]
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"query_head\.risk\.weight"):
        load_stream_guard(broken)


def test_unexpected_tensor_is_reported(broken):
    tensors = load_file(str(broken / "model.safetensors"))
    tensors["score.weight"] = torch.zeros(3, 3)
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"score\.weight"):
        load_stream_guard(broken)


def test_tensor_with_the_wrong_shape_is_reported(broken):
    tensors = load_file(str(broken / "model.safetensors"))
    tensors["risk_level_head.weight"] = torch.zeros(4, tensors["risk_level_head.weight"].shape[1])
    save_file(tensors, str(broken / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"response_head\.risk\.weight"):
        load_stream_guard(broken)


def test_directory_without_weights_is_reported(broken):
    (broken / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match=r"model\.safetensors"):
        load_stream_guard(broken)
