"""A Qwen decoder stack whose attention reads pooled KV cache slots: one forward pass serves many
sequences at once (tokens travel packed, each sequence's keys and values live in its own slot of
``guard.model.kv_cache``). Qwen3 (per-head q/k RMSNorm, no projection biases) for the stream
guard, Qwen2 (q/k/v biases, no q/k norm) for ParScale; module and parameter names equal the
checkpoints' (``model.embed_tokens``, ``model.layers.N.self_attn.q_proj`` ...), so weights load
one to one.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from guard.model.kv_cache import KVCachePool, StepLayout


@dataclass(frozen=True)
class DecoderShape:
    """What the decoder stack needs to know about a checkpoint."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    attention_bias: bool = False  # Qwen2: q/k/v projections have biases
    qk_norm: bool = True  # Qwen3: per-head RMSNorm on queries and keys


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
    """Qwen attention over KV slots. ``q_proj``/``k_proj``/``v_proj`` keep the checkpoint's names;
    ``pack()`` makes them views of one ``[q; k; v]`` matrix so a step runs one projection, not three."""

    def __init__(self, shape: DecoderShape, layer: int) -> None:
        super().__init__()
        self.layer = layer
        self.heads = shape.num_attention_heads
        self.kv_heads = shape.num_key_value_heads
        self.head_dim = shape.head_dim
        self.eps = shape.rms_norm_eps
        hidden, bias = shape.hidden_size, shape.attention_bias
        self.q_proj = nn.Linear(hidden, self.heads * self.head_dim, bias=bias)
        self.k_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=bias)
        self.v_proj = nn.Linear(hidden, self.kv_heads * self.head_dim, bias=bias)
        self.o_proj = nn.Linear(self.heads * self.head_dim, hidden, bias=False)
        self.qk_norm = shape.qk_norm
        if shape.qk_norm:
            self.q_norm = RMSNorm(self.head_dim, shape.rms_norm_eps)
            self.k_norm = RMSNorm(self.head_dim, shape.rms_norm_eps)
        self.qkv_weight: torch.Tensor | None = None  # set by pack()
        self.qkv_bias: torch.Tensor | None = None
        self.qk_norm_weight: torch.Tensor | None = None  # [heads + kv_heads, D]: q_norm's rows, then k_norm's

    @torch.no_grad()
    def pack(self) -> None:
        projections = (self.q_proj, self.k_proj, self.v_proj)
        rows = self.heads * self.head_dim, self.kv_heads * self.head_dim, self.kv_heads * self.head_dim
        qkv = torch.cat([p.weight for p in projections])
        for proj, view in zip(projections, qkv.split(rows), strict=True):
            proj.weight.data = view  # the checkpoint's names still read (and load into) the packed matrix
        self.qkv_weight = qkv
        if self.q_proj.bias is not None:
            bias = torch.cat([p.bias for p in projections])
            for proj, view in zip(projections, bias.split(rows), strict=True):
                proj.bias.data = view
            self.qkv_bias = bias
        if self.qk_norm:
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
            raise RuntimeError("call pack() after loading weights")
        n, h, kv, d = x.shape[0], self.heads, self.kv_heads, self.head_dim
        qkv = F.linear(x, self.qkv_weight, self.qkv_bias)  # [N, (H + 2 KV) * D]
        # q and k heads side by side: one RMSNorm (each head row has its own weight) and one RoPE.
        qk = qkv[:, : (h + kv) * d].view(n, h + kv, d)
        if self.qk_norm:
            qk = F.rms_norm(qk, (d,), None, self.eps) * self.qk_norm_weight
        qk = apply_rotary(qk, *rope)
        q, k = qk[:, :h], qk[:, h:]  # [N, H, D], [N, KV, D]
        v = qkv[:, (h + kv) * d :].view(n, kv, d)  # [N, KV, D]
        cache.write(self.layer, layout, k, v)
        keys, values = cache.read(self.layer, layout)  # [B, KV, L, D]
        q = layout.pad(q)  # [B, H, T, D]
        b, _, t, _ = q.shape
        group = h // kv
        # GQA without repeating K/V: the `group` query heads of one KV head attend as extra query
        # rows ([B, KV, group*T, D]); query head h uses KV head h // group, as in Qwen.
        out = F.scaled_dot_product_attention(
            q.reshape(b, kv, group * t, d), keys, values, attn_mask=layout.grouped_mask(group)
        )  # [B, KV, group*T, D]
        out = out.view(b, h, t, d)
        return F.linear(layout.unpad(out).reshape(n, h * d), self.o_proj.weight)


class MLP(nn.Module):
    """SwiGLU; ``pack()`` makes ``gate_proj``/``up_proj`` views of one ``[gate; up]`` matrix."""

    def __init__(self, shape: DecoderShape) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(shape.hidden_size, shape.intermediate_size, bias=False)
        self.up_proj = nn.Linear(shape.hidden_size, shape.intermediate_size, bias=False)
        self.down_proj = nn.Linear(shape.intermediate_size, shape.hidden_size, bias=False)
        self.gate_up_weight: torch.Tensor | None = None  # set by pack()

    @torch.no_grad()
    def pack(self) -> None:
        gate_up = torch.cat((self.gate_proj.weight, self.up_proj.weight))
        gate, up = gate_up.chunk(2)
        self.gate_proj.weight.data, self.up_proj.weight.data = gate, up
        self.gate_up_weight = gate_up

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.gate_up_weight is None:
            raise RuntimeError("call pack() after loading weights")
        gate, up = F.linear(x, self.gate_up_weight).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, self.down_proj.weight)


class DecoderLayer(nn.Module):
    def __init__(self, shape: DecoderShape, layer: int) -> None:
        super().__init__()
        self.self_attn = Attention(shape, layer)
        self.mlp = MLP(shape)
        self.input_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)

    def forward(self, x, rope, layout: StepLayout, cache: KVCachePool) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), rope, layout, cache)
        return x + self.mlp(self.post_attention_layernorm(x))


class Backbone(nn.Module):
    """``model.*`` of the checkpoint: embeddings, decoder layers reading pooled KV slots, final norm."""

    def __init__(self, shape: DecoderShape) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(shape.vocab_size, shape.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(shape, i) for i in range(shape.num_hidden_layers))
        self.norm = RMSNorm(shape.hidden_size, shape.rms_norm_eps)
        self.rotary = Rotary(shape.head_dim, shape.rope_theta)

    def forward(self, token_ids: torch.Tensor, layout: StepLayout, cache: KVCachePool) -> torch.Tensor:
        """Token ids ``[N]`` at the layout's positions -> final-normed hidden states ``[N, hidden]``."""
        return self.decode(self.embed_tokens(token_ids), layout.positions, layout, cache)

    def decode(self, x: torch.Tensor, positions: torch.Tensor, layout: StepLayout, cache: KVCachePool) -> torch.Tensor:
        """Input embeddings ``[N, hidden]`` with their RoPE ``positions`` ``[N]`` (the cache
        positions, unless the cache holds something before the sequence) -> final-normed hidden."""
        rope = self.rotary(positions, x.dtype)
        for layer in self.layers:
            x = layer(x, rope, layout, cache)
        return self.norm(x)

    def pack(self) -> None:
        """Pack each layer's projections into one matrix per matmul (after loading, on the target
        device). Weights stay readable and loadable under the checkpoint's names."""
        for layer in self.layers:
            layer.self_attn.pack()
            layer.mlp.pack()
