"""ParScale (parallel scaling, arXiv 2505.10475) on the shared decoder over KV slots.

One request runs as P streams through one Qwen2 model: the input embeddings are copied P times,
stream n's attention in every layer also sees its own trained prefix (``prefix_k`` / ``prefix_v``
``[P, kv_heads, prefix_tokens, head_dim]``, no RoPE; real tokens start at position 0), and after
the final norm the P hidden states of each token are mixed by learned weights: the P outputs are
interleaved per hidden unit (``(h P)``), ``Linear(P*h -> h)``, SiLU, ``Linear(h -> P)``, softmax in
float32, smoothed to ``w * (1 - eps) + eps / P``, and the weighted sum goes to the LM head.

Serving layout: each stream of a request owns one slot of the pooled KV cache
(``guard.model.kv_cache``); positions ``[0, prefix_tokens)`` of the slot hold the stream's prefix,
real token i sits at ``prefix_tokens + i`` with RoPE position i. A step packs the new tokens of
many requests request-major (a request's P streams side by side, so slots allocated together are
read as one view), and gathers each token's P hidden states for the aggregation. Parameter names
equal the official checkpoint's.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from guard.model.decoder import Backbone, Rotary
from guard.model.kv_cache import KVCachePool, StepLayout, StepRow
from guard.parscale.config import ParScaleCheckpointError, ParScaleConfig


@dataclass(frozen=True)
class ParScaleStep:
    """One step's layout over the KV slots, and where each stream's copy of each token sits."""

    layout: StepLayout
    source: torch.Tensor  # [P*N]: the token (of the step's N) each packed row carries
    streams: torch.Tensor  # [P, N]: the packed row of stream n's copy of token i


class ParScaleLM(nn.Module):
    def __init__(self, config: ParScaleConfig) -> None:
        super().__init__()
        self.config = config
        shape, p = config.shape, config.parscale_n
        self.model = Backbone(shape)
        if p > 1:
            prefix = (p, shape.num_key_value_heads, config.prefix_tokens, shape.head_dim)
            for layer in self.model.layers:  # under the checkpoint's names: model.layers.N.self_attn.prefix_k
                layer.self_attn.prefix_k = nn.Parameter(torch.zeros(prefix))
                layer.self_attn.prefix_v = nn.Parameter(torch.zeros(prefix))
            self.model.aggregate_layer = nn.Sequential(
                nn.Linear(p * shape.hidden_size, shape.hidden_size), nn.SiLU(), nn.Linear(shape.hidden_size, p)
            )
        self.lm_head = nn.Linear(shape.hidden_size, shape.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    # ------------------------------------------------------------------ loading

    @classmethod
    def load(cls, path: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> ParScaleLM:
        """The checkpoint at ``path`` (``model.safetensors`` or a sharded index), every tensor
        checked against the configuration: nothing missing, nothing unexpected, shapes equal."""
        path = Path(path)
        config = ParScaleConfig.from_dir(path)
        state = _read_safetensors(path)
        model = cls.empty(config, device=device, dtype=dtype)
        expected = model.state_dict()
        if config.tie_word_embeddings:
            expected.pop("lm_head.weight", None)
            state.pop("lm_head.weight", None)
        missing = sorted(set(expected) - set(state))
        unexpected = sorted(set(state) - set(expected))
        if missing or unexpected:
            raise ParScaleCheckpointError(
                f"{path}: weights do not match the config (P={config.parscale_n}): "
                f"missing {missing[:5]}{'...' if len(missing) > 5 else ''}, "
                f"unexpected {unexpected[:5]}{'...' if len(unexpected) > 5 else ''}"
            )
        for name, tensor in state.items():
            if tuple(tensor.shape) != tuple(expected[name].shape):
                raise ParScaleCheckpointError(
                    f"{path}: {name} has shape {tuple(tensor.shape)}, the config implies {tuple(expected[name].shape)}"
                )
        model.load_state_dict(state, strict=False)  # lm_head is the embedding when tied
        model.eval()
        model.model.pack()
        return model

    @classmethod
    def empty(cls, config: ParScaleConfig, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> ParScaleLM:
        """Allocated, not initialised (fill it: ``load`` or ``random``); rotary tables computed."""
        with torch.device("meta"):
            model = cls(config)
        model = model.to(dtype).to_empty(device=device).requires_grad_(False)  # served, never trained
        model.model.rotary = Rotary(config.shape.head_dim, config.shape.rope_theta).to(device)
        if config.tie_word_embeddings:
            model.lm_head.weight = model.model.embed_tokens.weight
        return model

    @classmethod
    def random(
        cls, config: ParScaleConfig, *, seed: int = 0, device: str = "cpu", dtype: torch.dtype = torch.float32
    ) -> ParScaleLM:
        """Random weights of the right shapes (benchmarks of a shape without its checkpoint)."""
        model = cls.empty(config, device=device, dtype=dtype)
        generator = torch.Generator(device=device).manual_seed(seed)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if name.endswith("norm.weight") or name.endswith("layernorm.weight"):
                    param.fill_(1.0)
                else:
                    param.normal_(0.0, 0.02, generator=generator)
        model.eval()
        model.model.pack()
        return model

    # ------------------------------------------------------------------ serving

    @property
    def streams(self) -> int:
        return self.config.parscale_n

    def new_cache(self, *, max_slots: int, max_tokens: int, max_bytes: int | None = None) -> KVCachePool:
        """A pool of KV slots, one per stream of a live request; ``max_tokens`` counts real tokens
        (each slot also holds the prefix)."""
        shape, param = self.config.shape, self.model.embed_tokens.weight
        return KVCachePool(
            shape.num_hidden_layers,
            shape.num_key_value_heads,
            shape.head_dim,
            max_slots=max_slots,
            max_tokens=self.config.prefix_tokens + max_tokens,
            max_bytes=max_bytes,
            dtype=param.dtype,
            device=param.device,
        )

    @torch.inference_mode()
    def write_prefix(self, cache: KVCachePool, slots: list[int]) -> None:
        """Stream n's trained prefix into ``slots[n]``, positions ``[0, prefix_tokens)`` of every layer."""
        if self.streams == 1:
            return
        cache.reserve_tokens(self.config.prefix_tokens)
        for index, layer in enumerate(self.model.layers):
            attn = layer.self_attn
            cache.write_block(index, slots, 0, attn.prefix_k, attn.prefix_v)

    def layout(self, rows: list[tuple[list[int], int, int]]) -> ParScaleStep:
        """The step's layout from ``(slots, cached, length)`` per request (``cached`` real tokens
        already in its slots). Rows are request-major (a request's P streams side by side), so
        requests whose slots were allocated together read their cache as one view."""
        t, p = self.config.prefix_tokens, self.streams
        device = self.model.embed_tokens.weight.device
        step_rows, source, streams = [], [], [[] for _ in range(p)]
        first = 0  # the request's first new token among the step's tokens
        for slots, cached, length in rows:
            for n in range(p):
                streams[n].extend(range(len(source), len(source) + length))
                source.extend(range(first, first + length))
                step_rows.append(StepRow(slots[n], t + cached, length))
            first += length
        return ParScaleStep(
            StepLayout(step_rows, device),
            torch.tensor(source, device=device),
            torch.tensor(streams, device=device),
        )

    @torch.inference_mode()
    def step(self, token_ids: torch.Tensor, step: ParScaleStep, cache: KVCachePool) -> torch.Tensor:
        """The new tokens of a step, ``[N]`` (requests in the step's order), through all P streams;
        the aggregated final hidden states ``[N, hidden]``."""
        x = self.model.embed_tokens(token_ids)  # [N, h]
        if self.streams > 1:
            x = x[step.source]  # [P*N, h]: each row's copy of its token
        layout = step.layout
        hidden = self.model.decode(x, layout.positions - self.config.prefix_tokens, layout, cache)
        if self.streams == 1:
            return hidden
        return self.aggregate(hidden[step.streams])  # [P, N, h] -> [N, h]

    @torch.inference_mode()
    def aggregation_weights(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[P, N, h]`` -> float32 ``[N, P]``: each row sums to 1 and each weight is >= eps / P."""
        p, n, h = hidden.shape
        mixed = hidden.permute(1, 2, 0).reshape(n, h * p)  # the P outputs interleaved per hidden unit
        weights = torch.softmax(self.model.aggregate_layer(mixed).float(), dim=-1)
        eps = self.config.smoothing
        return weights * (1 - eps) + eps / p if eps else weights

    def aggregate(self, hidden: torch.Tensor) -> torch.Tensor:
        """``[P, N, h]`` -> ``[N, h]``: the weighted sum of the streams (P = 1: the one stream)."""
        if hidden.shape[0] == 1:
            return hidden[0]
        weights = self.aggregation_weights(hidden)  # [N, P]
        return (hidden.permute(1, 0, 2) * weights[..., None]).sum(1).to(hidden.dtype)

    @torch.inference_mode()
    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Aggregated hidden states ``[M, h]`` -> float32 logits ``[M, vocab]``."""
        return F.linear(hidden, self.lm_head.weight).float()


def _read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    index = path / "model.safetensors.index.json"
    if index.is_file():
        files = sorted(set(json.loads(index.read_text())["weight_map"].values()))
    elif (path / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        raise ParScaleCheckpointError(f"{path}: no model.safetensors (nor an index of shards)")
    state: dict[str, torch.Tensor] = {}
    for name in files:
        state.update(load_file(str(path / name)))
    return state
