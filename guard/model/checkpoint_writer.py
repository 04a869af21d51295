"""Write Qwen3Guard-Stream checkpoints in the official layout (test fixtures, demo models, benchmarks).

Weights are generated under the official tensor names straight from the config, independent of
our module names, so loading them exercises the same mapping a real checkpoint goes through.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from guard.model.checkpoint import HEAD_PARAMETER_NAMES
from guard.model.config import GUARD_ARCHITECTURE
from guard.text.offline_tokenizer import cached_qwen3_tokenizer_dir, copy_tokenizer_files

RISK_LABELS = ("Safe", "Unsafe", "Controversial")
RESPONSE_CATEGORIES = (
    "Violent",
    "Sexual Content",
    "Self-Harm",
    "Political",
    "PII",
    "Copyright",
    "Illegal Acts",
    "Unethical",
)
QUERY_CATEGORIES = (*RESPONSE_CATEGORIES, "Jailbreak")
QWEN3_VOCAB_SIZE = 151936

# Backbone shapes from the reference table (vocab 151936, head_dim 128 everywhere).
SHAPES: dict[str, dict[str, Any]] = {
    "0.6B": dict(
        hidden_size=1024,
        num_hidden_layers=28,
        num_attention_heads=16,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=3072,
        tie_word_embeddings=True,
        guard_inner_size=512,
    ),
    "4B": dict(
        hidden_size=2560,
        num_hidden_layers=36,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        intermediate_size=9728,
        tie_word_embeddings=True,
        guard_inner_size=512,
    ),
    # The built-in demo model (guard.demo.stream_model): small enough to train in seconds.
    "demo": dict(
        hidden_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=32,
        intermediate_size=256,
        tie_word_embeddings=True,
        guard_inner_size=64,
    ),
    "tiny": dict(
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        intermediate_size=128,
        tie_word_embeddings=True,
        guard_inner_size=32,
    ),
}


def _index_map(labels: tuple[str, ...]) -> dict[str, str]:
    return {str(i): name for i, name in enumerate(labels)}


def stream_guard_config(
    *,
    hidden_size: int,
    num_hidden_layers: int,
    num_attention_heads: int,
    num_key_value_heads: int,
    head_dim: int,
    intermediate_size: int,
    guard_inner_size: int,
    tie_word_embeddings: bool,
    vocab_size: int = QWEN3_VOCAB_SIZE,
    risk_labels: tuple[str, ...] = RISK_LABELS,
    response_categories: tuple[str, ...] = RESPONSE_CATEGORIES,
    query_categories: tuple[str, ...] = QUERY_CATEGORIES,
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """A config.json dict in the Qwen3Guard-Stream layout."""
    cfg = {
        "architectures": [GUARD_ARCHITECTURE],
        "model_type": "qwen3",
        "attention_bias": False,
        "attention_dropout": 0.0,
        "bos_token_id": 151643,
        "eos_token_id": 151645,
        "hidden_act": "silu",
        "hidden_size": hidden_size,
        "head_dim": head_dim,
        "initializer_range": 0.02,
        "intermediate_size": intermediate_size,
        "max_position_embeddings": 40960,
        "num_attention_heads": num_attention_heads,
        "num_hidden_layers": num_hidden_layers,
        "num_key_value_heads": num_key_value_heads,
        "rms_norm_eps": 1e-6,
        "rope_scaling": None,
        "rope_theta": 1000000.0,
        "tie_word_embeddings": tie_word_embeddings,
        "torch_dtype": "bfloat16",
        "use_cache": True,
        "vocab_size": vocab_size,
        "guard_inner_size": guard_inner_size,
        "num_risk_level": len(risk_labels),
        "num_category": len(response_categories),
        "num_query_risk_level": len(risk_labels),
        "num_query_category": len(query_categories),
        "response_risk_level_map": _index_map(risk_labels),
        "response_category_map": _index_map(response_categories),
        "query_risk_level_map": _index_map(risk_labels),
        "query_category_map": _index_map(query_categories),
    }
    cfg.update(extra or {})
    return cfg


def official_tensor_shapes(cfg: dict[str, Any]) -> dict[str, tuple[int, ...]]:
    """Every tensor of the official checkpoint with its shape."""
    h, d, inter = cfg["hidden_size"], cfg["head_dim"], cfg["intermediate_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    inner = cfg["guard_inner_size"]
    shapes: dict[str, tuple[int, ...]] = {
        "model.embed_tokens.weight": (cfg["vocab_size"], h),
        "model.norm.weight": (h,),
    }
    for i in range(cfg["num_hidden_layers"]):
        p = f"model.layers.{i}."
        shapes.update(
            {
                p + "input_layernorm.weight": (h,),
                p + "post_attention_layernorm.weight": (h,),
                p + "self_attn.q_proj.weight": (heads * d, h),
                p + "self_attn.k_proj.weight": (kv * d, h),
                p + "self_attn.v_proj.weight": (kv * d, h),
                p + "self_attn.o_proj.weight": (h, heads * d),
                p + "self_attn.q_norm.weight": (d,),
                p + "self_attn.k_norm.weight": (d,),
                p + "mlp.gate_proj.weight": (inter, h),
                p + "mlp.up_proj.weight": (inter, h),
                p + "mlp.down_proj.weight": (h, inter),
            }
        )
    for prefix, n_risk, n_cat in (
        ("", cfg["num_risk_level"], cfg["num_category"]),
        ("query_", cfg["num_query_risk_level"], cfg["num_query_category"]),
    ):
        shapes[f"{prefix}risk_level_category_pre.weight"] = (inner, h)
        shapes[f"{prefix}risk_level_category_layernorm.weight"] = (inner,)
        shapes[f"{prefix}risk_level_head.weight"] = (n_risk, inner)
        shapes[f"{prefix}category_head.weight"] = (n_cat, inner)
    if not cfg.get("tie_word_embeddings", False):
        shapes["lm_head.weight"] = (cfg["vocab_size"], h)
    return shapes


def random_official_weights(
    cfg: dict[str, Any], seed: int, dtype: torch.dtype = torch.float32
) -> dict[str, torch.Tensor]:
    """Random weights under the official names; norms near 1 so activations stay well scaled."""
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for name, shape in official_tensor_shapes(cfg).items():
        if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
            tensor = 1.0 + 0.1 * torch.randn(shape, generator=gen)
        else:
            scale = 1.0 if name.endswith("embed_tokens.weight") else shape[-1] ** -0.5  # unit-variance outputs
            tensor = torch.randn(shape, generator=gen) * scale
        weights[name] = tensor.to(dtype)
    return weights


def module_to_official_names(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our parameter names -> checkpoint names (inverse of the loader's table)."""
    inverse = {v: k for k, v in HEAD_PARAMETER_NAMES.items()}
    out = {}
    for name, tensor in state.items():
        if name.endswith("inv_freq"):
            continue
        prefix, _, param = name.rpartition(".")
        out[f"{inverse.get(prefix, prefix)}.{param}"] = tensor
    return out


def write_checkpoint(
    out_dir: Path,
    cfg: dict[str, Any],
    weights: dict[str, torch.Tensor],
    *,
    shards: int = 1,
    tokenizer_dir: Path | None = None,
) -> Path:
    """Write config.json, safetensors (one file or ``shards`` files + index) and tokenizer files."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")
    weights = {k: v.contiguous() for k, v in weights.items()}
    meta = {"format": "pt"}
    if shards <= 1:
        save_file(weights, str(out_dir / "model.safetensors"), metadata=meta)
    else:
        names = sorted(weights)
        weight_map = {}
        for i in range(shards):
            shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = {n: weights[n] for n in names[i::shards]}
            save_file(part, str(out_dir / shard), metadata=meta)
            weight_map.update(dict.fromkeys(part, shard))
        total = sum(t.numel() * t.element_size() for t in weights.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    copy_tokenizer_files(tokenizer_dir or cached_qwen3_tokenizer_dir(), out_dir)
    return out_dir


def write_random_checkpoint(
    out_dir: Path,
    shape: str | dict[str, Any],
    *,
    seed: int = 0,
    shards: int = 1,
    dtype: torch.dtype = torch.float32,
    **overrides: Any,
) -> Path:
    """A randomly initialised Stream checkpoint of a named shape (see ``SHAPES``) or explicit fields."""
    fields = dict(SHAPES[shape]) if isinstance(shape, str) else dict(shape)
    fields.update(overrides)
    cfg = stream_guard_config(**fields)
    return write_checkpoint(out_dir, cfg, random_official_weights(cfg, seed, dtype), shards=shards)
