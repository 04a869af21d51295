"""Qwen3-VL-Embedding / Qwen3-VL-Reranker prompts: contents in, the token sequence the model reads
out (its images and videos attached).

The conversation is the models' own (QwenLM/Qwen3-VL-Embedding):
- embedding: system = the instruction (default "Represent the user's input.", a period added
  if it ends without punctuation), user = videos, images, then the text;
- reranking: system = "Judge whether the Document meets ...", user = ``<Instruct>: {instruction}``,
  ``<Query>:`` + the query's parts, ``\\n<Document>:`` + the document's parts;
both rendered by the checkpoint's chat template with the generation prompt. As the Qwen3-VL
processor does, each image placeholder becomes ``grid_h * grid_w / merge**2`` image tokens and
each video placeholder one ``<{t:.1f} seconds><|vision_start|>...<|vision_end|>`` block per
temporal patch. The whole text is tokenized at once (so it tokenizes as the processor's does);
the pad tokens are multiplied afterwards.
"""

from __future__ import annotations

import json
import unicodedata
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

from guard.errors import InvalidInput
from guard.retrieval.checkpoint import RetrievalCheckpointError
from guard.retrieval.inputs import Truncation
from guard.retrieval.vision import Content, VisionLimits, Visual, load_content

DEFAULT_MAX_LENGTH_VL = 8192  # Qwen3-VL-Embedding's MAX_LENGTH (the reranker's is 10240)
DEFAULT_VL_EMBED_INSTRUCTION = "Represent the user's input."
DEFAULT_VL_RERANK_INSTRUCTION = "Given a search query, retrieve relevant candidates that answer the query."
RERANK_SYSTEM = (
    "Judge whether the Document meets the requirements based on the Query and the Instruct provided. Note that the "
    'answer can only be "yes" or "no".'
)
IMAGE_PLACEHOLDER = "<|vision_start|><|image_pad|><|vision_end|>"
VIDEO_PLACEHOLDER = "<|vision_start|><|video_pad|><|vision_end|>"
TRUNCATION_ROUNDS = 4  # re-render attempts when cutting text (token counts move by a token or two)


def builtin_chat_template() -> str:
    """Qwen3-VL's chat template (system, user and assistant turns; image and video items)."""
    return resources.files("guard").joinpath("templates/qwen3_vl_chat_template.jinja").read_text()


def read_chat_template(path: Path) -> str | None:
    """The checkpoint's chat template: ``chat_template.jinja`` or ``chat_template.json`` (as the
    Qwen3-VL releases ship it), else the tokenizer's."""
    if (path / "chat_template.jinja").is_file():
        return (path / "chat_template.jinja").read_text()
    if (path / "chat_template.json").is_file():
        try:
            return json.loads((path / "chat_template.json").read_text())["chat_template"]
        except (json.JSONDecodeError, KeyError, TypeError) as exc:
            raise RetrievalCheckpointError(f"{path}/chat_template.json has no `chat_template`: {exc}") from exc
    return None


@dataclass(frozen=True)
class VisionSpec:
    """How the checkpoint cuts pixels into vision tokens (``preprocessor_config.json`` and the
    vision config)."""

    patch: int
    merge: int
    temporal: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]

    @classmethod
    def read(cls, path: Path, vision_config: dict[str, Any]) -> VisionSpec:
        pre: dict[str, Any] = {}
        if (path / "preprocessor_config.json").is_file():
            pre = json.loads((path / "preprocessor_config.json").read_text())
        spec = cls(
            patch=int(pre.get("patch_size", vision_config.get("patch_size", 16))),
            merge=int(pre.get("merge_size", vision_config.get("spatial_merge_size", 2))),
            temporal=int(pre.get("temporal_patch_size", vision_config.get("temporal_patch_size", 2))),
            mean=tuple(pre.get("image_mean", (0.5, 0.5, 0.5))),
            std=tuple(pre.get("image_std", (0.5, 0.5, 0.5))),
        )
        if (spec.patch, spec.merge, spec.temporal) != (
            int(vision_config.get("patch_size", spec.patch)),
            int(vision_config.get("spatial_merge_size", spec.merge)),
            int(vision_config.get("temporal_patch_size", spec.temporal)),
        ):
            raise RetrievalCheckpointError(f"{path}: preprocessor_config.json disagrees with the vision config")
        return spec


@dataclass(eq=False)
class MultimodalSequence:
    """What the Qwen3-VL model reads for one input: token ids with the vision tokens expanded, and
    the images / videos whose features replace them, in order. Its length is its token count (the
    batcher's cost)."""

    ids: list[int]
    visuals: list[Visual] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.ids)

    def __iter__(self):
        return iter(self.ids)


def with_period(instruction: str) -> str:
    """The official rule: an instruction gets a period unless it ends with punctuation."""
    instruction = instruction.strip()
    if instruction and not unicodedata.category(instruction[-1]).startswith("P"):
        instruction += "."
    return instruction


@dataclass(frozen=True)
class PreparedContent:
    """A content with its media decoded (``VisionPrompt.prepare``)."""

    content: Content
    parts: list[dict[str, Any]]
    visuals: list[Visual]


class VisionPrompt:
    """Renders contents through the checkpoint's chat template into ``MultimodalSequence``s."""

    def __init__(self, path: Path, tokenizer: Any, config: dict[str, Any], limits: VisionLimits) -> None:
        self.tokenizer = tokenizer
        self.limits = limits
        self.spec = VisionSpec.read(path, config.get("vision_config") or {})
        template = read_chat_template(path) or getattr(tokenizer, "chat_template", None)
        if not template:
            raise RetrievalCheckpointError(f"{path}: no chat template (chat_template.json or .jinja)")
        self.template = template
        ids: dict[str, int] = {}
        for name, token in (
            ("image_token_id", "<|image_pad|>"),
            ("video_token_id", "<|video_pad|>"),
            ("vision_start_token_id", "<|vision_start|>"),
            ("vision_end_token_id", "<|vision_end|>"),
        ):
            found = tokenizer.convert_tokens_to_ids(token)
            expected = config.get(name, found)
            if found is None or found == tokenizer.unk_token_id or found != expected:
                raise RetrievalCheckpointError(
                    f"{path}: the tokenizer's {token} is {found}, the config's {name} is {expected}"
                )
            ids[name] = found
        self.image_id, self.video_id = ids["image_token_id"], ids["video_token_id"]
        self.start_id, self.end_id = ids["vision_start_token_id"], ids["vision_end_token_id"]

    # ------------------------------------------------------------------ conversations

    def prepare(self, content: Content, what: str) -> PreparedContent:
        """One content decoded: its user-turn items (videos, images, text; "NULL" when empty, as
        the official code) and its visuals in the same order. A reranker query is prepared once
        and paired with every document."""
        spec = self.spec
        videos, images = load_content(
            content, self.limits, what, patch=spec.patch, merge=spec.merge, temporal=spec.temporal
        )
        parts: list[dict[str, Any]] = [{"type": "video", "video": ""} for _ in videos]
        parts += [{"type": "image", "image": ""} for _ in images]
        if content.text:
            parts.append({"type": "text", "text": content.text})
        if not parts:
            parts.append({"type": "text", "text": "NULL"})
        return PreparedContent(content, parts, [*videos, *images])

    def embedding(
        self, content: Content, *, instruction: str, truncation: Truncation, max_length: int, what: str
    ) -> MultimodalSequence:
        if not content.text.strip() and not content.has_media:
            raise InvalidInput(f"{what} is empty: give text, images or videos")
        prepared = self.prepare(content, what)
        parts, visuals = prepared.parts, list(prepared.visuals)
        system = with_period(instruction) or DEFAULT_VL_EMBED_INSTRUCTION

        def messages(text: str) -> list[dict[str, Any]]:
            user = [p if p.get("type") != "text" or not content.text else {"type": "text", "text": text} for p in parts]
            return [
                {"role": "system", "content": [{"type": "text", "text": system}]},
                {"role": "user", "content": user},
            ]

        return self._fit(messages, content.text, visuals, truncation, max_length, what)

    def rerank(
        self,
        query: Content | PreparedContent,
        document: Content,
        *,
        instruction: str,
        truncation: Truncation,
        max_length: int,
        what: str,
    ) -> MultimodalSequence:
        if isinstance(query, Content):
            if not query.text.strip() and not query.has_media:
                raise InvalidInput("the query is empty: give text, images or videos")
            query = self.prepare(query, "query")
        if not document.text.strip() and not document.has_media:
            raise InvalidInput(f"{what} is empty: give text, images or videos")
        prepared = self.prepare(document, what)
        query_parts, doc_parts = query.parts, prepared.parts
        visuals = [*query.visuals, *prepared.visuals]
        head = [{"type": "text", "text": "<Instruct>: " + (instruction or DEFAULT_VL_RERANK_INSTRUCTION)}]

        def messages(doc_text: str) -> list[dict[str, Any]]:
            doc = [
                p if p.get("type") != "text" or not document.text else {"type": "text", "text": doc_text}
                for p in doc_parts
            ]
            user = [
                *head,
                {"type": "text", "text": "<Query>:"},
                *query_parts,
                {"type": "text", "text": "\n<Document>:"},
            ]
            return [
                {"role": "system", "content": [{"type": "text", "text": RERANK_SYSTEM}]},
                {"role": "user", "content": user + doc},
            ]

        return self._fit(messages, document.text, visuals, truncation, max_length, what)

    # ------------------------------------------------------------------ rendering

    def _fit(self, messages, text: str, visuals: list[Visual], truncation: Truncation, max_length: int, what: str):
        """The sequence within ``max_length``: the (last) text is cut as ``truncation`` says;
        images and videos are never cut."""
        sequence = self._render(messages(text), visuals, what)
        rounds = 0
        while len(sequence) > max_length:
            if truncation is Truncation.NONE or not text or rounds == TRUNCATION_ROUNDS:
                vision = sum(v.tokens(self.spec.merge) for v in visuals)
                raise InvalidInput(
                    f"{what} has {len(sequence)} tokens ({vision} of them for its images and videos); the limit is "
                    f"{max_length}"
                    + ("" if truncation is not Truncation.NONE else " (ask for truncation to cut its text)")
                )
            text_ids = self.tokenizer.encode(text, add_special_tokens=False)
            keep = len(text_ids) - (len(sequence) - max_length) - rounds
            if keep <= 0:
                raise InvalidInput(
                    f"{what}: its images, videos and the prompt alone take more than {max_length} tokens (the limit)"
                )
            kept = text_ids[:keep] if truncation is Truncation.RIGHT else text_ids[len(text_ids) - keep :]
            text = self.tokenizer.decode(kept)
            sequence = self._render(messages(text), visuals, what)
            rounds += 1
        return sequence

    def _render(self, messages: list[dict[str, Any]], visuals: list[Visual], what: str) -> MultimodalSequence:
        rendered = self.tokenizer.apply_chat_template(
            messages, chat_template=self.template, tokenize=False, add_generation_prompt=True
        )
        pieces = []  # the text with one pad per image / per video step, as the processor expands it
        rest = rendered
        for visual in visuals:
            marker = IMAGE_PLACEHOLDER if visual.kind == "image" else VIDEO_PLACEHOLDER
            before, found, rest = rest.partition(marker)
            if not found:
                raise RetrievalCheckpointError("the chat template dropped an image or video placeholder")
            pieces.append(before)
            if visual.kind == "image":
                pieces.append(IMAGE_PLACEHOLDER)
            else:
                pieces.extend(f"<{t:.1f} seconds>{VIDEO_PLACEHOLDER}" for t in visual.timestamps)
        pieces.append(rest)
        ids = self.tokenizer.encode("".join(pieces), add_special_tokens=False)
        expected_images = sum(1 for v in visuals if v.kind == "image")
        expected_steps = sum(v.grid[0] for v in visuals if v.kind == "video")
        if (
            ids.count(self.image_id) != expected_images
            or ids.count(self.video_id) != expected_steps
            or ids.count(self.start_id) != expected_images + expected_steps
            or ids.count(self.end_id) != expected_images + expected_steps
        ):
            raise InvalidInput(
                f"{what}: its text contains Qwen3-VL vision tokens (<|image_pad|>, <|vision_start|>, ...)"
            )
        out: list[int] = []
        queue = iter(visuals)
        current: Visual | None = None
        steps_left = 0
        for tid in ids:
            if tid == self.image_id or tid == self.video_id:
                if steps_left == 0:
                    current = next(queue)
                    steps_left = current.grid[0]
                assert current is not None
                out.extend([tid] * current.tokens_per_step(self.spec.merge))
                steps_left -= 1
            else:
                out.append(tid)
        return MultimodalSequence(out, visuals)
