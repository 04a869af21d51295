"""Loading Qwen3-Embedding and Qwen3-Reranker checkpoints as released, without remote code.

Embedding checkpoints ship the backbone under flat names (``layers.0...``, no ``model.``
prefix); the ``model.``-prefixed layout loads too (transformers strips the base-model prefix).
sentence-transformers files are read when present: ``modules.json`` (a Normalize module makes
normalising the default), ``1_Pooling/config.json`` (last-token pooling is the one these models
use; anything else is refused by name), ``config_sentence_transformers.json`` (the query prompt,
``Instruct: {task}\\nQuery:``, gives the default task) and ``sentence_bert_config.json``
(``max_seq_length``).

Reranker checkpoints are either the original causal LM (``Qwen3ForCausalLM``: the score is
P(yes) from the yes/no logits at the last position) or the converted sequence classifier
(``Qwen3ForSequenceClassification``, one logit). A checkpoint whose weights do not cover the
model is refused with the names that are missing: never silently random.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

DEFAULT_EMBED_TASK = "Given a web search query, retrieve relevant passages that answer the query"
DEFAULT_RERANK_INSTRUCTION = "Given a web search query, retrieve relevant passages that answer the query"
DEFAULT_MAX_LENGTH = 8192  # the official examples' max_length
MRL_MIN = 32  # the smallest MRL dimension of the Qwen3-Embedding family (model cards)
QUERY_PROMPT = re.compile(r"^Instruct: (?P<task>.*)\nQuery:$", re.S)


class RetrievalCheckpointError(ValueError):
    """The directory is not a loadable Qwen3 embedding or reranker checkpoint (says why)."""


def _read_json(path: Path) -> dict[str, Any] | list[Any] | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise RetrievalCheckpointError(f"{path} is not valid JSON: {exc}") from exc


@dataclass(frozen=True)
class EmbeddingLayout:
    """What the checkpoint's files say about serving it."""

    default_task: str
    normalize: bool
    max_length: int
    sentence_transformers: bool  # the sentence-transformers files were there


def read_embedding_layout(path: Path, max_position_embeddings: int) -> EmbeddingLayout:
    modules = _read_json(path / "modules.json")
    normalize = True  # Qwen3-Embedding: L2-normalise, then dot product
    pooling_dir = "1_Pooling"
    if isinstance(modules, list):
        types = [str(m.get("type", "")) for m in modules]
        normalize = any(t.endswith("Normalize") for t in types)
        for m in modules:
            if str(m.get("type", "")).endswith("Pooling"):
                pooling_dir = m.get("path", pooling_dir)
    pooling = _read_json(path / pooling_dir / "config.json")
    if isinstance(pooling, dict):
        on = [k for k, v in pooling.items() if k.startswith("pooling_mode_") and v]
        modes = sorted(k.removeprefix("pooling_mode_") for k in on)
        if modes != ["lasttoken"]:
            raise RetrievalCheckpointError(
                f"{path}: pooling {modes or 'none'} in {pooling_dir}/config.json; "
                "Qwen3-Embedding uses last-token pooling"
            )
    task = DEFAULT_EMBED_TASK
    st_config = _read_json(path / "config_sentence_transformers.json")
    if isinstance(st_config, dict):
        prompt = (st_config.get("prompts") or {}).get("query")
        if prompt:
            match = QUERY_PROMPT.match(prompt)
            if match is None:
                raise RetrievalCheckpointError(
                    f"{path}: the query prompt {prompt!r} is not of the form 'Instruct: <task>\\nQuery:'"
                )
            task = match["task"]
    max_length = min(DEFAULT_MAX_LENGTH, max_position_embeddings)
    bert = _read_json(path / "sentence_bert_config.json")
    if isinstance(bert, dict) and bert.get("max_seq_length"):
        max_length = min(int(bert["max_seq_length"]), max_position_embeddings)
    return EmbeddingLayout(task, normalize, max_length, modules is not None)


def load_pretrained(cls: Any, path: Path, *, dtype: torch.dtype, device: str) -> torch.nn.Module:
    """``cls.from_pretrained`` that refuses a checkpoint whose weights leave parameters missing."""
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # a server's log is not a terminal
    try:
        model, info = cls.from_pretrained(str(path), dtype=dtype, output_loading_info=True)
    except (OSError, ValueError, KeyError) as exc:
        raise RetrievalCheckpointError(f"{path}: cannot load as {cls.__name__}: {exc}") from exc
    missing = [k for k in info.get("missing_keys", []) if not k.endswith("rotary_emb.inv_freq")]
    if missing:
        raise RetrievalCheckpointError(f"{path}: the checkpoint lacks weights for {sorted(missing)[:6]}")
    return model.to(device).eval()


VISION_LANGUAGE = "qwen3_vl"  # Qwen3-VL-Embedding / Qwen3-VL-Reranker


def read_config(path: Path) -> dict[str, Any]:
    """``config.json`` of a Qwen3 (text) or Qwen3-VL checkpoint."""
    config = _read_json(Path(path) / "config.json")
    if not isinstance(config, dict):
        raise RetrievalCheckpointError(f"{path}: no config.json (expected a Qwen3 checkpoint directory)")
    if config.get("model_type") not in ("qwen3", VISION_LANGUAGE):
        raise RetrievalCheckpointError(
            f"{path}: model_type {config.get('model_type')!r}, expected 'qwen3' or '{VISION_LANGUAGE}'"
        )
    return config


def text_config(config: dict[str, Any]) -> dict[str, Any]:
    """The language model's fields (a Qwen3-VL config nests them under ``text_config``)."""
    return config.get("text_config") or config if config.get("model_type") == VISION_LANGUAGE else config
