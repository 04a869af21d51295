"""Where expensive artefacts (the offline tokenizer, demo checkpoints) are cached on disk."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from collections.abc import Callable, Iterator
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


def cached_build(
    name: str, build: Callable[[Path], object], *, marker: str = "config.json", rebuild: bool = False
) -> Path:
    """``cache_dir()/name``, built once by ``build(tmp_dir)`` if ``marker`` is not there yet: one
    builder at a time across processes, and the result appears atomically (never half-written)."""
    target = cache_dir() / name
    if rebuild:
        shutil.rmtree(target, ignore_errors=True)
    if (target / marker).exists():
        return target
    with build_lock(name):
        if (target / marker).exists():  # another process built it while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{name}-", dir=cache_dir()))
        try:
            build(tmp)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target
