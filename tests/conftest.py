"""Shared fixtures: real tokenizer, checkpoints on disk in the official layout, the demo model.

Everything expensive is built once per session and cached under ``.cache/`` in the repo (the
tests own that folder; ``GUARD_CACHE_DIR`` overrides it).
"""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
os.environ.setdefault("GUARD_CACHE_DIR", str(REPO / ".cache"))

from guard.model.checkpoint_writer import write_random_checkpoint  # noqa: E402

# Shapes the fixtures write: tied/untied embeddings, GQA and MHA, sharded weights, long label names.
CHECKPOINT_SHAPES = {
    "tied-gqa": dict(shape="tiny", seed=1),
    "untied-mha-sharded": dict(
        shape=dict(
            hidden_size=48,
            num_hidden_layers=3,
            num_attention_heads=3,
            num_key_value_heads=3,
            head_dim=16,
            intermediate_size=96,
            tie_word_embeddings=False,
            guard_inner_size=24,
        ),
        seed=2,
        shards=3,
    ),
    "long-labels": dict(
        shape=dict(
            hidden_size=32,
            num_hidden_layers=1,
            num_attention_heads=2,
            num_key_value_heads=1,
            head_dim=32,
            intermediate_size=64,
            tie_word_embeddings=True,
            guard_inner_size=16,
            response_categories=(
                "Violent",
                "Sexual Content or Sexual Acts",
                "Suicide & Self-Harm",
                "Politically Sensitive Topics",
                "PII",
                "Copyright Violation",
                "Non-violent Illegal Acts",
                "Unethical Acts",
            ),
            query_categories=(
                "Violent",
                "Sexual Content or Sexual Acts",
                "Suicide & Self-Harm",
                "Politically Sensitive Topics",
                "PII",
                "Copyright Violation",
                "Non-violent Illegal Acts",
                "Unethical Acts",
                "Jailbreak",
            ),
        ),
        seed=3,
    ),
}


def pytest_collection_finish(session: pytest.Session) -> None:
    """When vLLM tests are selected, build their environment while the other tests run."""
    if not session.config.option.collectonly and any(item.get_closest_marker("vllm") for item in session.items):
        from vllm_runtime import prepare_in_background

        prepare_in_background()


def pytest_sessionfinish(session: pytest.Session) -> None:
    from vllm_runtime import join_background

    join_background()


@pytest.fixture(scope="session")
def tokenizer_dir() -> Path:
    from guard.text.offline_tokenizer import cached_qwen3_tokenizer_dir

    return cached_qwen3_tokenizer_dir()


@pytest.fixture(scope="session")
def guard_tokenizer(tokenizer_dir):
    from guard.text.conversation import GuardTokenizer

    return GuardTokenizer.from_dir(tokenizer_dir)


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory, tokenizer_dir) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("checkpoints")
    return {name: write_random_checkpoint(root / name, **spec) for name, spec in CHECKPOINT_SHAPES.items()}


@pytest.fixture(scope="session")
def tiny_checkpoint(checkpoints) -> Path:
    return checkpoints["tied-gqa"]


@pytest.fixture(scope="session")
def demo_dir() -> Path:
    """The demo Stream checkpoint. The demo judge is built here too (once, untimed): every sidecar
    a test starts loads it by default, and its first training must not count against a start-up
    timeout."""
    from guard.demo.judge_model import demo_judge_dir
    from guard.demo.stream_model import demo_checkpoint_dir

    demo_judge_dir()
    return demo_checkpoint_dir()


@pytest.fixture(scope="session")
def demo_runtime(demo_dir):
    from guard.runtime import load_runtime

    runtime = load_runtime(str(demo_dir))
    yield runtime
    runtime.close()


@pytest.fixture(scope="session")
def sidecar(demo_dir):
    """The sidecar with the demo model on a loopback port (real gRPC, real engine)."""
    from servers import running_sidecar

    with running_sidecar(model=str(demo_dir), max_chunk_tokens=64, max_text_chars=256) as running:
        yield running


@pytest.fixture(scope="session")
def tiny_vllm_url():
    """One vLLM OpenAI server of the tiny upstream model, shared by every module that attaches to
    it (GuardedGeneration, the Envoy processor, the OpenAI endpoint); started on first use."""
    from vllm_runtime import running_vllm_http, tiny_upstream_model

    with running_vllm_http(tiny_upstream_model()) as url:
        yield url
