"""Qwen3-Embedding and Qwen3-Reranker on tiny random checkpoints in the released layouts: loading
(flat and prefixed names, sentence-transformers files, both reranker forms), equality with a plain
transformers forward, padding invariance, MRL, truncation and clear errors."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from transformers import Qwen3ForCausalLM, Qwen3ForSequenceClassification, Qwen3Model

from guard.errors import InvalidInput
from guard.retrieval.backbone import plan_groups
from guard.retrieval.batching import BatchLimits
from guard.retrieval.checkpoint import RetrievalCheckpointError
from guard.retrieval.checkpoint_writer import write_embedding_checkpoint, write_reranker_checkpoint
from guard.retrieval.embedder import Embedder, EmbedInput, finish
from guard.retrieval.inputs import Truncation
from guard.retrieval.reranker import PREFIX, SUFFIX, Reranker, body, probability

TEXTS = [
    "What is the capital of China?",
    "Explain gravity",
    "The capital of China is Beijing. It has been the capital for centuries and hosts the government.",
    "Gravity is a force that attracts two bodies towards each other.",
    "短い文",  # other scripts tokenize like any text
]


@pytest.fixture(scope="module")
def embedding_dir(tmp_path_factory):
    return write_embedding_checkpoint(tmp_path_factory.mktemp("embedding") / "ckpt", seed=3, max_seq_length=64)


@pytest.fixture(scope="module")
def embedder(embedding_dir):
    model = Embedder(embedding_dir, limits=BatchLimits(max_batch_tokens=96, max_client_batch=8))
    yield model
    model.close()


def vectors(model: Embedder, sequences) -> list[np.ndarray]:
    return [f.result(60).value for f in model.submit(sequences)]


def reference_last_hidden(path, sequences) -> list[torch.Tensor]:
    """transformers' Qwen3Model on each sequence alone, pooled by hand: the last token's state."""
    model = Qwen3Model.from_pretrained(str(path)).eval()
    with torch.no_grad():
        return [model(input_ids=torch.tensor([s])).last_hidden_state[0, -1] for s in sequences]


def test_the_released_layout_reads_the_sentence_transformers_files(embedder):
    assert embedder.layout.sentence_transformers and embedder.layout.normalize
    assert embedder.max_length == 64  # sentence_bert_config.json's max_seq_length
    assert (embedder.mrl_min, embedder.dimension) == (32, 64)


def test_queries_get_the_instruction_and_every_input_ends_with_endoftext(embedder):
    q, d = embedder.sequences([EmbedInput("Explain gravity", query=True), EmbedInput("Gravity pulls.")])
    end = embedder.tokenizer.convert_tokens_to_ids("<|endoftext|>")
    assert q[-1] == d[-1] == end
    assert embedder.tokenizer.decode(q[:-1]) == f"Instruct: {embedder.layout.default_task}\nQuery:Explain gravity"
    assert embedder.tokenizer.decode(d[:-1]) == "Gravity pulls."
    custom = embedder.sequences([EmbedInput("x", query=True)], instruction="Find code")[0]
    assert embedder.tokenizer.decode(custom[:-1]) == "Instruct: Find code\nQuery:x"


def test_batched_equals_alone_and_equals_transformers_with_manual_pooling(embedder, embedding_dir):
    sequences = embedder.sequences([EmbedInput(t, query=i % 2 == 0) for i, t in enumerate(TEXTS)])
    batched = vectors(embedder, sequences)  # several lengths: left padding, budget groups
    alone = [vectors(embedder, [s])[0] for s in sequences]
    reference = reference_last_hidden(embedding_dir, sequences)
    for b, a, r in zip(batched, alone, reference, strict=True):
        np.testing.assert_allclose(b, a, atol=1e-5)
        np.testing.assert_allclose(b, r.numpy(), atol=1e-5)


def test_flat_and_prefixed_layouts_give_the_same_vectors(tmp_path, embedder, embedding_dir):
    prefixed = write_embedding_checkpoint(tmp_path / "prefixed", seed=3, layout="prefixed", sentence_transformers=False)
    names = set(json.loads((prefixed / "config.json").read_text()))
    assert "architectures" in names
    other = Embedder(prefixed)
    try:
        seq = embedder.sequences([EmbedInput("same weights")])
        np.testing.assert_allclose(vectors(other, seq)[0], vectors(embedder, seq)[0], atol=1e-6)
        assert not other.layout.sentence_transformers and other.layout.normalize  # the model's default
    finally:
        other.close()


def test_mrl_truncates_then_normalises(embedder):
    raw = vectors(embedder, embedder.sequences([EmbedInput("Explain gravity")]))[0]
    out = finish(raw, 32, normalize=True)
    np.testing.assert_allclose(out, raw[:32] / np.linalg.norm(raw[:32]), rtol=1e-6)
    assert abs(np.linalg.norm(out) - 1) < 1e-6
    np.testing.assert_array_equal(finish(raw, 64, normalize=False), raw)
    assert embedder.check_dimensions(None) == 64
    for bad in (16, 65):
        with pytest.raises(InvalidInput, match=r"`dimensions` is .*MRL range is \[32, 64\]"):
            embedder.check_dimensions(bad)


def test_too_long_input_is_refused_naming_the_limit_unless_truncated(embedder):
    long_text = "word " * 200
    with pytest.raises(InvalidInput, match=r"inputs\[1\] has \d+ tokens; the limit is 63"):
        embedder.sequences([EmbedInput("ok"), EmbedInput(long_text)])
    right = embedder.sequences([EmbedInput(long_text)], truncation=Truncation.RIGHT)[0]
    left = embedder.sequences([EmbedInput("start " + long_text + " end")], truncation=Truncation.LEFT)[0]
    assert len(right) == len(left) == 64  # 63 tokens of text + <|endoftext|>
    assert embedder.tokenizer.decode(left[-2:-1]) == " end"


def test_bad_inputs_name_the_field(embedder):
    cases = [
        ([], r"`inputs` is empty"),
        ([EmbedInput("x")] * 9, r"`inputs` has 9 entries; at most 8"),
        ([EmbedInput("  ")], r"inputs\[0\]\.text is empty"),
        ([EmbedInput(token_ids=(1, 10**7))], r"inputs\[0\]\.token_ids: token id 10000000 .*vocabulary"),
        ([EmbedInput(token_ids=())], r"inputs\[0\]\.token_ids is empty"),
    ]
    for inputs, message in cases:
        with pytest.raises(InvalidInput, match=message):
            embedder.sequences(inputs)


def test_token_ids_are_used_exactly_as_given(embedder):
    assert embedder.sequences([EmbedInput(token_ids=(5, 6, 7))]) == [[5, 6, 7]]


def test_pooling_other_than_last_token_and_missing_weights_are_refused(tmp_path, embedding_dir):
    mean = tmp_path / "mean"
    shutil.copytree(embedding_dir, mean)
    pooling = json.loads((mean / "1_Pooling" / "config.json").read_text())
    pooling.update(pooling_mode_lasttoken=False, pooling_mode_mean_tokens=True)
    (mean / "1_Pooling" / "config.json").write_text(json.dumps(pooling))
    with pytest.raises(RetrievalCheckpointError, match=r"pooling \['mean_tokens'\].*last-token pooling"):
        Embedder(mean)
    partial = tmp_path / "partial"
    shutil.copytree(embedding_dir, partial)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(partial / "model.safetensors"))
    del tensors["layers.1.mlp.down_proj.weight"]
    save_file(tensors, str(partial / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(RetrievalCheckpointError, match=r"lacks weights for .*layers\.1\.mlp\.down_proj"):
        Embedder(partial)


def test_padding_groups_respect_the_token_budget_and_sort_by_length():
    lengths = [5, 50, 6, 7, 48, 5]
    groups = plan_groups(lengths, 100)
    assert sorted(i for g in groups for i in g) == list(range(6))
    for g in groups:
        assert len(g) == 1 or max(lengths[i] for i in g) * len(g) <= 100
    assert groups[0] == [0, 5, 2, 3]  # the short ones together
    assert plan_groups([500], 100) == [[0]]  # one over the budget runs alone


# ------------------------------------------------------------------------------ reranker


@pytest.fixture(scope="module")
def reranker_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("reranker")
    return {
        "causal-lm": write_reranker_checkpoint(root / "lm", seed=4),
        "untied": write_reranker_checkpoint(root / "untied", seed=5, tie_word_embeddings=False),
        "sequence-classification": write_reranker_checkpoint(root / "cls", seed=6, kind="sequence-classification"),
    }


DOCS = ["Beijing is the capital of China.", "Bananas are yellow.", "Gravity attracts masses to each other."]


@pytest.mark.parametrize("kind", ["causal-lm", "untied"])
def test_reranker_score_is_p_yes_of_the_official_prompt(reranker_dirs, kind):
    path = reranker_dirs[kind]
    reranker = Reranker(path)
    try:
        sequences = reranker.sequences("capital of China", DOCS, instruction="Find the answer")
        raw = [f.result(60).value for f in reranker.submit(sequences)]
    finally:
        reranker.close()
    model = Qwen3ForCausalLM.from_pretrained(str(path)).eval()
    tok = reranker.tokenizer
    yes, no = tok.convert_tokens_to_ids("yes"), tok.convert_tokens_to_ids("no")
    for doc, seq, r in zip(DOCS, sequences, raw, strict=True):
        assert tok.decode(seq) == PREFIX + body("Find the answer", "capital of China", doc) + SUFFIX
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([seq])).logits[0, -1]
        p_yes = torch.log_softmax(logits[[no, yes]], dim=-1)[1].exp().item()
        assert abs(probability(r) - p_yes) < 1e-5 and abs(r - (logits[yes] - logits[no]).item()) < 1e-4


def test_the_sequence_classification_form_scores_with_its_one_logit(reranker_dirs):
    path = reranker_dirs["sequence-classification"]
    reranker = Reranker(path)
    try:
        assert reranker.kind == "sequence-classification"
        sequences = reranker.sequences("capital of China", DOCS)
        raw = [f.result(60).value for f in reranker.submit(sequences)]
    finally:
        reranker.close()
    model = Qwen3ForSequenceClassification.from_pretrained(str(path)).eval()
    for seq, r in zip(sequences, raw, strict=True):
        with torch.no_grad():
            logit = model(input_ids=torch.tensor([seq])).logits[0, 0].item()
        assert abs(r - logit) < 1e-4


def test_reranker_bad_inputs_and_truncation(reranker_dirs):
    reranker = Reranker(reranker_dirs["causal-lm"], max_length=120, limits=BatchLimits(max_client_batch=2))
    try:
        for args, message in [
            (("", ["d"]), r"`query` is empty"),
            (("q", []), r"`documents` is empty"),
            (("q", ["a", "b", "c"]), r"`documents` has 3 entries; at most 2"),
            (("q", ["ok", " "]), r"documents\[1\] is empty"),
            (("q", ["word " * 200]), r"documents\[0\] has \d+ tokens; the limit is \d+"),
        ]:
            with pytest.raises(InvalidInput, match=message):
                reranker.sequences(*args)
        cut = reranker.sequences("q", ["word " * 200], truncation=Truncation.RIGHT)[0]
        assert len(cut) == 120 and cut[-len(reranker.suffix_ids) :] == reranker.suffix_ids
    finally:
        reranker.close()
