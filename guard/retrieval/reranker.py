"""Qwen3-Reranker served: a query and documents in, one relevance score per document out.

Each (query, document) pair is written in the model's official prompt (system "Judge whether
...", then ``<Instruct>: {instruction}\\n<Query>: {query}\\n<Document>: {doc}``, then the empty
think block) and the score is P(yes) at the last position: ``sigmoid(l_yes - l_no)`` with the
two token ids looked up in the tokenizer. Only those two rows of the LM head are used (the full
vocabulary is never projected). A converted ``Qwen3ForSequenceClassification`` checkpoint gives
that logit difference as its single output. ``raw`` scores are the logit difference itself.
Pairs from all callers share the shared ``Batcher`` under a token budget.

A Qwen3-VL-Reranker checkpoint (``Qwen3VLForConditionalGeneration``) is served by the same class:
queries and documents may carry images and videos, written in that model's prompt
(``vl_prompt``); the score is the same P(yes) from the same two LM-head rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from guard.errors import InvalidInput
from guard.model.config import DEMO_MARKER
from guard.retrieval.backbone import ForwardStats, LastHiddenState, run_forward
from guard.retrieval.batching import BatchedSequences, BatchLimits
from guard.retrieval.checkpoint import (
    DEFAULT_MAX_LENGTH,
    DEFAULT_RERANK_INSTRUCTION,
    VISION_LANGUAGE,
    RetrievalCheckpointError,
    load_pretrained,
    read_config,
    text_config,
)
from guard.retrieval.inputs import Truncation, check_batch, checked_ids, fit
from guard.retrieval.vision import Content, VisionLimits
from guard.retrieval.vl_backbone import VisionLanguageLastHidden
from guard.retrieval.vl_prompt import DEFAULT_VL_RERANK_INSTRUCTION, VisionPrompt
from guard.retrieval.vllm_backend import VllmPooling, timed_call

PREFIX = (
    "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
    'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
)
SUFFIX = "<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def body(instruction: str, query: str, document: str) -> str:
    return f"<Instruct>: {instruction}\n<Query>: {query}\n<Document>: {document}"


@dataclass(frozen=True)
class RerankPair:
    """One (query, document) pair, as text or as a fully rendered token sequence."""

    query: str = ""
    document: str = ""
    instruction: str = ""
    token_ids: tuple[int, ...] | None = None


class Reranker(BatchedSequences[float]):
    """``submit(sequences)`` gives each sequence's raw score ``l_yes - l_no`` (``probability``
    turns it into P(yes))."""

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
        """``endpoint``: a vLLM server scoring the sequences (the `vllm` backend, ``/classify``);
        ``path`` then supplies the tokenizer and config, and no weights are loaded."""
        from transformers import (
            AutoModelForCausalLM,
            AutoModelForSequenceClassification,
            AutoTokenizer,
            Qwen3VLForConditionalGeneration,
        )

        self.path = Path(path)
        config = read_config(self.path)
        text = text_config(config)
        vision_language = config["model_type"] == VISION_LANGUAGE
        architectures = config.get("architectures") or ["Qwen3ForCausalLM"]
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        self.limits = limits or BatchLimits()
        self.max_length = min(max_length or DEFAULT_MAX_LENGTH, int(text.get("max_position_embeddings", 32768)))
        self.demo = config.get(DEMO_MARKER)
        self.vocab_size = int(text["vocab_size"])
        if vision_language and endpoint:
            raise RetrievalCheckpointError(
                f"{self.path}: the vllm backend serves text checkpoints; serve Qwen3-VL-Reranker locally"
            )
        self.remote = VllmPooling(endpoint, model=endpoint_model) if endpoint else None
        self.backend = "vllm" if endpoint else "local"
        self.model = self.forward = self.direction = None
        kinds = {
            "Qwen3ForCausalLM": "causal-lm",
            "Qwen3ForSequenceClassification": "sequence-classification",
            "Qwen3VLForConditionalGeneration": "causal-lm",
        }
        if architectures[0] not in kinds or vision_language != architectures[0].startswith("Qwen3VL"):
            raise RetrievalCheckpointError(
                f"{self.path}: architecture {architectures[0]!r}; a Qwen3 reranker is Qwen3ForCausalLM "
                "or Qwen3ForSequenceClassification, a Qwen3-VL reranker Qwen3VLForConditionalGeneration"
            )
        self.kind = kinds[architectures[0]]
        self.vision = (
            VisionPrompt(self.path, self.tokenizer, config, vision_limits or VisionLimits())
            if vision_language
            else None
        )
        self.default_instruction = DEFAULT_VL_RERANK_INSTRUCTION if vision_language else DEFAULT_RERANK_INSTRUCTION
        if self.vision is not None:
            model = load_pretrained(Qwen3VLForConditionalGeneration, self.path, dtype=dtype, device=device)
            yes, no = (self._single_token(word) for word in ("yes", "no"))
            head = model.lm_head.weight
            self.direction = (head[yes] - head[no]).detach().float()
            self.model = model
        elif self.remote is None and self.kind == "sequence-classification":
            self.model = load_pretrained(AutoModelForSequenceClassification, self.path, dtype=dtype, device=device)
            if self.model.score.weight.shape[0] != 1:
                raise RetrievalCheckpointError(
                    f"{self.path}: a reranker classifier has one output; this one has "
                    f"{self.model.score.weight.shape[0]}"
                )
            self.direction = self.model.score.weight[0].detach().float()
        elif self.remote is None:
            self.model = load_pretrained(AutoModelForCausalLM, self.path, dtype=dtype, device=device)
            yes, no = (self._single_token(word) for word in ("yes", "no"))
            head = self.model.get_output_embeddings().weight
            self.direction = (head[yes] - head[no]).detach().float()  # l_yes - l_no = (W_yes - W_no) . h
        self.prefix_ids = self.tokenizer.encode(PREFIX, add_special_tokens=False)
        self.suffix_ids = self.tokenizer.encode(SUFFIX, add_special_tokens=False)
        pad = self.tokenizer.pad_token_id
        pad_id = 0 if pad is None else pad
        if self.model is not None and self.vision is not None:
            self.forward = VisionLanguageLastHidden(
                self.model.model, self.vision, pad_id=pad_id, max_padded_tokens=self.limits.max_batch_tokens
            )
        elif self.model is not None:
            self.forward = LastHiddenState(
                self.model.model, pad_id=pad_id, max_padded_tokens=self.limits.max_batch_tokens
            )
        self.on_batch = on_batch
        self._start_batching("reranker", self.limits)

    def _single_token(self, word: str) -> int:
        ids = self.tokenizer.encode(word, add_special_tokens=False)
        if len(ids) != 1:
            raise RetrievalCheckpointError(f"{self.path}: {word!r} is not one token in this tokenizer ({ids})")
        return ids[0]

    # ------------------------------------------------------------------ requests -> sequences

    def sequence(self, pair: RerankPair, *, truncation: Truncation, what: str) -> list[int]:
        if pair.token_ids is not None:
            ids = checked_ids(pair.token_ids, self.vocab_size, f"{what}.token_ids")
            return fit(ids, self.max_length, Truncation.NONE, f"{what}.token_ids")
        if not pair.query.strip():
            raise InvalidInput("`query` is empty")
        if not pair.document.strip():
            raise InvalidInput(f"{what} is empty")
        room = self.max_length - len(self.prefix_ids) - len(self.suffix_ids)
        text = body(pair.instruction or DEFAULT_RERANK_INSTRUCTION, pair.query, pair.document)
        ids = fit(self.tokenizer.encode(text, add_special_tokens=False), room, truncation, what)
        return [*self.prefix_ids, *ids, *self.suffix_ids]

    @property
    def modalities(self) -> tuple[str, ...]:
        return ("text", "image", "video") if self.vision is not None else ("text",)

    def sequences(
        self,
        query: str | Content,
        documents: list[str] | list[Content],
        *,
        instruction: str = "",
        truncation: Truncation = Truncation.NONE,
    ) -> list[list[int]]:
        """One sequence per document; a ``Content`` may carry images and videos (Qwen3-VL only)."""
        check_batch(len(documents), self.limits.max_client_batch, "documents")
        query = query if isinstance(query, Content) else Content(query)
        contents = [d if isinstance(d, Content) else Content(d) for d in documents]
        if self.vision is not None:
            if not query.text.strip() and not query.has_media:
                raise InvalidInput("the query is empty: give text, images or videos")
            prepared = self.vision.prepare(query, "query")  # its media decoded once for every document
            return [
                self.vision.rerank(  # type: ignore[misc]
                    prepared,
                    doc,
                    instruction=instruction or self.default_instruction,
                    truncation=truncation,
                    max_length=self.max_length,
                    what=f"documents[{i}]",
                )
                for i, doc in enumerate(contents)
            ]
        for what, content in [("query", query), *((f"documents[{i}]", d) for i, d in enumerate(contents))]:
            if content.has_media:
                raise InvalidInput(
                    f"{what} has images or videos; this Reranker's model ({self.path.name}) reads text only "
                    "(serve a Qwen3-VL-Reranker checkpoint for images and video)"
                )
        return [
            self.sequence(RerankPair(query.text, doc.text, instruction), truncation=truncation, what=f"documents[{i}]")
            for i, doc in enumerate(contents)
        ]

    # ------------------------------------------------------------------ the model

    def _run(self, sequences: list[list[int]]) -> list[float]:
        if self.remote is not None:
            return timed_call(self.remote.classify, sequences, self.on_batch)
        hidden = run_forward(self.forward, sequences, self.on_batch)
        return (hidden @ self.direction.to(hidden.device)).tolist()


def probability(raw: float) -> float:
    """P(yes) = sigmoid(l_yes - l_no)."""
    return float(torch.sigmoid(torch.tensor(raw, dtype=torch.float64)))
