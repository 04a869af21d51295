"""Where expensive artefacts (the offline tokenizer, demo checkpoints) are cached on disk."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "GUARD_CACHE_DIR"


def cache_dir() -> Path:
    """The cache root: ``$GUARD_CACHE_DIR`` or ``~/.cache/qwen3guard-sidecar``."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "qwen3guard-sidecar"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path
