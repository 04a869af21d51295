"""Qwen3Guard-Stream: the Qwen3 backbone over KV slots (``guard.model.decoder``) plus the guard's
two head stacks.

One forward pass serves many sessions at once: tokens travel packed, each session's keys and
values live in its own KV cache slot (``guard.model.kv_cache``). Module and parameter names equal
the official checkpoint's, so ``load_state_dict`` maps one to one; a test proves the numbers equal
transformers' ``Qwen3Model`` plus the head stacks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from guard.model.config import StreamGuardConfig
from guard.model.decoder import Backbone, RMSNorm
from guard.model.kv_cache import KVCachePool, StepLayout


@dataclass(frozen=True)
class HeadLogits:
    risk: torch.Tensor  # [N, num_risk]
    category: torch.Tensor  # [N, num_category]


class GuardHead(nn.Module):
    """One head stack: Linear(hidden -> inner) -> RMSNorm -> risk and category Linears."""

    def __init__(self, hidden: int, inner: int, eps: float, num_risk: int, num_category: int) -> None:
        super().__init__()
        self.pre = nn.Linear(hidden, inner, bias=False)
        self.norm = RMSNorm(inner, eps)
        self.risk = nn.Linear(inner, num_risk, bias=False)
        self.category = nn.Linear(inner, num_category, bias=False)

    def forward(self, hidden: torch.Tensor) -> HeadLogits:
        x = self.norm(self.pre(hidden))
        return HeadLogits(self.risk(x), self.category(x))


# Checkpoint name prefix -> our module path. The backbone is ``model.*`` on both sides.
HEAD_PARAMETER_NAMES = {
    "risk_level_category_pre": "response_head.pre",
    "risk_level_category_layernorm": "response_head.norm",
    "risk_level_head": "response_head.risk",
    "category_head": "response_head.category",
    "query_risk_level_category_pre": "query_head.pre",
    "query_risk_level_category_layernorm": "query_head.norm",
    "query_risk_level_head": "query_head.risk",
    "query_category_head": "query_head.category",
}


class Qwen3StreamGuard(nn.Module):
    """Backbone + response head stack (every response token) + query head stack (prompt end)."""

    def __init__(self, cfg: StreamGuardConfig) -> None:
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg.decoder)
        eps, inner = cfg.rms_norm_eps, cfg.guard_inner_size
        self.response_head = GuardHead(
            cfg.hidden_size, inner, eps, len(cfg.response_risk.labels), len(cfg.response_categories)
        )
        self.query_head = GuardHead(cfg.hidden_size, inner, eps, len(cfg.query_risk.labels), len(cfg.query_categories))

    def new_cache(
        self, *, max_slots: int, max_tokens: int, max_bytes: int | None = None, keep_idle: bool = True
    ) -> KVCachePool:
        cfg = self.config
        param = self.model.embed_tokens.weight
        return KVCachePool(
            cfg.num_hidden_layers,
            cfg.num_key_value_heads,
            cfg.head_dim,
            max_slots=max_slots,
            max_tokens=max_tokens,
            max_bytes=max_bytes,
            dtype=param.dtype,
            device=param.device,
            keep_idle=keep_idle,
        )

    def pack(self) -> None:
        """Pack each layer's projections into one matrix per matmul (after loading, on the target
        device). Weights stay readable and loadable under the checkpoint's names."""
        self.model.pack()

    @torch.inference_mode()
    def step(self, token_ids: torch.Tensor, layout: StepLayout, cache: KVCachePool) -> torch.Tensor:
        """Run one batched step; returns the final-normed hidden states ``[N, hidden]``."""
        return self.model(token_ids, layout, cache)
