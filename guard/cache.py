"""Where expensive artefacts (the offline tokenizer, demo checkpoints) are cached on disk."""

from __future__ import annotations

import contextlib
import fcntl
import os
from collections.abc import Iterator
from pathlib import Path

CACHE_ENV = "GUARD_CACHE_DIR"


def cache_dir() -> Path:
    """The cache root: ``$GUARD_CACHE_DIR`` or ``~/.cache/qwen3guard-sidecar``."""
    root = os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "qwen3guard-sidecar"
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def build_lock(name: str) -> Iterator[None]:
    """One builder at a time for the artefact ``name`` across processes (parallel test runs, a
    server and a CLI starting together): the others wait, then find it built."""
    with open(cache_dir() / f".{name}.lock", "w") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
