"""`guard embed` and `guard rerank` as users script them: the console script (the first call; the
rest through the same ``main`` in this process), stable JSON, the same numbers as the models,
token-id files used exactly as given, clear errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
from cli_runner import guard_main, guard_script

from guard.retrieval.checkpoint_writer import write_embedding_checkpoint, write_reranker_checkpoint
from guard.retrieval.embedder import Embedder, EmbedInput, finish
from guard.retrieval.reranker import Reranker, probability


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    return write_embedding_checkpoint(root / "emb", seed=11), write_reranker_checkpoint(root / "rr", seed=12)


def test_embed_json_equals_the_model(dirs):
    done = guard_script(
        "embed",
        "--model",
        str(dirs[0]),
        "--text",
        "Explain gravity",
        "Why is the sky blue?",
        "--query",
        "--instruction",
        "Answer science questions",
        "--dimensions",
        "32",
        "--json",
    )
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert set(out) >= {"embeddings", "dimensions", "normalized", "tokens", "model"}
    embedder = Embedder(dirs[0])
    try:
        seqs = embedder.sequences(
            [EmbedInput("Explain gravity", True), EmbedInput("Why is the sky blue?", True)],
            instruction="Answer science questions",
        )
        want = [finish(f.result(60).value, 32, True) for f in embedder.submit(seqs)]
    finally:
        embedder.close()
    assert out["dimensions"] == 32 and out["tokens"] == [len(s) for s in seqs] and not out["model"]["demo"]
    for got, w in zip(out["embeddings"], want, strict=True):
        np.testing.assert_allclose(got, w, atol=1e-5)


def test_embed_ids_are_used_exactly_as_given(tmp_path, dirs):
    ids = tmp_path / "ids.json"
    ids.write_text(json.dumps([[100, 200, 300], [5]]))
    done = guard_main("embed", "--model", str(dirs[0]), "--ids", str(ids), "--normalize", "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    assert out["tokens"] == [3, 1]
    embedder = Embedder(dirs[0])
    try:
        want = finish(embedder.submit([[100, 200, 300]])[0].result(60).value, 64, True)
    finally:
        embedder.close()
    np.testing.assert_allclose(out["embeddings"][0], want, atol=1e-5)


def test_rerank_json_scores_in_input_order(dirs, tmp_path):
    docs = ["Beijing is the capital.", "Bananas are yellow."]
    done = guard_main("rerank", "--model", str(dirs[1]), "--query", "capital of China", "--doc", *docs, "--json")
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    reranker = Reranker(dirs[1])
    try:
        seqs = reranker.sequences("capital of China", docs)
        raw = [f.result(60).value for f in reranker.submit(seqs)]
    finally:
        reranker.close()
    assert out["scores"] == pytest.approx([probability(r) for r in raw], abs=1e-6)
    assert out["model"]["kind"] == "causal-lm"
    ids = tmp_path / "rendered.json"
    ids.write_text(json.dumps(seqs))
    again = json.loads(
        guard_main("rerank", "--model", str(dirs[1]), "--ids", str(ids), "--raw-scores", "--json").stdout
    )
    assert again["scores"] == pytest.approx(raw, abs=1e-5)


@pytest.mark.parametrize(
    "args, message",
    [
        (["embed", "--text", "x", "--dimensions", "8"], "MRL range is [32, 64]"),
        (["embed", "--text", ""], "inputs[0].text is empty"),
        (["rerank", "--query", "q"], "give --query and --doc"),
    ],
)
def test_bad_arguments_are_clear_errors(dirs, args, message):
    model = dirs[0] if args[0] == "embed" else dirs[1]
    done = guard_main(args[0], "--model", str(model), *args[1:])
    assert done.returncode == 2 and message in done.stderr


def test_a_bad_ids_file_is_a_clear_error(tmp_path, dirs):
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"not": "a list"}))
    done = guard_main("embed", "--model", str(dirs[0]), "--ids", str(bad))
    assert done.returncode == 2 and "expected a JSON list of inputs" in done.stderr
