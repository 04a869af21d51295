"""Tiny Qwen3-Embedding / Qwen3-Reranker checkpoints in the released layouts, for tests, the
demo models and benchmarks (no machine here can download the real ones).

Embedding: flat weight names (``layers.0...``, as released) or the ``model.``-prefixed layout,
optionally with the sentence-transformers files. Reranker: the original causal LM
(``Qwen3ForCausalLM``) or the converted one-logit sequence classifier. The real Qwen3 tokenizer
(built offline) is copied in.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from guard.model.checkpoint_writer import copy_tokenizer_files
from guard.retrieval.checkpoint import DEFAULT_EMBED_TASK
from guard.text.offline_tokenizer import cached_qwen3_tokenizer_dir

TINY = dict(
    hidden_size=64,
    intermediate_size=128,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    head_dim=16,
)
# The 0.6B family shape (Qwen3-Embedding-0.6B / Qwen3-Reranker-0.6B), for benchmarks.
SHAPE_0_6B = dict(
    hidden_size=1024,
    intermediate_size=3072,
    num_hidden_layers=28,
    num_attention_heads=16,
    num_key_value_heads=8,
    head_dim=128,
)
SHAPES = {"tiny": TINY, "0.6B": SHAPE_0_6B}


def qwen3_config(shape: str | dict[str, Any] = "tiny", **extra: Any):
    from transformers import Qwen3Config

    fields = dict(SHAPES[shape]) if isinstance(shape, str) else dict(shape)
    fields.setdefault("vocab_size", 151936)
    fields.setdefault("max_position_embeddings", 32768)
    fields.setdefault("rope_theta", 1000000.0)
    fields.setdefault("tie_word_embeddings", True)
    fields.update(extra)
    return Qwen3Config(**fields)


def _write_config(out: Path, config, architectures: list[str], extra: dict[str, Any] | None) -> None:
    data = config.to_dict()
    data["architectures"] = architectures
    data.update(extra or {})
    (out / "config.json").write_text(json.dumps(data, indent=2, ensure_ascii=False) + "\n")


def write_embedding_checkpoint(
    out_dir: Path,
    *,
    shape: str | dict[str, Any] = "tiny",
    seed: int = 0,
    layout: str = "flat",
    sentence_transformers: bool = True,
    task: str = DEFAULT_EMBED_TASK,
    max_seq_length: int | None = None,
    state: dict[str, torch.Tensor] | None = None,
    extra_config: dict[str, Any] | None = None,
    tokenizer_dir: Path | None = None,
) -> Path:
    """A Qwen3-Embedding checkpoint: random weights (``seed``) or ``state`` (Qwen3Model names)."""
    from transformers import Qwen3Model

    if layout not in ("flat", "prefixed"):
        raise ValueError(f"layout must be 'flat' or 'prefixed', got {layout!r}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    config = qwen3_config(shape)
    if state is None:
        torch.manual_seed(seed)
        state = Qwen3Model(config).state_dict()
    prefix = "model." if layout == "prefixed" else ""
    tensors = {prefix + k: v.contiguous() for k, v in state.items() if not k.endswith("inv_freq")}
    save_file(tensors, str(out / "model.safetensors"), metadata={"format": "pt"})
    _write_config(out, config, ["Qwen3ForCausalLM"], extra_config)  # as released
    copy_tokenizer_files(tokenizer_dir or cached_qwen3_tokenizer_dir(), out)
    if sentence_transformers:
        modules = [
            {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
            {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
            {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"},
        ]
        (out / "modules.json").write_text(json.dumps(modules, indent=2) + "\n")
        (out / "1_Pooling").mkdir(exist_ok=True)
        pooling = {
            "word_embedding_dimension": config.hidden_size,
            "pooling_mode_cls_token": False,
            "pooling_mode_mean_tokens": False,
            "pooling_mode_max_tokens": False,
            "pooling_mode_mean_sqrt_len_tokens": False,
            "pooling_mode_weightedmean_tokens": False,
            "pooling_mode_lasttoken": True,
            "include_prompt": True,
        }
        (out / "1_Pooling" / "config.json").write_text(json.dumps(pooling, indent=2) + "\n")
        (out / "2_Normalize").mkdir(exist_ok=True)
        prompts = {"prompts": {"query": f"Instruct: {task}\nQuery:", "document": ""}, "default_prompt_name": None}
        (out / "config_sentence_transformers.json").write_text(json.dumps(prompts, indent=2) + "\n")
        if max_seq_length:
            bert = {"max_seq_length": max_seq_length, "do_lower_case": False}
            (out / "sentence_bert_config.json").write_text(json.dumps(bert, indent=2) + "\n")
    return out


def write_reranker_checkpoint(
    out_dir: Path,
    *,
    shape: str | dict[str, Any] = "tiny",
    seed: int = 0,
    kind: str = "causal-lm",
    tie_word_embeddings: bool = True,
    model: torch.nn.Module | None = None,
    extra_config: dict[str, Any] | None = None,
    tokenizer_dir: Path | None = None,
) -> Path:
    """A Qwen3-Reranker checkpoint written by transformers itself (``save_pretrained``): random
    weights (``seed``) or ``model`` (a Qwen3ForCausalLM / Qwen3ForSequenceClassification)."""
    from transformers import Qwen3ForCausalLM, Qwen3ForSequenceClassification

    out = Path(out_dir)
    if model is None:
        torch.manual_seed(seed)
        if kind == "causal-lm":
            model = Qwen3ForCausalLM(qwen3_config(shape, tie_word_embeddings=tie_word_embeddings))
        elif kind == "sequence-classification":
            model = Qwen3ForSequenceClassification(qwen3_config(shape, num_labels=1, pad_token_id=151643))
        else:
            raise ValueError(f"kind must be 'causal-lm' or 'sequence-classification', got {kind!r}")
    for key, value in (extra_config or {}).items():
        setattr(model.config, key, value)
    model.save_pretrained(str(out))
    copy_tokenizer_files(tokenizer_dir or cached_qwen3_tokenizer_dir(), out)
    return out


# Qwen3-VL: the tiny shape of the reference notes (text 64 x 2 layers, interleaved M-RoPE; a
# 2-block vision tower with one deepstack layer), and the 2B family shape for benchmarks.
TINY_VL_TEXT = dict(TINY, rope_scaling={"rope_type": "default", "mrope_section": [2, 3, 3], "mrope_interleaved": True})
TINY_VL_VISION = dict(
    depth=2,
    hidden_size=32,
    intermediate_size=64,
    num_heads=2,
    out_hidden_size=64,
    patch_size=16,
    spatial_merge_size=2,
    temporal_patch_size=2,
    deepstack_visual_indexes=[1],
    num_position_embeddings=2304,
)
VL_SHAPES = {"tiny": (TINY_VL_TEXT, TINY_VL_VISION)}
# preprocessor_config.json as the Qwen3-VL releases ship it
VL_PREPROCESSOR = {
    "size": {"longest_edge": 16777216, "shortest_edge": 65536},
    "patch_size": 16,
    "temporal_patch_size": 2,
    "merge_size": 2,
    "image_mean": [0.5, 0.5, 0.5],
    "image_std": [0.5, 0.5, 0.5],
    "processor_class": "Qwen3VLProcessor",
    "image_processor_type": "Qwen2VLImageProcessorFast",
}


def qwen3_vl_config(shape: str = "tiny"):
    from transformers import Qwen3VLConfig

    text, vision = VL_SHAPES[shape]
    text = dict(text, vocab_size=151936, max_position_embeddings=32768, rope_theta=5000000.0, tie_word_embeddings=True)
    return Qwen3VLConfig(
        text_config=text,
        vision_config=dict(vision),
        image_token_id=151655,
        video_token_id=151656,
        vision_start_token_id=151652,
        vision_end_token_id=151653,
        tie_word_embeddings=True,
    )


def write_vl_checkpoint(
    out_dir: Path, *, shape: str = "tiny", seed: int = 0, tokenizer_dir: Path | None = None
) -> Path:
    """A Qwen3-VL-Embedding / Qwen3-VL-Reranker checkpoint as released: a
    ``Qwen3VLForConditionalGeneration`` saved by transformers (``model.language_model.*``,
    ``model.visual.*``), the preprocessor config, the chat template and the real tokenizer. The
    two models share this layout; the serving code decides how the last hidden state is read."""
    from transformers import Qwen3VLForConditionalGeneration

    from guard.retrieval.vl_prompt import builtin_chat_template

    out = Path(out_dir)
    torch.manual_seed(seed)
    Qwen3VLForConditionalGeneration(qwen3_vl_config(shape)).save_pretrained(str(out))
    (out / "preprocessor_config.json").write_text(json.dumps(VL_PREPROCESSOR, indent=2) + "\n")
    copy_tokenizer_files(tokenizer_dir or cached_qwen3_tokenizer_dir(), out)
    (out / "chat_template.jinja").unlink(missing_ok=True)  # the text model's; Qwen3-VL ships its own
    (out / "chat_template.json").write_text(json.dumps({"chat_template": builtin_chat_template()}, indent=2) + "\n")
    return out
