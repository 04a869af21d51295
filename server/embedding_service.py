"""`qwen3guard.embedding.v1.Embedder`: Qwen3-Embedding vectors over gRPC, batched across callers."""

from __future__ import annotations

import time
from collections.abc import Sequence
from functools import partial

import grpc
import numpy as np

from guard.errors import InvalidInput
from guard.policy.topics import TOPIC_INSTRUCTION, EmbedTexts
from guard.retrieval.embedder import Embedder, EmbedInput, finish
from guard.retrieval.inputs import Truncation
from server.media import MediaDecoding, to_video, vision_limits_message
from server.metrics import Metrics
from server.qwen3guard.embedding.v1 import embedding_pb2 as pb
from server.qwen3guard.embedding.v1 import embedding_pb2_grpc as pb_grpc
from server.retrieval_calls import (
    ModelHolder,
    RequestCounters,
    elapsed_ms,
    gather,
    pipelined,
    truncation,
    unary,
)

SERVICE = "Embedder"


class EmbedderHolder(ModelHolder[Embedder]):
    def __init__(self) -> None:
        super().__init__("embedding")


def topic_embedder(holder: EmbedderHolder) -> EmbedTexts:
    """The policy topics' embedding function: texts as queries with the similarity instruction,
    cut (never refused) at the model's limit, L2-normalised, through the shared batcher."""

    async def embed(texts: Sequence[str]) -> list[np.ndarray]:
        model = holder.get()
        sequences = [  # not `sequences()`: a policy may have more examples than a client batch
            model.sequence(EmbedInput(t, query=True), task=TOPIC_INSTRUCTION, truncation=Truncation.RIGHT, what="text")
            for t in texts
        ]
        vectors, _ = await gather(model.submit(sequences))
        return [finish(v, model.dimension, normalize=True) for v in vectors]

    return embed


def to_input(item: pb.EmbedInput, position: int) -> EmbedInput:
    content = item.WhichOneof("content")
    images = tuple(image.data for image in item.images)
    videos = tuple(to_video(v) for v in item.videos)
    if content == "token_ids":
        return EmbedInput(token_ids=tuple(item.token_ids.ids), query=item.query, images=images, videos=videos)
    if content is None and not (images or videos):
        raise InvalidInput(f"inputs[{position}] has neither `text` nor `token_ids` (nor images or videos)")
    return EmbedInput(item.text, query=item.query, images=images, videos=videos)


class EmbedderService(pb_grpc.EmbedderServicer):
    def __init__(self, holder: EmbedderHolder, metrics: Metrics, media: MediaDecoding) -> None:
        self.holder = holder
        self.counters = RequestCounters(metrics, SERVICE)
        self.media = media

    async def Embed(self, request: pb.EmbedRequest, context: grpc.aio.ServicerContext) -> pb.EmbedResponse:
        return await unary(lambda: self._embed(request), context)

    async def EmbedStream(self, request_iterator, context: grpc.aio.ServicerContext):
        async for response in pipelined(request_iterator, self._embed, context):
            yield response

    async def _embed(self, request: pb.EmbedRequest) -> pb.EmbedResponse:
        received = time.perf_counter()
        model = self.holder.get()
        inputs = [to_input(item, i) for i, item in enumerate(request.inputs)]
        build = partial(
            model.sequences, inputs, instruction=request.instruction, truncation=truncation(request.truncation)
        )
        sequences = await self.media.run(build) if any(i.images or i.videos for i in inputs) else build()
        dimensions = model.check_dimensions(request.dimensions or None)
        normalize = request.normalize if request.HasField("normalize") else model.layout.normalize
        vectors, timing = await gather(model.submit(sequences))
        tokens = self.counters.record(sequences, timing)
        return pb.EmbedResponse(
            embeddings=[
                pb.Embedding(values=finish(v, dimensions, normalize).tolist(), tokens=len(s))
                for v, s in zip(vectors, sequences, strict=True)
            ],
            metadata=pb.Metadata(
                inputs=len(sequences),
                tokens=tokens,
                queue_ms=timing.queue_ms,
                inference_ms=timing.inference_ms,
                total_ms=elapsed_ms(received),
                batch_size=timing.batch_size,
            ),
            request_id=request.request_id,
            dimensions=dimensions,
            normalized=normalize,
        )

    async def Tokenize(self, request: pb.TokenizeRequest, context: grpc.aio.ServicerContext) -> pb.TokenizeResponse:
        async def call() -> pb.TokenizeResponse:
            model = self.holder.get()
            inputs = [to_input(item, i) for i, item in enumerate(request.inputs)]
            sequences = model.sequences(
                inputs, instruction=request.instruction, truncation=truncation(request.truncation)
            )
            return pb.TokenizeResponse(
                inputs=[pb.TokenizedInput(ids=s, tokens=model.tokenizer.convert_ids_to_tokens(s)) for s in sequences]
            )

        return await unary(call, context)

    async def Info(self, request: pb.InfoRequest, context: grpc.aio.ServicerContext) -> pb.InfoResponse:
        async def call() -> pb.InfoResponse:
            model = self.holder.get()
            return pb.InfoResponse(
                model=model.path.name,
                dimension=model.dimension,
                min_dimensions=model.mrl_min,
                max_input_tokens=model.max_length,
                max_batch_tokens=model.limits.max_batch_tokens,
                max_client_batch=model.limits.max_client_batch,
                default_instruction=model.layout.default_task,
                normalize_default=model.layout.normalize,
                demo=bool(model.demo),
                backend=self.holder.backend,
                modalities=model.modalities,
                vision_limits=vision_limits_message(model.vision.limits) if model.vision is not None else None,
            )

        return await unary(call, context)
