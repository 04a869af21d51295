"""`qwen3guard.rerank.v1.Reranker`: Qwen3-Reranker scores over gRPC, batched across callers."""

from __future__ import annotations

import time
from functools import partial

import grpc

from guard.errors import InvalidInput
from guard.retrieval.reranker import Reranker, probability
from guard.retrieval.vision import Content
from server.media import MediaDecoding, to_content, vision_limits_message
from server.metrics import Metrics
from server.qwen3guard.rerank.v1 import rerank_pb2 as pb
from server.qwen3guard.rerank.v1 import rerank_pb2_grpc as pb_grpc
from server.retrieval_calls import (
    ModelHolder,
    RequestCounters,
    elapsed_ms,
    gather,
    pipelined,
    truncation,
    unary,
)

SERVICE = "Reranker"


class RerankerHolder(ModelHolder[Reranker]):
    def __init__(self) -> None:
        super().__init__("reranking")


def contents(request: pb.RerankRequest) -> tuple[Content, list[Content]]:
    """The query and the documents, from the text fields or the content fields (not both)."""
    if request.query and request.HasField("query_content"):
        raise InvalidInput("give `query` or `query_content`, not both")
    if request.documents and request.document_contents:
        raise InvalidInput("give `documents` or `document_contents`, not both")
    query = to_content(request.query_content) if request.HasField("query_content") else Content(request.query)
    if request.document_contents:
        return query, [to_content(c) for c in request.document_contents]
    return query, [Content(d) for d in request.documents]


class RerankerService(pb_grpc.RerankerServicer):
    def __init__(self, holder: RerankerHolder, metrics: Metrics, media: MediaDecoding) -> None:
        self.holder = holder
        self.counters = RequestCounters(metrics, SERVICE)
        self.media = media

    async def Rerank(self, request: pb.RerankRequest, context: grpc.aio.ServicerContext) -> pb.RerankResponse:
        return await unary(lambda: self._rerank(request), context)

    async def RerankStream(self, request_iterator, context: grpc.aio.ServicerContext):
        async for response in pipelined(request_iterator, self._rerank, context):
            yield response

    async def _rerank(self, request: pb.RerankRequest) -> pb.RerankResponse:
        received = time.perf_counter()
        model = self.holder.get()
        query, documents = contents(request)
        build = partial(
            model.sequences,
            query,
            documents,
            instruction=request.instruction,
            truncation=truncation(request.truncation),
        )
        media = query.has_media or any(d.has_media for d in documents)
        sequences = await self.media.run(build) if media else build()
        raw, timing = await gather(model.submit(sequences))
        scores = raw if request.raw_scores else [probability(r) for r in raw]
        order = sorted(range(len(scores)), key=lambda i: -scores[i])
        if request.top_n:
            order = order[: request.top_n]
        tokens = self.counters.record(sequences, timing)
        ranks = []
        for i in order:
            rank = pb.Rank(index=i, score=scores[i], tokens=len(sequences[i]))
            if request.return_text:
                rank.text = documents[i].text
            ranks.append(rank)
        return pb.RerankResponse(
            ranks=ranks,
            metadata=pb.Metadata(
                documents=len(sequences),
                tokens=tokens,
                queue_ms=timing.queue_ms,
                inference_ms=timing.inference_ms,
                total_ms=elapsed_ms(received),
                batch_size=timing.batch_size,
            ),
            request_id=request.request_id,
        )

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        async def call() -> pb.InfoResponse:
            model = self.holder.get()
            return pb.InfoResponse(
                model=model.path.name,
                kind=model.kind,
                max_input_tokens=model.max_length,
                max_batch_tokens=model.limits.max_batch_tokens,
                max_client_batch=model.limits.max_client_batch,
                default_instruction=model.default_instruction,
                demo=bool(model.demo),
                backend=self.holder.backend,
                modalities=model.modalities,
                vision_limits=vision_limits_message(model.vision.limits) if model.vision is not None else None,
            )

        return await unary(call, context)
