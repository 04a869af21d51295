"""ParScale checkpoints in the released layout, for tests, the demo and benchmarks (no machine
here can download the real ones): ``config.json`` as the releases have it (``qwen2_parscale``,
``Qwen2ParScaleForCausalLM``, ``auto_map`` to the remote code, the three ``parscale_*`` fields),
``generation_config.json``, ``model.safetensors`` under the official names (a Qwen2 causal LM plus
``model.layers.N.self_attn.prefix_k`` / ``prefix_v`` and ``model.aggregate_layer.{0,2}``) and the
real Qwen tokenizer, built offline.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from guard.model.checkpoint_writer import copy_tokenizer_files
from guard.text.offline_tokenizer import cached_qwen3_tokenizer_dir

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
)
# ParScale-1.8B-P* (Qwen2 shape, 36 layers): for benchmarks with random weights.
SHAPE_1_8B = dict(
    hidden_size=1536,
    intermediate_size=8960,
    num_hidden_layers=36,
    num_attention_heads=16,
    num_key_value_heads=2,
)
SHAPES = {"tiny": TINY, "1.8B": SHAPE_1_8B}
AUTO_MAP = {
    "AutoConfig": "configuration_qwen2_parscale.Qwen2ParScaleConfig",
    "AutoModelForCausalLM": "modeling_qwen2_parscale.Qwen2ParScaleForCausalLM",
}


def parscale_config_dict(
    shape: str | dict[str, Any] = "tiny",
    *,
    parscale_n: int = 4,
    prefix_tokens: int = 8,
    smoothing: float = 0.1,
    vocab_size: int = 151936,
    tie_word_embeddings: bool = True,
    **extra: Any,
) -> dict[str, Any]:
    """``config.json`` of a ParScale checkpoint as the releases write it."""
    dims = SHAPES[shape] if isinstance(shape, str) else shape
    config = {
        "architectures": ["Qwen2ParScaleForCausalLM"],
        "auto_map": AUTO_MAP,
        "model_type": "qwen2_parscale",
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151643,
        "hidden_act": "silu",
        "initializer_range": 0.02,
        "max_position_embeddings": 4096,
        "max_window_layers": dims["num_hidden_layers"],
        "rms_norm_eps": 1e-6,
        "rope_theta": 10000.0,
        "sliding_window": 4096,
        "use_sliding_window": False,
        "use_cache": True,
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": "bfloat16",
        "transformers_version": "4.46.2",
        "vocab_size": vocab_size,
        "parscale_n": parscale_n,
        "parscale_n_tokens": prefix_tokens,
        "parscale_attn_smooth": smoothing,
        **dims,
        **extra,
    }
    return config


def qwen2_config(config: dict[str, Any]):
    """The stock transformers ``Qwen2Config`` of the same base model (P = 1 is exactly it)."""
    from transformers import Qwen2Config

    keys = (
        "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
        "num_key_value_heads", "max_position_embeddings", "rms_norm_eps", "rope_theta", "tie_word_embeddings",
        "bos_token_id", "eos_token_id",
    )  # fmt: skip
    return Qwen2Config(**{k: config[k] for k in keys}, use_sliding_window=False)


def random_parscale_state(config: dict[str, Any], seed: int = 0) -> dict[str, torch.Tensor]:
    """Random weights under the official names: a transformers Qwen2 causal LM's, plus each
    layer's prefix and the aggregation MLP (scaled so the streams differ and the weights vary)."""
    from transformers import Qwen2ForCausalLM

    torch.manual_seed(seed)
    state = {k: v.contiguous() for k, v in Qwen2ForCausalLM(qwen2_config(config)).state_dict().items()}
    p, hidden = config["parscale_n"], config["hidden_size"]
    for name, tensor in state.items():  # Qwen2 initialises the q/k/v biases to zero: make them count
        if name.endswith("_proj.bias"):
            state[name] = torch.randn_like(tensor) * 0.5
    if config["tie_word_embeddings"]:
        state.pop("lm_head.weight", None)
    if p > 1:
        heads, kv = config["num_attention_heads"], config["num_key_value_heads"]
        head_dim = config.get("head_dim") or hidden // heads
        shape = (p, kv, config["parscale_n_tokens"], head_dim)
        for layer in range(config["num_hidden_layers"]):
            state[f"model.layers.{layer}.self_attn.prefix_k"] = torch.randn(shape)
            state[f"model.layers.{layer}.self_attn.prefix_v"] = torch.randn(shape)
        state["model.aggregate_layer.0.weight"] = torch.randn(hidden, p * hidden) / (p * hidden) ** 0.5
        state["model.aggregate_layer.0.bias"] = torch.randn(hidden) * 0.1
        state["model.aggregate_layer.2.weight"] = torch.randn(p, hidden) / hidden**0.5 * 4
        state["model.aggregate_layer.2.bias"] = torch.randn(p) * 0.1
    return state


def write_parscale_checkpoint(
    out_dir: Path,
    *,
    config: dict[str, Any] | None = None,
    state: dict[str, torch.Tensor] | None = None,
    seed: int = 0,
    shards: int = 1,
    dtype: torch.dtype = torch.float32,
    tokenizer_dir: Path | None = None,
) -> Path:
    """A checkpoint in the released layout (random weights unless ``state`` is given; ``shards`` > 1
    writes ``model-0000k-of-0000n.safetensors`` with an index, as large checkpoints are released)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = config or parscale_config_dict()
    state = state if state is not None else random_parscale_state(config, seed)
    tensors = {k: v.to(dtype).contiguous() for k, v in state.items()}
    names = sorted(tensors)
    if shards <= 1:
        save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    else:
        weight_map = {}
        for k in range(shards):
            file = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
            part = names[k::shards]
            save_file({n: tensors[n] for n in part}, str(out / file), metadata={"format": "pt"})
            weight_map.update({n: file for n in part})
        (out / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}, indent=2))
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    generation = {"bos_token_id": 151643, "eos_token_id": [151645, 151643], "do_sample": False}
    (out / "generation_config.json").write_text(json.dumps(generation, indent=2) + "\n")
    copy_tokenizer_files(tokenizer_dir or cached_qwen3_tokenizer_dir(), out)
    return out
