"""The Qwen3Guard-Stream checkpoint configuration, read from config.json without remote code."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from guard.model.labels import LabelError, LabelSet, RiskLabels

if TYPE_CHECKING:
    from guard.model.decoder import DecoderShape

GUARD_ARCHITECTURE = "Qwen3ForGuardModel"
# Marks checkpoints built by ``guard.demo.stream_model``: they behave like a guard but are not a safety model.
DEMO_MARKER = "qwen3guard_sidecar_demo"


class CheckpointError(ValueError):
    """The checkpoint directory is not a loadable Qwen3Guard-Stream checkpoint."""


@dataclass(frozen=True)
class StreamGuardConfig:
    """Backbone shape, head sizes and label maps of a Qwen3Guard-Stream checkpoint."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    guard_inner_size: int
    response_risk: RiskLabels
    response_categories: LabelSet
    query_risk: RiskLabels
    query_categories: LabelSet
    demo: dict[str, Any] | None = None
    raw: dict[str, Any] = field(default_factory=dict, repr=False, compare=False)

    @property
    def decoder(self) -> DecoderShape:
        """The backbone's shape (Qwen3: per-head q/k norm, no projection biases)."""
        from guard.model.decoder import DecoderShape  # torch: only where a model is built

        return DecoderShape(
            vocab_size=self.vocab_size,
            hidden_size=self.hidden_size,
            intermediate_size=self.intermediate_size,
            num_hidden_layers=self.num_hidden_layers,
            num_attention_heads=self.num_attention_heads,
            num_key_value_heads=self.num_key_value_heads,
            head_dim=self.head_dim,
            rms_norm_eps=self.rms_norm_eps,
            rope_theta=self.rope_theta,
            attention_bias=False,
            qk_norm=True,
        )

    @property
    def is_demo(self) -> bool:
        return self.demo is not None

    @classmethod
    def from_dict(cls, cfg: dict[str, Any]) -> StreamGuardConfig:
        archs = cfg.get("architectures") or []
        if GUARD_ARCHITECTURE not in archs:
            raise CheckpointError(
                f"config.json `architectures` is {archs}; a Qwen3Guard-Stream checkpoint has "
                f"{GUARD_ARCHITECTURE!r} (a Qwen3Guard-Gen checkpoint is served by the judge, not the stream engine)"
            )

        def need(name: str) -> Any:
            if name not in cfg:
                raise CheckpointError(f"config.json is missing `{name}`")
            return cfg[name]

        heads = int(need("num_attention_heads"))
        hidden = int(need("hidden_size"))
        rope = cfg.get("rope_parameters") or cfg.get("rope_scaling") or {}
        rope_theta = float(cfg.get("rope_theta", rope.get("rope_theta", 1_000_000.0)))
        if rope.get("rope_type", rope.get("type", "default")) not in ("default", None):
            raise CheckpointError(f"rope scaling {rope} is not supported by the stream engine")
        try:
            response_risk = RiskLabels.from_labels(
                "response_risk_level_map",
                LabelSet.from_config_map(
                    "response_risk_level_map", cfg.get("response_risk_level_map"), int(need("num_risk_level"))
                ),
            )
            query_risk = RiskLabels.from_labels(
                "query_risk_level_map",
                LabelSet.from_config_map(
                    "query_risk_level_map", cfg.get("query_risk_level_map"), int(need("num_query_risk_level"))
                ),
            )
            response_categories = LabelSet.from_config_map(
                "response_category_map", cfg.get("response_category_map"), int(need("num_category"))
            )
            query_categories = LabelSet.from_config_map(
                "query_category_map", cfg.get("query_category_map"), int(need("num_query_category"))
            )
        except LabelError as exc:
            raise CheckpointError(str(exc)) from None
        return cls(
            vocab_size=int(need("vocab_size")),
            hidden_size=hidden,
            intermediate_size=int(need("intermediate_size")),
            num_hidden_layers=int(need("num_hidden_layers")),
            num_attention_heads=heads,
            num_key_value_heads=int(cfg.get("num_key_value_heads", heads)),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            rms_norm_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            rope_theta=rope_theta,
            max_position_embeddings=int(cfg.get("max_position_embeddings", 40960)),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
            guard_inner_size=int(need("guard_inner_size")),
            response_risk=response_risk,
            response_categories=response_categories,
            query_risk=query_risk,
            query_categories=query_categories,
            demo=cfg.get(DEMO_MARKER),
            raw=cfg,
        )

    @classmethod
    def from_dir(cls, path: Path) -> StreamGuardConfig:
        config_file = Path(path) / "config.json"
        if not config_file.is_file():
            raise CheckpointError(f"{path} has no config.json; pass a Qwen3Guard-Stream checkpoint directory")
        try:
            cfg = json.loads(config_file.read_text())
        except json.JSONDecodeError as exc:
            raise CheckpointError(f"{config_file} is not valid JSON: {exc}") from None
        return cls.from_dict(cfg)
