"""One batched forward for retrieval models: many token sequences in, each one's last hidden
state out.

Sequences of a batch are sorted by length and cut into groups whose padded size stays within a
token budget, so a long input does not make every short one pay its length. Rows are left padded
(the last column is every row's last real token, as Qwen3-Embedding and Qwen3-Reranker expect)
and get position ids that start at 0 at their first real token: a padded row computes exactly
what it computes alone.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ForwardStats:
    """What one ``last_hidden`` call did: padding waste is ``padded_tokens - real_tokens``."""

    groups: int
    sequences: int
    real_tokens: int
    padded_tokens: int


def plan_groups(lengths: Sequence[int], max_padded_tokens: int, *, sort: bool = True) -> list[list[int]]:
    """Indices of ``lengths`` cut into groups whose ``rows x longest`` stays within the budget
    (a single sequence longer than the budget forms its own group). Sorted by length unless
    ``sort`` is False (kept for the benchmark's padding comparison)."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i]) if sort else list(range(len(lengths)))
    groups: list[list[int]] = []
    current: list[int] = []
    longest = 0
    for i in order:
        grown = max(longest, lengths[i])
        if current and grown * (len(current) + 1) > max_padded_tokens:
            groups.append(current)
            current, grown = [], lengths[i]
        current.append(i)
        longest = grown
    if current:
        groups.append(current)
    return groups


class LastHiddenState:
    """Runs a transformers decoder backbone (``Qwen3Model``) over token sequences, returning the
    final-normed hidden state of each sequence's last token."""

    def __init__(self, backbone: torch.nn.Module, *, pad_id: int, max_padded_tokens: int) -> None:
        self.backbone = backbone
        self.pad_id = pad_id
        self.max_padded_tokens = max_padded_tokens
        self.device = next(backbone.parameters()).device

    @torch.inference_mode()
    def __call__(self, sequences: Sequence[Sequence[int]], *, sort: bool = True) -> tuple[torch.Tensor, ForwardStats]:
        """``[len(sequences), hidden]`` in input order (fp32), and what the call cost."""
        lengths = [len(s) for s in sequences]
        groups = plan_groups(lengths, self.max_padded_tokens, sort=sort)
        out: torch.Tensor | None = None
        padded = 0
        for group in groups:
            width = max(lengths[i] for i in group)
            padded += width * len(group)
            hidden = self.backbone(**self.group_inputs([sequences[i] for i in group], width)).last_hidden_state[:, -1]
            if out is None:
                out = torch.empty((len(sequences), hidden.shape[-1]), dtype=torch.float32, device=self.device)
            out[torch.tensor(group, device=self.device)] = hidden.float()
        assert out is not None, "no sequences"
        return out, ForwardStats(len(groups), len(sequences), sum(lengths), padded)

    def group_inputs(self, rows: Sequence[Sequence[int]], width: int) -> dict[str, torch.Tensor]:
        """The backbone's keyword arguments for one group: left-padded ids, the mask, and
        positions counted from each row's first real token."""
        ids, mask = self.padded(rows, width)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        return {
            "input_ids": ids.to(self.device),
            "attention_mask": mask.to(self.device),
            "position_ids": positions.to(self.device),
        }

    def padded(self, rows: Sequence[Sequence[int]], width: int) -> tuple[torch.Tensor, torch.Tensor]:
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for row, seq in enumerate(rows):
            ids[row, width - len(seq) :] = torch.tensor(list(seq), dtype=torch.long)
            mask[row, width - len(seq) :] = 1
        return ids, mask


def run_forward(
    forward: LastHiddenState,
    sequences: Sequence[Sequence[int]],
    on_batch: Callable[[ForwardStats, float], None] | None,
) -> torch.Tensor:
    """``forward(sequences)``, reporting its stats and seconds to ``on_batch`` (a metrics hook,
    which must never fail the batch)."""
    started = time.perf_counter()
    hidden, stats = forward(sequences)
    if on_batch is not None:
        try:
            on_batch(stats, time.perf_counter() - started)
        except Exception:
            log.exception("event=on_batch_failed")
    return hidden
