"""Qwen3-Embedding served: text (or token ids) in, one vector per input out.

The recipe is the model's own (QwenLM/Qwen3-Embedding): queries are written as
``Instruct: {task}\\nQuery:{query}`` (the request's instruction, else the checkpoint's default
task), documents as they are; ``<|endoftext|>`` is appended and its final hidden state is the
embedding (last-token pooling over left-padded batches). MRL: the vector is truncated to the
requested ``dimensions`` first, then L2-normalised. Inputs from all callers are batched by the
shared ``Batcher`` under a token budget.

A Qwen3-VL-Embedding checkpoint (``model_type: qwen3_vl``) is served by the same class: its
inputs may carry images and videos, and every input is written in that model's chat template
(``vl_prompt``); queries get the instruction as the system prompt, documents the default one.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from guard.errors import InvalidInput
from guard.model.config import DEMO_MARKER
from guard.retrieval.backbone import ForwardStats, LastHiddenState, run_forward
from guard.retrieval.batching import BatchedSequences, BatchLimits
from guard.retrieval.checkpoint import (
    MRL_MIN,
    VISION_LANGUAGE,
    EmbeddingLayout,
    RetrievalCheckpointError,
    load_pretrained,
    read_config,
    read_embedding_layout,
    text_config,
)
from guard.retrieval.inputs import Truncation, check_batch, checked_ids, fit
from guard.retrieval.vision import Content, Video, VisionLimits
from guard.retrieval.vl_backbone import VisionLanguageLastHidden
from guard.retrieval.vl_prompt import DEFAULT_MAX_LENGTH_VL, DEFAULT_VL_EMBED_INSTRUCTION, VisionPrompt
from guard.retrieval.vllm_backend import VllmPooling, timed_call

END_OF_TEXT = "<|endoftext|>"


@dataclass(frozen=True)
class EmbedInput:
    """One input: text (a query gets the instruction) or token ids used exactly as given; a
    Qwen3-VL model also takes images (encoded bytes) and videos beside the text."""

    text: str = ""
    query: bool = False
    token_ids: tuple[int, ...] | None = None
    images: tuple[bytes, ...] = ()
    videos: tuple[Video, ...] = ()


class Embedder(BatchedSequences[np.ndarray]):
    """``submit(sequences)`` gives each sequence's pooled hidden state (full dimension, not
    normalised); ``finish`` applies MRL and normalisation."""

    def __init__(
        self,
        path: str | Path,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        limits: BatchLimits | None = None,
        max_length: int | None = None,
        on_batch: Callable[[ForwardStats, float], None] | None = None,
        endpoint: str = "",
        endpoint_model: str = "",
        vision_limits: VisionLimits | None = None,
    ) -> None:
        """``endpoint``: a vLLM server computing the vectors (the `vllm` backend); ``path`` then
        supplies the tokenizer, config and sentence-transformers files, and no weights are loaded."""
        from transformers import AutoModel, AutoTokenizer, Qwen3VLModel

        self.path = Path(path)
        config = read_config(self.path)
        text = text_config(config)
        max_positions = int(text.get("max_position_embeddings", 32768))
        vision_language = config["model_type"] == VISION_LANGUAGE
        if vision_language and endpoint:
            raise RetrievalCheckpointError(
                f"{self.path}: the vllm backend serves text checkpoints; serve Qwen3-VL-Embedding locally"
            )
        if vision_language:
            self.layout = EmbeddingLayout(
                DEFAULT_VL_EMBED_INSTRUCTION, True, min(DEFAULT_MAX_LENGTH_VL, max_positions), False
            )
        else:
            self.layout = read_embedding_layout(self.path, max_positions)
        self.max_length = min(max_length or self.layout.max_length, self.layout.max_length)
        self.limits = limits or BatchLimits()
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        self.dimension = int(text["hidden_size"])
        self.vocab_size = int(text["vocab_size"])
        self.remote = VllmPooling(endpoint, model=endpoint_model) if endpoint else None
        self.backend = "vllm" if endpoint else "local"
        self.vision = (
            VisionPrompt(self.path, self.tokenizer, config, vision_limits or VisionLimits())
            if vision_language
            else None
        )
        model_class = Qwen3VLModel if vision_language else AutoModel
        self.model = None if endpoint else load_pretrained(model_class, self.path, dtype=dtype, device=device)
        self.mrl_min = min(MRL_MIN, self.dimension)
        self.demo = config.get(DEMO_MARKER)
        self.end_id = self.tokenizer.convert_tokens_to_ids(END_OF_TEXT)
        if self.end_id is None or self.end_id == self.tokenizer.unk_token_id:
            raise InvalidInput(f"{self.path}: the tokenizer has no {END_OF_TEXT} token")
        pad = self.tokenizer.pad_token_id
        self.forward = None
        pad_id = self.end_id if pad is None else pad
        if self.model is not None and self.vision is not None:
            self.forward = VisionLanguageLastHidden(
                self.model, self.vision, pad_id=pad_id, max_padded_tokens=self.limits.max_batch_tokens
            )
        elif self.model is not None:
            self.forward = LastHiddenState(self.model, pad_id=pad_id, max_padded_tokens=self.limits.max_batch_tokens)
        self.on_batch = on_batch  # metrics: each forward's stats and seconds
        self._start_batching("embedder", self.limits)

    # ------------------------------------------------------------------ requests -> sequences

    @property
    def modalities(self) -> tuple[str, ...]:
        return ("text", "image", "video") if self.vision is not None else ("text",)

    def sequence(self, item: EmbedInput, *, task: str | None, truncation: Truncation, what: str) -> list[int]:
        """The token ids the model reads for one input (template and ``<|endoftext|>`` included;
        for a Qwen3-VL model, a ``MultimodalSequence`` with its images and videos)."""
        if item.token_ids is not None:
            if item.images or item.videos:
                raise InvalidInput(f"{what}: token_ids are used as given; they cannot carry images or videos")
            ids = checked_ids(item.token_ids, self.vocab_size, f"{what}.token_ids")
            return fit(ids, self.max_length, Truncation.NONE, f"{what}.token_ids")
        if self.vision is not None:
            instruction = (task or self.layout.default_task) if item.query else DEFAULT_VL_EMBED_INSTRUCTION
            content = Content(item.text, item.images, item.videos)
            return self.vision.embedding(  # type: ignore[return-value]
                content, instruction=instruction, truncation=truncation, max_length=self.max_length, what=what
            )
        if item.images or item.videos:
            raise InvalidInput(
                f"{what} has images or videos; this Embedder's model ({self.path.name}) reads text only "
                "(serve a Qwen3-VL-Embedding checkpoint for images and video)"
            )
        if not item.text.strip():
            raise InvalidInput(f"{what}.text is empty")
        text = f"Instruct: {task or self.layout.default_task}\nQuery:{item.text}" if item.query else item.text
        ids = self.tokenizer.encode(text, add_special_tokens=False)
        return [*fit(ids, self.max_length - 1, truncation, what), self.end_id]

    def sequences(
        self, inputs: list[EmbedInput], *, instruction: str = "", truncation: Truncation = Truncation.NONE
    ) -> list[list[int]]:
        check_batch(len(inputs), self.limits.max_client_batch, "inputs")
        return [
            self.sequence(item, task=instruction or None, truncation=truncation, what=f"inputs[{i}]")
            for i, item in enumerate(inputs)
        ]

    def check_dimensions(self, dimensions: int | None) -> int:
        if dimensions is None or dimensions == 0:
            return self.dimension
        if not self.mrl_min <= dimensions <= self.dimension:
            raise InvalidInput(
                f"`dimensions` is {dimensions}; this model's MRL range is [{self.mrl_min}, {self.dimension}]"
            )
        return dimensions

    # ------------------------------------------------------------------ the model

    def _run(self, sequences: list[list[int]]) -> list[np.ndarray]:
        if self.remote is not None:
            return timed_call(self.remote.embed, sequences, self.on_batch)
        return list(run_forward(self.forward, sequences, self.on_batch).cpu().numpy())


def finish(vector: np.ndarray, dimensions: int, normalize: bool) -> np.ndarray:
    """MRL: truncate to ``dimensions`` first, then L2-normalise (as the model's own evaluation)."""
    out = np.asarray(vector[:dimensions], dtype=np.float32)
    if normalize:
        norm = float(np.linalg.norm(out))
        out = out / max(norm, 1e-12)
    return out
