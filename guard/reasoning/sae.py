"""A sparse autoencoder (SAE) over one decoder layer's residual stream, and the paper's logit recall.

Fang et al. 2026 (arXiv 2601.03595): ``z = act((x - b_dec) @ W_enc + b_enc)``, ``x_hat = z @ W_dec
+ b_dec``; each decoder row ``W_dec[i]`` is a feature direction in the residual stream. Steering
adds ``alpha * unit(W_dec[i])`` there (``steering``). Stage one of feature identification, logit
recall, keeps the features whose direction promotes (through the LM head) at least ``min_hits``
strategy keywords among its top tokens.

On disk: ``sae.safetensors`` (``W_enc`` [d_model, width], ``b_enc`` [width], ``W_dec``
[width, d_model], ``b_dec`` [d_model]), ``config.json`` (``layer``, ``d_model``, ``width``,
``activation`` "relu" | "topk", ``k`` for topk) and optionally ``features.csv`` (header
``feature_idx,strategy``; several features may share a strategy). Anything malformed is refused
with the file and field named.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

WEIGHTS_FILE = "sae.safetensors"
CONFIG_FILE = "config.json"
FEATURES_FILE = "features.csv"
ACTIVATIONS = ("relu", "topk")
FEATURES_HEADER = ["feature_idx", "strategy"]
# Elements of one [features, vocab] score block in recall: 16M floats = 64 MiB.
RECALL_BLOCK_ELEMENTS = 1 << 24


class SaeError(ValueError):
    """The SAE directory is malformed, or the SAE does not fit the model (the message says which)."""


@dataclass(frozen=True)
class SaeConfig:
    layer: int
    d_model: int
    width: int
    activation: str
    k: int | None = None


@dataclass(frozen=True)
class RecalledFeature:
    """A feature kept by logit recall: the keywords it promotes and its promoted tokens, best first."""

    index: int
    hits: list[str]
    tokens: list[str]


def _int_at_least(value: Any, path: Path, field: str, *, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise SaeError(f"{path}: `{field}` must be an integer >= {minimum}, got {value!r}")
    return value


def read_config(directory: Path) -> SaeConfig:
    path = directory / CONFIG_FILE
    if not path.is_file():
        raise SaeError(f"{path}: missing (an SAE directory holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        data = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise SaeError(f"{path}: not valid JSON: {exc}") from exc
    if not isinstance(data, dict):
        raise SaeError(f"{path}: expected a JSON object with layer, d_model, width, activation")
    for field in ("layer", "d_model", "width", "activation"):
        if field not in data:
            raise SaeError(f"{path}: `{field}` is missing")
    layer = _int_at_least(data["layer"], path, "layer", minimum=0)
    d_model = _int_at_least(data["d_model"], path, "d_model", minimum=1)
    width = _int_at_least(data["width"], path, "width", minimum=1)
    activation = data["activation"]
    if activation not in ACTIVATIONS:
        raise SaeError(f"{path}: `activation` must be one of {list(ACTIVATIONS)}, got {activation!r}")
    k = None
    if activation == "topk":
        if "k" not in data:
            raise SaeError(f"{path}: `k` is missing (required when activation is 'topk')")
        k = _int_at_least(data["k"], path, "k", minimum=1)
        if k > width:
            raise SaeError(f"{path}: `k` must be <= width ({width}), got {k}")
    return SaeConfig(layer=layer, d_model=d_model, width=width, activation=activation, k=k)


def _read_weights(directory: Path, config: SaeConfig) -> dict[str, torch.Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    path = directory / WEIGHTS_FILE
    if not path.is_file():
        raise SaeError(f"{path}: missing (an SAE directory holds {CONFIG_FILE} and {WEIGHTS_FILE})")
    try:
        tensors = load_file(str(path))
    except (SafetensorError, OSError) as exc:
        raise SaeError(f"{path}: cannot read: {exc}") from exc
    d, w = config.d_model, config.width
    expected = {"W_enc": (d, w), "b_enc": (w,), "W_dec": (w, d), "b_dec": (d,)}
    for name, shape in expected.items():
        if name not in tensors:
            raise SaeError(f"{path}: tensor `{name}` is missing (expected shape {list(shape)})")
        if tuple(tensors[name].shape) != shape:
            raise SaeError(
                f"{path}: tensor `{name}` has shape {list(tensors[name].shape)}, expected {list(shape)} "
                f"(d_model {d}, width {w} from {CONFIG_FILE})"
            )
    return {name: tensors[name] for name in expected}


def read_features(directory: Path, width: int) -> list[tuple[int, str]]:
    """``features.csv`` rows as (feature index, strategy); no file means no named features."""
    path = directory / FEATURES_FILE
    if not path.is_file():
        return []
    with path.open(newline="") as handle:
        rows = list(csv.reader(handle))
    if not rows or [cell.strip() for cell in rows[0]] != FEATURES_HEADER:
        got = rows[0] if rows else "nothing"
        raise SaeError(f"{path}: the header must be `{','.join(FEATURES_HEADER)}`, got {got!r}")
    features: list[tuple[int, str]] = []
    for line, row in enumerate(rows[1:], start=2):
        if not row or all(not cell.strip() for cell in row):
            continue
        if len(row) != 2:
            raise SaeError(f"{path}:{line}: expected 2 fields (feature_idx,strategy), got {len(row)}")
        raw, strategy = row[0].strip(), row[1].strip()
        try:
            index = int(raw)
        except ValueError:
            raise SaeError(f"{path}:{line}: `feature_idx` must be an integer, got {raw!r}") from None
        if not 0 <= index < width:
            raise SaeError(f"{path}:{line}: `feature_idx` {index} is outside the SAE's width [0, {width})")
        if not strategy:
            raise SaeError(f"{path}:{line}: `strategy` is empty")
        features.append((index, strategy))
    return features


def _model_field(model_config: Any, name: str) -> int:
    value = model_config.get(name) if isinstance(model_config, Mapping) else getattr(model_config, name, None)
    if value is None:
        raise SaeError(f"the model config has no `{name}`")
    return int(value)


class SparseAutoencoder:
    """One layer's SAE, held in float32 on ``device``."""

    def __init__(
        self,
        config: SaeConfig,
        tensors: Mapping[str, torch.Tensor],
        features: Iterable[tuple[int, str]] = (),
        *,
        device: str | torch.device = "cpu",
        source: str = "",
    ) -> None:
        self.config = config
        self.source = source or "SAE"
        self.W_enc = tensors["W_enc"].to(device=device, dtype=torch.float32)  # [d_model, width]
        self.b_enc = tensors["b_enc"].to(device=device, dtype=torch.float32)  # [width]
        self.W_dec = tensors["W_dec"].to(device=device, dtype=torch.float32)  # [width, d_model]
        self.b_dec = tensors["b_dec"].to(device=device, dtype=torch.float32)  # [d_model]
        self.features = list(features)

    @classmethod
    def load(cls, directory: str | Path, *, device: str | torch.device = "cpu") -> SparseAutoencoder:
        path = Path(directory)
        if not path.is_dir():
            raise SaeError(f"{path}: not a directory (expected {CONFIG_FILE}, {WEIGHTS_FILE}, [{FEATURES_FILE}])")
        config = read_config(path)
        tensors = _read_weights(path, config)
        return cls(config, tensors, read_features(path, config.width), device=device, source=str(path))

    @property
    def layer(self) -> int:
        return self.config.layer

    @property
    def d_model(self) -> int:
        return self.config.d_model

    @property
    def width(self) -> int:
        return self.config.width

    def check_against(self, model_config: Any) -> None:
        """Refuse a model this SAE was not trained on: the residual width and the layer must fit."""
        hidden = _model_field(model_config, "hidden_size")
        layers = _model_field(model_config, "num_hidden_layers")
        if self.d_model != hidden:
            raise SaeError(
                f"{self.source}: the SAE reads residuals of d_model {self.d_model} (W_dec [{self.width}, "
                f"{self.d_model}]) but the model's hidden_size is {hidden} (residual [.., {hidden}]): "
                "use the SAE trained for this model"
            )
        if not 0 <= self.layer < layers:
            raise SaeError(
                f"{self.source}: the SAE is for layer {self.layer}, outside the model's layers [0, {layers})"
            )

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations ``z`` [..., width] of residuals ``x`` [..., d_model]."""
        pre = (x.to(self.W_enc) - self.b_dec) @ self.W_enc + self.b_enc  # [..., width]
        if self.config.activation == "topk":
            top = pre.topk(self.config.k, dim=-1)
            pre = torch.zeros_like(pre).scatter(-1, top.indices, top.values)
        return torch.relu(pre)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """The reconstruction ``x_hat`` [..., d_model] of activations ``z`` [..., width]."""
        return z.to(self.W_dec) @ self.W_dec + self.b_dec

    def _check_index(self, index: int) -> int:
        if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < self.width:
            raise SaeError(f"{self.source}: feature {index!r} is outside the SAE's width [0, {self.width})")
        return index

    def direction(self, index: int) -> torch.Tensor:
        """The unit decoder direction of feature ``index`` [d_model], float32: what steering adds."""
        row = self.W_dec[self._check_index(index)]
        norm = float(row.norm())
        if not math.isfinite(norm) or norm == 0.0:
            raise SaeError(f"{self.source}: feature {index} has a decoder row of norm {norm}: it has no direction")
        return (row / norm).to(torch.float32)

    def strategies(self) -> dict[str, list[int]]:
        """Strategy name -> its feature indices, in ``features.csv`` order."""
        out: dict[str, list[int]] = {}
        for index, strategy in self.features:
            out.setdefault(strategy, []).append(index)
        return out

    def features_for(self, strategy: str) -> list[int]:
        known = self.strategies()
        if strategy not in known:
            raise SaeError(f"{self.source}: no features for strategy {strategy!r}; known: {sorted(known)}")
        return known[strategy]

    def recall(
        self,
        keywords: Iterable[str],
        unembedding: torch.Tensor,
        tokenizer: Any,
        top_k: int = 10,
        min_hits: int = 2,
        threshold: float | None = None,
        *,
        block_elements: int = RECALL_BLOCK_ELEMENTS,
    ) -> list[RecalledFeature]:
        """Logit recall: the features whose top ``top_k`` promoted tokens (``W_U @ unit(W_dec[i])``,
        only those scoring >= ``threshold`` when given) decode (stripped, case-insensitive) to at
        least ``min_hits`` distinct keywords. Best first: most keywords, then the highest keyword
        score. Features are scored in blocks of at most ``block_elements`` scores, so a 64K-wide
        SAE over a 150K vocabulary never holds width x vocab at once."""
        wanted = {w.strip().lower() for w in keywords if w.strip()}
        if not wanted:
            raise SaeError("recall needs at least one non-empty keyword")
        if unembedding.dim() != 2 or unembedding.shape[1] != self.d_model:
            raise SaeError(
                f"{self.source}: the unembedding has shape {list(unembedding.shape)}, expected [vocab, {self.d_model}]"
            )
        if top_k < 1 or min_hits < 1:
            raise SaeError(f"recall needs top_k >= 1 and min_hits >= 1, got top_k {top_k}, min_hits {min_hits}")
        vocab = unembedding.shape[0]
        top_k = min(top_k, vocab)
        block = max(1, block_elements // vocab)
        texts: dict[int, str] = {}  # token id -> decoded text, memoised across blocks

        def text(token: int) -> str:
            if token not in texts:
                texts[token] = tokenizer.decode([token])
            return texts[token]

        directions = self.W_dec / self.W_dec.norm(dim=-1, keepdim=True).clamp_min(1e-12)  # [width, d_model]
        found: list[tuple[int, float, RecalledFeature]] = []
        with torch.no_grad():
            for first in range(0, self.width, block):
                rows = directions[first : first + block].to(device=unembedding.device, dtype=unembedding.dtype)
                scores = (rows @ unembedding.T).float()  # [block, vocab]
                top = scores.topk(top_k, dim=-1)
                values, indices = top.values.cpu().tolist(), top.indices.cpu().tolist()
                for offset, (vals, ids) in enumerate(zip(values, indices, strict=True)):
                    hits: list[str] = []
                    best = -math.inf
                    for value, token in zip(vals, ids, strict=True):
                        if threshold is not None and value < threshold:
                            break
                        word = text(token).strip().lower()
                        if word in wanted:
                            best = max(best, value)
                            if word not in hits:
                                hits.append(word)
                    if len(hits) >= min_hits:
                        feature = RecalledFeature(first + offset, hits, [text(t) for t in ids])
                        found.append((len(hits), best, feature))
        found.sort(key=lambda item: (-item[0], -item[1], item[2].index))
        return [feature for _, _, feature in found]
