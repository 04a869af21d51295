"""A ParScale checkpoint's configuration, read from its ``config.json`` (no remote code).

The released checkpoints (``model_type: qwen2_parscale``, ``Qwen2ParScaleForCausalLM``) are Qwen2
models plus three fields: ``parscale_n`` (P parallel streams), ``parscale_n_tokens`` (the trained
prefix each stream's attention sees, 48 in the releases) and ``parscale_attn_smooth`` (epsilon of
the aggregation weights' smoothing; 0.01 in the code, 0.1 in the released configs). A plain
``qwen2`` checkpoint is P = 1.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guard.model.config import DEMO_MARKER
from guard.model.decoder import DecoderShape

MODEL_TYPES = ("qwen2_parscale", "qwen2")
CODE_DEFAULT_SMOOTHING = 0.01  # the official configuration class's default
CODE_DEFAULT_PREFIX_TOKENS = 48


class ParScaleCheckpointError(ValueError):
    """A checkpoint this loader cannot serve (the message says what and where)."""


@dataclass(frozen=True)
class ParScaleConfig:
    shape: DecoderShape
    parscale_n: int  # P
    prefix_tokens: int  # per stream and layer (0 when P == 1)
    smoothing: float  # epsilon: weights become w * (1 - eps) + eps / P
    max_position_embeddings: int
    tie_word_embeddings: bool
    eos_token_ids: tuple[int, ...]
    demo: dict | None = None

    def kv_bytes_per_token(self, itemsize: int) -> int:
        """KV cache bytes one request adds per token at ``itemsize`` bytes a value: P streams' keys
        and values in every layer (a request also holds ``prefix_tokens`` such positions per stream)."""
        s = self.shape
        return self.parscale_n * 2 * s.num_hidden_layers * s.num_key_value_heads * s.head_dim * itemsize

    @classmethod
    def from_dict(cls, cfg: dict[str, Any], source: str = "config.json") -> ParScaleConfig:
        def need(name: str) -> Any:
            if name not in cfg:
                raise ParScaleCheckpointError(f"{source}: `{name}` is missing")
            return cfg[name]

        model_type = cfg.get("model_type")
        if model_type not in MODEL_TYPES:
            raise ParScaleCheckpointError(f"{source}: model_type {model_type!r}; expected one of {MODEL_TYPES}")
        if cfg.get("use_sliding_window"):
            raise ParScaleCheckpointError(f"{source}: sliding-window attention is not supported")
        rope = cfg.get("rope_scaling") or cfg.get("rope_parameters") or {}
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise ParScaleCheckpointError(f"{source}: rope scaling {rope} is not supported")
        if cfg.get("hidden_act", "silu") != "silu":
            raise ParScaleCheckpointError(f"{source}: hidden_act {cfg.get('hidden_act')!r}; Qwen2 uses silu")
        hidden, heads = int(need("hidden_size")), int(need("num_attention_heads"))
        shape = DecoderShape(
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0))),
            attention_bias=True,
            qk_norm=False,
        )
        p = int(cfg.get("parscale_n", 1))
        prefix = int(cfg.get("parscale_n_tokens", CODE_DEFAULT_PREFIX_TOKENS)) if p > 1 else 0
        eps = float(cfg.get("parscale_attn_smooth", CODE_DEFAULT_SMOOTHING))
        if p < 1 or (p > 1 and prefix < 1):
            raise ParScaleCheckpointError(f"{source}: parscale_n {p} / parscale_n_tokens {prefix} must be >= 1")
        if not 0.0 <= eps < 1.0:
            raise ParScaleCheckpointError(f"{source}: parscale_attn_smooth {eps} must be in [0, 1)")
        if heads % shape.num_key_value_heads:
            raise ParScaleCheckpointError(
                f"{source}: {heads} attention heads over {shape.num_key_value_heads} KV heads"
            )
        eos = cfg.get("eos_token_id")
        return cls(
            shape=shape,
            parscale_n=p,
            prefix_tokens=prefix,
            smoothing=eps,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 32768)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            eos_token_ids=tuple(eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []),
            demo=cfg.get(DEMO_MARKER),
        )

    @classmethod
    def from_dir(cls, path: Path) -> ParScaleConfig:
        source = path / "config.json"
        if not source.is_file():
            raise ParScaleCheckpointError(f"{path}: no config.json (not a checkpoint directory)")
        config = cls.from_dict(json.loads(source.read_text()), str(source))
        generation = path / "generation_config.json"
        if generation.is_file():  # the chat models end turns with <|im_end|>: generation_config says so
            eos = json.loads(generation.read_text()).get("eos_token_id")
            extra = eos if isinstance(eos, list) else [eos] if isinstance(eos, int) else []
            config = _with_eos(config, tuple(sorted({*config.eos_token_ids, *extra})))
        return config


def _with_eos(config: ParScaleConfig, eos: tuple[int, ...]) -> ParScaleConfig:
    from dataclasses import replace

    return replace(config, eos_token_ids=eos)
