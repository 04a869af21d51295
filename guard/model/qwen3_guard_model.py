"""Qwen3Guard-Stream as one readable file: config -> norm -> rotary -> attention -> MLP -> block
-> backbone -> guard heads.

Our own implementation of the Qwen3 backbone (RMSNorm, per-head q/k RMSNorm, RoPE, GQA attention,
SwiGLU) so that one forward pass can serve many sessions at once: tokens travel packed, each
session's keys and values live in its own KV cache slot (``guard.model.kv_cache``). Module and
parameter names equal the official checkpoint's, so ``load_state_dict`` maps one to one; a test
proves the numbers equal transformers' ``Qwen3Model`` plus the head stacks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from guard.model.config import StreamGuardConfig
from guard.model.kv_cache import KVCachePool, StepLayout


class RMSNorm(nn.Module):
    def __init__(self, size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(size))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, self.weight.shape, self.weight, self.eps)


class Rotary(nn.Module):
    """Rotary position embedding for arbitrary absolute positions, in the form ``apply_rotary`` takes."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.int64).float() / head_dim))
        self.register_buffer("inv_freq", inv_freq, persistent=False)
        half = head_dim // 2
        self.register_buffer("sign", torch.cat((-torch.ones(half), torch.ones(half))), persistent=False)

    def forward(self, positions: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """``cos`` and ``sin`` ``[N, 1, D]``; ``sin`` carries rotate-half's sign (see ``apply_rotary``)."""
        freqs = positions.float()[:, None] * self.inv_freq[None, :]  # [N, D/2]
        emb = torch.cat((freqs, freqs), dim=-1)  # [N, D]
        return emb.cos().to(dtype)[:, None, :], (emb.sin() * self.sign).to(dtype)[:, None, :]


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, signed_sin: torch.Tensor) -> torch.Tensor:
    """Qwen's rotate-half RoPE, ``x*cos + [-x2, x1]*sin``, as ``x*cos + roll(x)*signed_sin``: three
    ops instead of six (one forward pass of a small batch is mostly per-op overhead)."""
    return torch.addcmul(x * cos, x.roll(x.shape[-1] // 2, dims=-1), signed_sin)


class Attention(nn.Module):
    """Qwen3 attention. ``q_proj``/``k_proj``/``v_proj`` keep the checkpoint's names; ``pack()``
    makes them views of one ``[q; k; v]`` matrix so a step runs one projection, not three."""

    def __init__(self, cfg: StreamGuardConfig, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = cfg.head_dim
        self.eps = cfg.rms_norm_eps
        hidden = cfg.hidden_size
        self.q_proj = nn.Linear(hidden, self.heads * self.head_dim, bias=False)
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(self.heads * self.head_dim, hidden, bias=False)
        self.q_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.k_norm = RMSNorm(self.head_dim, cfg.rms_norm_eps)
        self.qkv_weight: torch.Tensor | None = None  # set by pack()
        self.qk_norm_weight: torch.Tensor | None = None  # [heads + kv_heads, D]: q_norm's rows, then k_norm's

    @torch.no_grad()
    def pack(self) -> None:
        qkv = torch.cat((self.q_proj.weight, self.k_proj.weight, self.v_proj.weight))
        rows = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim
        for proj, view in zip((self.q_proj, self.k_proj, self.v_proj), qkv.split(rows), strict=True):
            proj.weight.data = view  # the checkpoint's names still read (and load into) the packed matrix
        self.qkv_weight = qkv
        self.qk_norm_weight = torch.cat(
            (self.q_norm.weight.expand(self.heads, -1), self.k_norm.weight.expand(self.kv_heads, -1))
        )

    def forward(
        self,
        x: torch.Tensor,  # [N, hidden] packed tokens of the step
        rope: tuple[torch.Tensor, torch.Tensor],
        layout: StepLayout,
        cache: KVCachePool,
    ) -> torch.Tensor:
        if self.qkv_weight is None:
            raise RuntimeError("call Qwen3StreamGuard.pack() after loading weights")
        n, h, kv, d = x.shape[0], self.heads, self.kv_heads, self.head_dim
        qkv = F.linear(x, self.qkv_weight)  # [N, (H + 2 KV) * D]
        # q and k heads side by side: one RMSNorm (each head row has its own weight) and one RoPE.
        qk = qkv[:, : (h + kv) * d].view(n, h + kv, d)
        qk = apply_rotary(F.rms_norm(qk, (d,), None, self.eps) * self.qk_norm_weight, *rope)
        q, k = qk[:, :h], qk[:, h:]  # [N, H, D], [N, KV, D]
        v = qkv[:, (h + kv) * d :].view(n, kv, d)  # [N, KV, D]
        cache.write(self.layer, layout, k, v)
        keys, values = cache.read(self.layer, layout)  # [B, KV, L, D]
        q = layout.pad(q)  # [B, H, T, D]
        b, _, t, _ = q.shape
        group = h // kv
        # GQA without repeating K/V: the `group` query heads of one KV head attend as extra query
        # rows ([B, KV, group*T, D]); query head h uses KV head h // group, as in Qwen3.
        out = F.scaled_dot_product_attention(
            q.reshape(b, kv, group * t, d), keys, values, attn_mask=layout.grouped_mask(group)
        )  # [B, KV, group*T, D]
        out = out.view(b, h, t, d)
        return F.linear(layout.unpad(out).reshape(n, h * d), self.o_proj.weight)


class MLP(nn.Module):
    """SwiGLU; ``pack()`` makes ``gate_proj``/``up_proj`` views of one ``[gate; up]`` matrix."""

    def __init__(self, cfg: StreamGuardConfig) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)
        self.gate_up_weight: torch.Tensor | None = None  # set by pack()

    @torch.no_grad()
    def pack(self) -> None:
        gate_up = torch.cat((self.gate_proj.weight, self.up_proj.weight))
        gate, up = gate_up.chunk(2)
        self.gate_proj.weight.data, self.up_proj.weight.data = gate, up
        self.gate_up_weight = gate_up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_weight is None:
            raise RuntimeError("call Qwen3StreamGuard.pack() after loading weights")
        gate, up = F.linear(x, self.gate_up_weight).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj.weight)


class DecoderLayer(nn.Module):
    def __init__(self, cfg: StreamGuardConfig, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(cfg, layer)
        self.mlp = MLP(cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, rope, layout: StepLayout, cache: KVCachePool) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, layout, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """``model.*`` of the checkpoint: a Qwen3Model whose attention reads pooled KV slots."""

    def __init__(self, cfg: StreamGuardConfig) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg, i) for i in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.rotary = Rotary(cfg.head_dim, cfg.rope_theta)

    def forward(self, token_ids: torch.Tensor, layout: StepLayout, cache: KVCachePool) -> torch.Tensor:
        x = self.embed_tokens(token_ids)  # [N, hidden]
        rope = self.rotary(layout.positions, x.dtype)
        for layer in self.layers:
            x = layer(x, rope, layout, cache)
        return self.norm(x)  # [N, hidden], final-normed: what both head stacks read


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
        self.model = Backbone(cfg)
        eps, inner = cfg.rms_norm_eps, cfg.guard_inner_size
        self.response_head = GuardHead(
            cfg.hidden_size, inner, eps, len(cfg.response_risk.labels), len(cfg.response_categories)
        )
        self.query_head = GuardHead(cfg.hidden_size, inner, eps, len(cfg.query_risk.labels), len(cfg.query_categories))

    def new_cache(self, *, max_slots: int, max_tokens: int, max_bytes: int | None = None) -> KVCachePool:
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
        )

    def pack(self) -> None:
        """Pack each layer's projections into one matrix per matmul (after loading, on the target
        device). Weights stay readable and loadable under the checkpoint's names."""
        for layer in self.model.layers:
            layer.self_attn.pack()
            layer.mlp.pack()

    @torch.inference_mode()
    def step(self, token_ids: torch.Tensor, layout: StepLayout, cache: KVCachePool) -> torch.Tensor:
        """Run one batched step; returns the final-normed hidden states ``[N, hidden]``."""
        return self.model(token_ids, layout, cache)
