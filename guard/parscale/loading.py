"""A ParScale model and its tokenizer from a checkpoint directory or ``demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from guard.parscale.model import ParScaleLM


def resolve_parscale_model(spec: str) -> Path:
    """``demo`` -> the cached demo checkpoint; anything else a checkpoint directory."""
    if spec == "demo":
        from guard.demo.parscale_model import demo_parscale_dir

        return demo_parscale_dir()
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"ParScale model {spec!r} is neither 'demo' nor a checkpoint directory")
    return path


def load_parscale(
    spec: str, *, device: str = "cpu", dtype: torch.dtype = torch.float32
) -> tuple[ParScaleLM, Any, Path]:
    path = resolve_parscale_model(spec)
    model = ParScaleLM.load(path, device=device, dtype=dtype)
    return model, load_tokenizer(path), path


def load_tokenizer(path: Path) -> Any:
    """The checkpoint's ``tokenizer.json`` and its config (chat template, special tokens). Loaded
    directly: ``AutoTokenizer`` would read ``config.json``, whose ``auto_map`` points at the remote
    code this loader replaces (and asks whether to run it)."""
    from transformers import PreTrainedTokenizerFast

    if not (path / "tokenizer.json").is_file():
        raise FileNotFoundError(f"{path}: no tokenizer.json")
    return PreTrainedTokenizerFast.from_pretrained(str(path))
