"""The demo retrieval models: marked as demos, and through the serving classes every showcase
query finds its own document first."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from guard.demo.retrieval_models import (
    EMBEDDER_VERSION,
    RERANKER_VERSION,
    SHOWCASE,
    demo_embedder_dir,
    demo_reranker_dir,
)
from guard.model.config import DEMO_MARKER
from guard.retrieval.embedder import Embedder, EmbedInput, finish
from guard.retrieval.reranker import Reranker


@pytest.fixture(scope="session")
def embedder_dir() -> Path:
    return demo_embedder_dir()


@pytest.fixture(scope="session")
def reranker_dir() -> Path:
    return demo_reranker_dir()


@pytest.fixture(scope="session")
def embedder(embedder_dir: Path) -> Iterator[Embedder]:
    model = Embedder(embedder_dir)
    yield model
    model.close()


@pytest.fixture(scope="session")
def reranker(reranker_dir: Path) -> Iterator[Reranker]:
    model = Reranker(reranker_dir)
    yield model
    model.close()


def embed(embedder: Embedder, inputs: list[EmbedInput], dimensions: int) -> np.ndarray:
    futures = embedder.submit(embedder.sequences(inputs))
    return np.stack([finish(f.result(timeout=60).value, dimensions, embedder.layout.normalize) for f in futures])


def test_showcase_pairs_are_distinct_topics():
    assert 12 <= len(SHOWCASE) <= 16
    assert len({q for q, _ in SHOWCASE}) == len({d for _, d in SHOWCASE}) == len(SHOWCASE)


@pytest.mark.parametrize(("which", "version"), [("embedder", EMBEDDER_VERSION), ("reranker", RERANKER_VERSION)])
def test_demo_checkpoints_are_marked_as_demos(which: str, version: str, request: pytest.FixtureRequest):
    path = request.getfixturevalue(f"{which}_dir")
    marker = json.loads((path / "config.json").read_text())[DEMO_MARKER]
    assert marker["version"] == version
    assert "not a retrieval model" in marker["notice"]
    assert request.getfixturevalue(which).demo == marker  # what the serving class reports


def test_embedder_ranks_each_showcase_document_first(embedder: Embedder):
    queries = embed(embedder, [EmbedInput(q, query=True) for q, _ in SHOWCASE], embedder.dimension)
    documents = embed(embedder, [EmbedInput(d) for _, d in SHOWCASE], embedder.dimension)
    scores = queries @ documents.T
    misses = [(SHOWCASE[i][0], SHOWCASE[int(row.argmax())][1]) for i, row in enumerate(scores) if row.argmax() != i]
    assert misses == []


@pytest.mark.parametrize("dimensions", [None, 32])
def test_embeddings_are_unit_norm(embedder: Embedder, dimensions: int | None):
    dims = embedder.check_dimensions(dimensions)
    inputs = [EmbedInput(q, query=True) for q, _ in SHOWCASE] + [EmbedInput(d) for _, d in SHOWCASE]
    vectors = embed(embedder, inputs, dims)
    assert embedder.layout.normalize
    assert vectors.shape == (2 * len(SHOWCASE), dims)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)


def test_reranker_ranks_each_showcase_document_first(reranker: Reranker):
    documents = [d for _, d in SHOWCASE]
    futures = [reranker.submit(reranker.sequences(q, documents)) for q, _ in SHOWCASE]
    scores = np.array([[f.result(timeout=60).value for f in row] for row in futures])
    misses = [(SHOWCASE[i][0], documents[int(row.argmax())]) for i, row in enumerate(scores) if row.argmax() != i]
    assert misses == []
    assert reranker.kind == "causal-lm"
