"""The Embedder and Reranker services in a real sidecar on a loopback port: health, reflection,
results equal to the models', batching across callers, streams, and bad input that harms nothing
else."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from servers import running_sidecar

from guard.retrieval.checkpoint_writer import write_embedding_checkpoint, write_reranker_checkpoint
from guard.retrieval.embedder import Embedder, EmbedInput, finish
from guard.retrieval.reranker import Reranker, probability
from server.qwen3guard.embedding.v1 import embedding_pb2 as epb
from server.qwen3guard.embedding.v1 import embedding_pb2_grpc as epb_grpc
from server.qwen3guard.rerank.v1 import rerank_pb2 as rpb
from server.qwen3guard.rerank.v1 import rerank_pb2_grpc as rpb_grpc

EMBEDDER = epb.DESCRIPTOR.services_by_name["Embedder"].full_name
RERANKER = rpb.DESCRIPTOR.services_by_name["Reranker"].full_name
DOCS = ["Beijing is the capital of China.", "Bananas are yellow.", "Gravity attracts masses."]


@pytest.fixture(scope="module")
def retrieval_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("retrieval")
    return write_embedding_checkpoint(root / "emb", seed=7, max_seq_length=48), write_reranker_checkpoint(
        root / "rr", seed=8
    )


@pytest.fixture(scope="module")
def served(demo_dir, retrieval_dirs):
    embedding, reranking = retrieval_dirs
    with running_sidecar(
        model=str(demo_dir),
        judge="",
        embedder=str(embedding),
        reranker=str(reranking),
        embedder_max_client_batch=8,
        reranker_max_client_batch=8,
        reranker_max_length=160,
    ) as running:
        yield running


@pytest.fixture(scope="module")
def local(retrieval_dirs):
    """The same checkpoints in this process: what the services must return."""
    embedder, reranker = Embedder(retrieval_dirs[0]), Reranker(retrieval_dirs[1], max_length=160)
    yield embedder, reranker
    embedder.close()
    reranker.close()


def test_both_services_report_health_and_reflection(served):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    with grpc.insecure_channel(served.address) as channel:
        health = health_pb2_grpc.HealthStub(channel)
        for name in (EMBEDDER, RERANKER):
            status = health.Check(health_pb2.HealthCheckRequest(service=name), timeout=10).status
            assert status == health_pb2.HealthCheckResponse.SERVING, name
        stub = reflection_pb2_grpc.ServerReflectionStub(channel)
        replies = stub.ServerReflectionInfo(iter([reflection_pb2.ServerReflectionRequest(list_services="")]))
        names = {s.name for r in replies for s in r.list_services_response.service}
        assert {EMBEDDER, RERANKER} <= names


def test_embed_returns_the_models_vectors_with_dimensions_and_metadata(served, local):
    embedder = local[0]
    with grpc.insecure_channel(served.address) as channel:
        stub = epb_grpc.EmbedderStub(channel)
        request = epb.EmbedRequest(
            inputs=[epb.EmbedInput(text="Explain gravity", query=True), epb.EmbedInput(text="Gravity attracts.")],
            dimensions=32,
            request_id="r1",
        )
        reply = stub.Embed(request, timeout=60)
        info = stub.Info(epb.InfoRequest(), timeout=10)
    sequences = embedder.sequences([EmbedInput("Explain gravity", query=True), EmbedInput("Gravity attracts.")])
    expected = [finish(f.result(60).value, 32, True) for f in embedder.submit(sequences)]
    assert reply.request_id == "r1" and reply.dimensions == 32 and reply.normalized
    for got, want, seq in zip(reply.embeddings, expected, sequences, strict=True):
        np.testing.assert_allclose(np.array(got.values), want, atol=1e-5)
        assert got.tokens == len(seq)
    assert reply.metadata.inputs == 2 and reply.metadata.tokens == sum(map(len, sequences))
    assert reply.metadata.inference_ms > 0 and reply.metadata.total_ms >= reply.metadata.inference_ms
    assert (info.dimension, info.min_dimensions, info.max_input_tokens, info.max_client_batch) == (64, 32, 48, 8)
    assert info.default_instruction == embedder.layout.default_task and not info.demo


def test_tokenize_shows_what_is_embedded(served, local):
    with grpc.insecure_channel(served.address) as channel:
        reply = epb_grpc.EmbedderStub(channel).Tokenize(
            epb.TokenizeRequest(inputs=[epb.EmbedInput(text="hi", query=True)], instruction="Greet"), timeout=10
        )
    ids = list(reply.inputs[0].ids)
    assert local[0].tokenizer.decode(ids) == "Instruct: Greet\nQuery:hi<|endoftext|>"
    assert reply.inputs[0].tokens[-1] == "<|endoftext|>"


def test_concurrent_callers_share_batches(demo_dir, retrieval_dirs):
    """With max_batch 4 and a window far longer than the test, a batch starts only when 4
    sequences are queued: 4 concurrent one-input calls must have been computed together."""
    with running_sidecar(
        model=str(demo_dir), judge="", embedder=str(retrieval_dirs[0]), embedder_max_batch=4, embedder_wait_ms=60_000
    ) as running:

        async def calls():
            async with grpc.aio.insecure_channel(running.address) as channel:
                stub = epb_grpc.EmbedderStub(channel)
                # a call that gives up while queued leaves the queue: it must not take a batch place
                with pytest.raises(grpc.aio.AioRpcError) as gone:
                    await stub.Embed(epb.EmbedRequest(inputs=[epb.EmbedInput(text="gone")]), timeout=0.5)
                assert gone.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
                return await asyncio.gather(
                    *(
                        stub.Embed(epb.EmbedRequest(inputs=[epb.EmbedInput(text=f"text {i}")]), timeout=60)
                        for i in range(4)
                    )
                )

        replies = running.loop.run(calls())
    assert [r.metadata.batch_size for r in replies] == [4, 4, 4, 4]


def test_embed_stream_answers_in_order_and_equals_unary(served):
    async def run():
        async with grpc.aio.insecure_channel(served.address) as channel:
            stub = epb_grpc.EmbedderStub(channel)
            requests = [
                epb.EmbedRequest(inputs=[epb.EmbedInput(text=f"document number {i}")], request_id=str(i))
                for i in range(20)
            ]
            streamed = [r async for r in stub.EmbedStream(iter(requests), timeout=60)]
            unary = await stub.Embed(requests[7], timeout=60)
            return streamed, unary

    streamed, unary = served.loop.run(run())
    assert [r.request_id for r in streamed] == [str(i) for i in range(20)]
    np.testing.assert_allclose(streamed[7].embeddings[0].values, unary.embeddings[0].values, atol=1e-6)


def test_a_bad_request_ends_its_stream_naming_it_and_nothing_else(served):
    async def run():
        async with grpc.aio.insecure_channel(served.address) as channel:
            stub = epb_grpc.EmbedderStub(channel)
            good = epb.EmbedRequest(inputs=[epb.EmbedInput(text="fine")])
            bad = epb.EmbedRequest(inputs=[epb.EmbedInput(text="")])
            call = stub.EmbedStream(iter([good, bad, good]), timeout=60)
            got = []
            with pytest.raises(grpc.aio.AioRpcError) as error:
                async for reply in call:
                    got.append(reply)
            beside = await stub.Embed(good, timeout=60)
            return got, error.value, beside

    got, error, beside = served.loop.run(run())
    assert error.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request 1 of the stream" in error.details() and "inputs[0].text is empty" in error.details()
    assert len(got) <= 1 and len(beside.embeddings) == 1


@pytest.mark.parametrize(
    "request_, message",
    [
        (epb.EmbedRequest(), "`inputs` is empty"),
        (epb.EmbedRequest(inputs=[epb.EmbedInput(text="x")] * 9), "`inputs` has 9 entries; at most 8"),
        (epb.EmbedRequest(inputs=[epb.EmbedInput(text="")]), "inputs[0].text is empty"),
        (epb.EmbedRequest(inputs=[epb.EmbedInput(query=True)]), "inputs[0] has neither `text` nor `token_ids`"),
        (epb.EmbedRequest(inputs=[epb.EmbedInput(text="x")], dimensions=8), "MRL range is [32, 64]"),
        (epb.EmbedRequest(inputs=[epb.EmbedInput(text="word " * 100)]), "the limit is 47"),
        (epb.EmbedRequest(inputs=[epb.EmbedInput(text="x")], truncation=7), "`truncation` 7 is not a known value"),
    ],
)
def test_bad_embed_requests_are_invalid_argument_and_a_good_call_beside_them_succeeds(served, request_, message):
    async def run():
        async with grpc.aio.insecure_channel(served.address) as channel:
            stub = epb_grpc.EmbedderStub(channel)
            good = stub.Embed(epb.EmbedRequest(inputs=[epb.EmbedInput(text="fine")]), timeout=60)
            bad = stub.Embed(request_, timeout=60)
            return await asyncio.gather(good, bad, return_exceptions=True)

    good, bad = served.loop.run(run())
    assert isinstance(bad, grpc.aio.AioRpcError) and bad.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert message in bad.details()
    assert len(good.embeddings) == 1


def test_truncation_lets_a_long_input_through(served):
    with grpc.insecure_channel(served.address) as channel:
        reply = epb_grpc.EmbedderStub(channel).Embed(
            epb.EmbedRequest(inputs=[epb.EmbedInput(text="word " * 100)], truncation=epb.TRUNCATION_LEFT), timeout=60
        )
    assert reply.embeddings[0].tokens == 48


def test_rerank_scores_top_n_text_and_raw(served, local):
    reranker = local[1]
    raw = [f.result(60).value for f in reranker.submit(reranker.sequences("capital of China", DOCS))]
    with grpc.insecure_channel(served.address) as channel:
        stub = rpb_grpc.RerankerStub(channel)
        full = stub.Rerank(rpb.RerankRequest(query="capital of China", documents=DOCS), timeout=60)
        top = stub.Rerank(
            rpb.RerankRequest(query="capital of China", documents=DOCS, top_n=2, return_text=True, raw_scores=True),
            timeout=60,
        )
        info = stub.Info(rpb.InfoRequest(), timeout=10)
    order = sorted(range(3), key=lambda i: -raw[i])
    assert [r.index for r in full.ranks] == order
    for rank in full.ranks:
        assert abs(rank.score - probability(raw[rank.index])) < 1e-6 and not rank.HasField("text")
    assert [r.index for r in top.ranks] == order[:2]
    assert [r.text for r in top.ranks] == [DOCS[i] for i in order[:2]]
    assert abs(top.ranks[0].score - raw[order[0]]) < 1e-5
    assert full.metadata.documents == 3 and full.metadata.tokens == sum(r.tokens for r in full.ranks)
    assert (info.kind, info.max_input_tokens, info.max_client_batch) == ("causal-lm", 160, 8)


def test_rerank_stream_and_bad_requests(served):
    async def run():
        async with grpc.aio.insecure_channel(served.address) as channel:
            stub = rpb_grpc.RerankerStub(channel)
            requests = [rpb.RerankRequest(query=f"q{i}", documents=DOCS, request_id=str(i)) for i in range(6)]
            streamed = [r async for r in stub.RerankStream(iter(requests), timeout=60)]
            errors = []
            for bad in (
                rpb.RerankRequest(documents=DOCS),
                rpb.RerankRequest(query="q"),
                rpb.RerankRequest(query="q", documents=["d"] * 9),
                rpb.RerankRequest(query="q", documents=["word " * 200]),
            ):
                with pytest.raises(grpc.aio.AioRpcError) as error:
                    await stub.Rerank(bad, timeout=60)
                errors.append(error.value)
            return streamed, errors

    streamed, errors = served.loop.run(run())
    assert [r.request_id for r in streamed] == [str(i) for i in range(6)]
    assert all(e.code() == grpc.StatusCode.INVALID_ARGUMENT for e in errors)
    assert ["`query` is empty" in errors[0].details(), "`documents` is empty" in errors[1].details()] == [True, True]
    assert "at most 8" in errors[2].details() and "the limit is" in errors[3].details()


def test_an_embedder_that_fails_to_load_stops_serve_with_its_name(tmp_path, demo_dir):
    missing = tmp_path / "no-such-embedder"
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "server.cli",
            "serve",
            "--model",
            str(demo_dir),
            "--judge",
            "",
            "--embedder",
            str(missing),
            "--address",
            "127.0.0.1:0",
            "--metrics-port",
            "0",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=Path(__file__).resolve().parents[1],
    )
    assert done.returncode == 1
    assert "'Embedder'" in done.stderr and str(missing) in done.stderr


def test_retrieval_metrics_count_inputs_tokens_padding_and_batches(served):
    m = served.sidecar.metrics

    def value(name: str, **labels) -> float:
        return m.registry.get_sample_value(name, labels) or 0.0

    before = {
        k: value(f"guard_retrieval_{k}", service="Embedder")
        for k in ("inputs_total", "tokens_total", "padded_tokens_total", "forward_seconds_count")
    }
    with grpc.insecure_channel(served.address) as channel:
        reply = epb_grpc.EmbedderStub(channel).Embed(
            epb.EmbedRequest(inputs=[epb.EmbedInput(text="short"), epb.EmbedInput(text="a longer input " * 3)]),
            timeout=60,
        )
    tokens = sum(e.tokens for e in reply.embeddings)
    assert value("guard_retrieval_inputs_total", service="Embedder") - before["inputs_total"] == 2
    assert value("guard_retrieval_tokens_total", service="Embedder") - before["tokens_total"] == tokens
    assert value("guard_retrieval_padded_tokens_total", service="Embedder") - before["padded_tokens_total"] >= tokens
    assert value("guard_retrieval_forward_seconds_count", service="Embedder") > before["forward_seconds_count"]
