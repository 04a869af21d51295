"""Write SAE directories in the layout ``sae.SparseAutoencoder.load`` reads, for tests and the demo
(no released SAE can be downloaded here).

Weights are random (``seed``); ``plant`` sets chosen decoder rows, e.g. a row built by
``promoting_direction`` so that logit recall has a known feature to find.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file

from guard.reasoning.sae import CONFIG_FILE, FEATURES_FILE, FEATURES_HEADER, WEIGHTS_FILE


def promoting_direction(unembedding: torch.Tensor, token_ids: Sequence[int]) -> torch.Tensor:
    """A unit direction [d_model] that raises the logits of ``token_ids``: the normalised sum of
    their rows of ``W_U`` [vocab, d_model]."""
    if not token_ids:
        raise ValueError("promoting_direction needs at least one token id")
    total = unembedding.detach().float()[list(token_ids)].sum(0)
    return total / total.norm()


def write_sae(
    out_dir: str | Path,
    *,
    d_model: int,
    width: int,
    layer: int,
    activation: str = "relu",
    k: int | None = None,
    seed: int = 0,
    features: Iterable[tuple[int, str]] | None = None,
    plant: Mapping[int, torch.Tensor] | None = None,
) -> Path:
    """An SAE directory with random weights; ``plant`` {feature index: vector [d_model]} sets those
    decoder rows, ``features`` [(index, strategy)] writes ``features.csv``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    W_dec = torch.randn(width, d_model, generator=generator)
    W_dec = W_dec / W_dec.norm(dim=-1, keepdim=True)  # [width, d_model], unit rows as trained SAEs keep them
    for index, vector in (plant or {}).items():
        W_dec[index] = vector.detach().float().reshape(d_model)
    tensors = {
        "W_enc": W_dec.T.contiguous() + 0.01 * torch.randn(d_model, width, generator=generator),  # [d_model, width]
        "b_enc": -0.1 * torch.rand(width, generator=generator),  # [width]
        "W_dec": W_dec.contiguous(),
        "b_dec": 0.01 * torch.randn(d_model, generator=generator),  # [d_model]
    }
    save_file(tensors, str(out / WEIGHTS_FILE), metadata={"format": "pt"})
    config: dict[str, object] = {"layer": layer, "d_model": d_model, "width": width, "activation": activation}
    if k is not None:
        config["k"] = k
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")
    if features is not None:
        with (out / FEATURES_FILE).open("w", newline="") as handle:
            writer = csv.writer(handle, lineterminator="\n")
            writer.writerow(FEATURES_HEADER)
            writer.writerows(features)
    return out
