"""The `vllm` backend of the Embedder and the Reranker against real vLLM servers (CPU, their own
environment, separate processes) serving tiny checkpoints of the released layouts: the sidecar
renders the sequences and vLLM computes them; the results equal the local backend's."""

from __future__ import annotations

import json
from contextlib import ExitStack

import grpc
import numpy as np
import pytest
from servers import running_sidecar
from vllm_runtime import running_vllm_http, started_together

from guard.retrieval.checkpoint_writer import write_embedding_checkpoint, write_reranker_checkpoint
from guard.retrieval.embedder import Embedder, EmbedInput, finish
from guard.retrieval.reranker import Reranker, probability
from server.qwen3guard.embedding.v1 import embedding_pb2 as epb
from server.qwen3guard.embedding.v1 import embedding_pb2_grpc as epb_grpc
from server.qwen3guard.rerank.v1 import rerank_pb2 as rpb
from server.qwen3guard.rerank.v1 import rerank_pb2_grpc as rpb_grpc

pytestmark = pytest.mark.vllm

# vLLM's CPU attention needs head_dim >= 64.
SHAPE = dict(
    hidden_size=128,
    intermediate_size=256,
    num_hidden_layers=2,
    num_attention_heads=2,
    num_key_value_heads=1,
    head_dim=64,
)
# How vLLM serves the original Qwen3-Reranker as a one-logit classifier (vLLM's qwen3_reranker example).
RERANKER_OVERRIDES = {
    "architectures": ["Qwen3ForSequenceClassification"],
    "classifier_from_token": ["no", "yes"],
    "is_original_qwen3_reranker": True,
}
DOCS = ["Beijing is the capital of China.", "Bananas are yellow.", "Gravity attracts masses."]


@pytest.fixture(scope="module")
def served(tmp_path_factory, demo_dir):
    root = tmp_path_factory.mktemp("vllm-retrieval")
    embedding = write_embedding_checkpoint(root / "emb", shape=SHAPE, seed=31)
    reranking = write_reranker_checkpoint(root / "rr", shape=SHAPE, seed=32)
    servers = started_together(
        running_vllm_http(embedding, name="qwen3-embedding-tiny", extra_args=("--runner", "pooling")),
        running_vllm_http(
            reranking,
            name="qwen3-reranker-tiny",
            extra_args=("--runner", "pooling", "--hf-overrides", json.dumps(RERANKER_OVERRIDES)),
        ),
    )
    with ExitStack() as stack:
        embed_url, rerank_url = stack.enter_context(servers)
        sidecar = stack.enter_context(
            running_sidecar(
                model=str(demo_dir),
                judge="",
                embedder=str(embedding),
                embedder_endpoint=embed_url,
                reranker=str(reranking),
                reranker_endpoint=rerank_url,
            )
        )
        yield sidecar, embedding, reranking


def test_vllm_vectors_equal_the_local_backend(served):
    sidecar, embedding, _ = served
    texts = [("Explain gravity", True), ("Gravity is a force that attracts two bodies.", False)]
    with grpc.insecure_channel(sidecar.address) as channel:
        stub = epb_grpc.EmbedderStub(channel)
        reply = stub.Embed(
            epb.EmbedRequest(inputs=[epb.EmbedInput(text=t, query=q) for t, q in texts], dimensions=64), timeout=120
        )
        info = stub.Info(epb.InfoRequest(), timeout=10)
    local = Embedder(embedding)
    try:
        seqs = local.sequences([EmbedInput(t, query=q) for t, q in texts])
        want = [finish(f.result(60).value, 64, True) for f in local.submit(seqs)]
    finally:
        local.close()
    assert info.backend == "vllm" and info.dimension == 128
    for got, w in zip(reply.embeddings, want, strict=True):
        np.testing.assert_allclose(np.array(got.values), w, atol=1e-5)


def test_vllm_rerank_scores_equal_the_local_backend(served):
    sidecar, _, reranking = served
    with grpc.insecure_channel(sidecar.address) as channel:
        stub = rpb_grpc.RerankerStub(channel)
        reply = stub.Rerank(rpb.RerankRequest(query="capital of China", documents=DOCS), timeout=120)
        info = stub.Info(rpb.InfoRequest(), timeout=10)
    local = Reranker(reranking)
    try:
        raw = [f.result(60).value for f in local.submit(local.sequences("capital of China", DOCS))]
    finally:
        local.close()
    assert info.backend == "vllm" and info.kind == "causal-lm"
    by_index = {r.index: r.score for r in reply.ranks}
    assert by_index == pytest.approx({i: probability(r) for i, r in enumerate(raw)}, abs=1e-5)


def test_an_unreachable_vllm_endpoint_is_unavailable_and_names_it(tmp_path, demo_dir):
    embedding = write_embedding_checkpoint(tmp_path / "emb", seed=33)
    with running_sidecar(
        model=str(demo_dir),
        judge="",
        embedder=str(embedding),
        embedder_endpoint="http://127.0.0.1:9",
        embedder_endpoint_model="qwen3-embedding",
    ) as sidecar:
        with grpc.insecure_channel(sidecar.address) as channel, pytest.raises(grpc.RpcError) as error:
            epb_grpc.EmbedderStub(channel).Embed(epb.EmbedRequest(inputs=[epb.EmbedInput(text="x")]), timeout=60)
    assert error.value.code() == grpc.StatusCode.UNAVAILABLE
    assert "http://127.0.0.1:9/v1/embeddings is unreachable" in error.value.details()
