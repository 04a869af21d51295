"""The batched forward of Qwen3-VL-Embedding / Qwen3-VL-Reranker: ``MultimodalSequence``s in,
each one's last hidden state out.

The grouping, left padding and last-token read are ``backbone.LastHiddenState``'s. What the
vision-language model adds per group: the images' and videos' patches (in row order, as their
tokens appear), the token types that mark vision tokens, and the 3-D M-RoPE positions computed
by the model's own ``get_rope_index`` over each row's real tokens, so a padded row computes what
it computes alone.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from guard.retrieval.backbone import LastHiddenState
from guard.retrieval.vision import patchify
from guard.retrieval.vl_prompt import MultimodalSequence, VisionPrompt

IMAGE_TYPE, VIDEO_TYPE = 1, 2  # mm_token_type_ids: text 0, image 1, video 2


class VisionLanguageLastHidden(LastHiddenState):
    """``backbone`` is a transformers ``Qwen3VLModel``."""

    def __init__(self, backbone: torch.nn.Module, prompt: VisionPrompt, *, pad_id: int, max_padded_tokens: int) -> None:
        super().__init__(backbone, pad_id=pad_id, max_padded_tokens=max_padded_tokens)
        self.prompt = prompt
        self.dtype = next(backbone.parameters()).dtype

    def group_inputs(self, rows: Sequence[MultimodalSequence], width: int) -> dict[str, torch.Tensor]:  # type: ignore[override]
        ids, mask = self.padded([r.ids for r in rows], width)
        types = torch.zeros_like(ids)
        types[ids == self.prompt.image_id] = IMAGE_TYPE
        types[ids == self.prompt.video_id] = VIDEO_TYPE
        types[mask == 0] = 0  # a pad id that happens to be a vision id is still padding
        spec = self.prompt.spec
        images = [v for r in rows for v in r.visuals if v.kind == "image"]
        videos = [v for r in rows for v in r.visuals if v.kind == "video"]
        inputs: dict[str, torch.Tensor] = {}
        image_grid = video_grid = None
        for key, visuals in (("image", images), ("video", videos)):
            if not visuals:
                continue
            pixels = patchify(
                visuals, patch=spec.patch, merge=spec.merge, temporal=spec.temporal, mean=spec.mean, std=spec.std
            )
            grid = torch.tensor([v.grid for v in visuals], dtype=torch.long)
            inputs["pixel_values" if key == "image" else "pixel_values_videos"] = pixels.to(self.device, self.dtype)
            inputs[f"{key}_grid_thw"] = grid.to(self.device)
            if key == "image":
                image_grid = grid
            else:
                video_grid = grid
        positions, _ = self.backbone.get_rope_index(
            ids, mm_token_type_ids=types, image_grid_thw=image_grid, video_grid_thw=video_grid, attention_mask=mask
        )
        return {
            "input_ids": ids.to(self.device),
            "attention_mask": mask.to(self.device),
            "position_ids": positions.to(self.device),
            "mm_token_type_ids": types.to(self.device),
            **inputs,
        }
