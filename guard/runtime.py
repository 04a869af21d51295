"""One call from a model spec (``demo`` or a checkpoint directory) to a ready moderator."""

from __future__ import annotations

import functools
import hashlib
import logging
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from guard.model.checkpoint import LoadedGuard, load_stream_guard
from guard.model.engine import EngineLimits, StepStats, StreamEngine
from guard.session.moderation import StreamModerator
from guard.text.conversation import GuardTokenizer

log = logging.getLogger(__name__)

DTYPES = {
    "float32": torch.float32,
    "fp32": torch.float32,
    "bfloat16": torch.bfloat16,
    "bf16": torch.bfloat16,
    "float16": torch.float16,
    "fp16": torch.float16,
}


def resolve_model(spec: str) -> Path:
    """``demo`` -> the cached demo checkpoint (built on first use); anything else is a directory."""
    if spec == "demo":
        from guard.demo.stream_model import demo_checkpoint_dir

        return demo_checkpoint_dir()
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"model {spec!r} is neither 'demo' nor a checkpoint directory")
    return path


def resolve_retrieval_model(spec: str, kind: str) -> Path:
    """``demo`` -> the cached demo embedder or reranker (``kind``), trained on first use; anything
    else is a checkpoint directory."""
    if spec == "demo":
        from guard.demo import retrieval_models

        return retrieval_models.demo_embedder_dir() if kind == "embedder" else retrieval_models.demo_reranker_dir()
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"{kind} model {spec!r} is neither 'demo' nor a checkpoint directory")
    return path


def parse_dtype(name: str) -> torch.dtype:
    try:
        return DTYPES[name.lower()]
    except KeyError:
        raise ValueError(f"dtype {name!r} is not one of {', '.join(DTYPES)}") from None


@dataclass
class GuardRuntime:
    guard: LoadedGuard
    tokenizer: GuardTokenizer
    engine: StreamEngine
    moderator: StreamModerator

    @property
    def is_demo(self) -> bool:
        return self.guard.config.is_demo

    @property
    def description(self) -> str:
        cfg = self.guard.config
        text = (
            f"{self.guard.path.name}: Qwen3Guard-Stream, {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, "
            f"risk labels {list(cfg.response_risk.labels.names)}"
        )
        if cfg.is_demo:
            text += f" -- {cfg.demo.get('notice', 'DEMO MODEL, not a safety model')}"
        return text

    @functools.cached_property
    def digest(self) -> str:
        """The checkpoint's fingerprint (the audit log names the model that decided): SHA-256 over
        every file that decides a verdict (config, weights, tokenizer, chat template), streamed.
        Computed once, at load, off the event loop (a few seconds per GB)."""
        h = hashlib.sha256()
        root = self.guard.path
        names = ("config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")
        for path in sorted([*(root / n for n in names), *root.glob("*.safetensors")]):
            if not path.is_file():
                continue
            h.update(path.name.encode() + b"\0")
            with path.open("rb") as f:
                while block := f.read(1 << 22):
                    h.update(block)
        return h.hexdigest()[:16]

    def close(self) -> None:
        self.engine.shutdown()


_TORCH_DEFAULT_THREADS = torch.get_num_threads()  # before anyone changes it: 0 means this


def configure_torch_threads(requested: int = 0) -> int:
    """Set torch's intra-op threads (the pool of the large forward passes); the number set.
    0 = torch's default (OMP_NUM_THREADS, else the cores), as it was when this module loaded, so
    calling it again gives the same answer. Small passes run on one thread anyway
    (``EngineLimits.min_parallel_tokens``)."""
    if requested < 0:
        raise ValueError(f"torch threads must be >= 0, got {requested}")
    threads = requested or _TORCH_DEFAULT_THREADS
    torch.set_num_threads(threads)
    return threads


def load_runtime(
    model: str = "demo",
    *,
    device: str = "cpu",
    dtype: str = "float32",
    limits: EngineLimits | None = None,
    on_step: Callable[[StepStats], None] | None = None,
) -> GuardRuntime:
    path = resolve_model(model)
    guard = load_stream_guard(path, device=device, dtype=parse_dtype(dtype))
    tokenizer = GuardTokenizer.from_dir(path)
    engine = StreamEngine(guard, limits, on_step=on_step)
    runtime = GuardRuntime(guard, tokenizer, engine, StreamModerator(engine, tokenizer))
    if guard.config.is_demo:
        log.warning("event=demo_model notice=%r", guard.config.demo.get("notice"))
    log.info("event=model_loaded path=%s device=%s dtype=%s", path, device, dtype)
    return runtime
