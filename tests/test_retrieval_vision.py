"""Qwen3-VL-Embedding and Qwen3-VL-Reranker on a tiny Qwen3-VL in the released layout: pixels and
prompts equal the Qwen3-VL processor's, vectors and scores equal a plain transformers forward,
batches equal single inputs, limits refuse by name, and the services carry images over gRPC."""

from __future__ import annotations

import io

import grpc
import numpy as np
import pytest
import torch
from PIL import Image
from servers import running_sidecar

from guard.errors import InvalidInput
from guard.retrieval.checkpoint_writer import write_embedding_checkpoint, write_vl_checkpoint
from guard.retrieval.embedder import Embedder, EmbedInput, finish
from guard.retrieval.inputs import Truncation
from guard.retrieval.reranker import Reranker, probability
from guard.retrieval.vision import Content, Video, VisionLimits, load_image, patchify, smart_resize
from server.qwen3guard.embedding.v1 import embedding_pb2 as epb
from server.qwen3guard.embedding.v1 import embedding_pb2_grpc as epb_grpc
from server.qwen3guard.media.v1 import media_pb2 as mpb
from server.qwen3guard.rerank.v1 import rerank_pb2 as rpb
from server.qwen3guard.rerank.v1 import rerank_pb2_grpc as rpb_grpc

# Small pixel budgets keep the tiny model's sequences short; the code paths are the same.
LIMITS = VisionLimits(
    image_min_pixels=32 * 32,
    image_max_pixels=128 * 128,
    frame_min_pixels=32 * 32,
    frame_max_pixels=96 * 96,
    video_max_pixels=6 * 96 * 96,
    max_frames=6,
    max_media=3,
    max_encoded_bytes=200_000,
    max_source_pixels=600 * 600,
)


def encoded(
    seed: int, width: int = 80, height: int = 56, fmt: str = "PNG", mode: str = "RGB", flat: bool = False
) -> bytes:
    """A random image (``flat``: one random colour, which compresses to almost nothing)."""
    rng = np.random.default_rng(seed)
    shape = (1, 1, 4) if flat else (height, width, 4)
    pixels = np.broadcast_to((rng.random(shape) * 255).astype(np.uint8), (height, width, 4)).copy()
    image = Image.fromarray(pixels, "RGBA").convert(mode)
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


@pytest.fixture(scope="module")
def vl_dir(tmp_path_factory):
    return write_vl_checkpoint(tmp_path_factory.mktemp("vl") / "tiny-vl", seed=3)


@pytest.fixture(scope="module")
def embedder(vl_dir):
    model = Embedder(vl_dir, vision_limits=LIMITS)
    yield model
    model.close()


@pytest.fixture(scope="module")
def reranker(vl_dir):
    model = Reranker(vl_dir, vision_limits=LIMITS)
    yield model
    model.close()


def reference_processor(vl_dir):
    """transformers' Qwen3-VL processor with its PIL image processor (its video processor needs
    torchvision, which this torch build cannot import; images need only the tokenizer and PIL)."""
    from transformers import AutoTokenizer, Qwen3VLProcessor
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import Qwen2VLImageProcessorPil

    class ImagesOnly(Qwen3VLProcessor):
        def check_argument_for_proper_class(self, name, arg):  # the video processor is absent
            return None

    images = Qwen2VLImageProcessorPil(
        patch_size=16, merge_size=2, temporal_patch_size=2, image_mean=[0.5] * 3, image_std=[0.5] * 3
    )
    return ImagesOnly(
        image_processor=images, tokenizer=AutoTokenizer.from_pretrained(str(vl_dir)), video_processor=None
    )


def outputs(model, sequences):
    return [f.result(timeout=120).value for f in model.submit(sequences)]


# ---------------------------------------------------------------------- pixels and prompts


@pytest.mark.parametrize("size", [(80, 56), (20, 900), (640, 480), (33, 33)])
def test_resize_matches_the_processors_rule(size):
    from transformers.models.qwen2_vl.image_processing_pil_qwen2_vl import smart_resize as reference

    width, height = size
    ours = smart_resize(height, width, min_pixels=LIMITS.image_min_pixels, max_pixels=LIMITS.image_max_pixels)
    theirs = reference(height, width, factor=32, min_pixels=LIMITS.image_min_pixels, max_pixels=LIMITS.image_max_pixels)
    assert ours == tuple(theirs)
    assert ours[0] % 32 == 0 and ours[1] % 32 == 0
    if max(size) / min(size) < 4:  # a very thin image keeps one 32-pixel side, as the processor's
        assert LIMITS.image_min_pixels <= ours[0] * ours[1] <= LIMITS.image_max_pixels


def test_image_patches_equal_the_image_processors(vl_dir):
    processor = reference_processor(vl_dir)
    for seed, fmt, mode in [(1, "PNG", "RGB"), (2, "JPEG", "RGB"), (3, "PNG", "RGBA"), (4, "GIF", "P")]:
        visual = load_image(encoded(seed, fmt=fmt, mode=mode), LIMITS, "image")
        resized = Image.fromarray(visual.pixels[0])
        theirs = processor.image_processor(images=[resized], do_resize=False, return_tensors="pt")
        ours = patchify([visual], patch=16, merge=2, temporal=2, mean=[0.5] * 3, std=[0.5] * 3)
        assert list(theirs["image_grid_thw"][0]) == list(visual.grid)
        torch.testing.assert_close(ours, theirs["pixel_values"].float(), atol=1e-6, rtol=0)


def test_transparent_images_are_flattened_on_white():
    image = Image.new("RGBA", (64, 64), (0, 0, 0, 0))
    out = io.BytesIO()
    image.save(out, "PNG")
    visual = load_image(out.getvalue(), LIMITS, "image")
    assert (visual.pixels == 255).all()


def test_prompt_ids_equal_the_qwen3_vl_processors(vl_dir, embedder, reranker):
    """The rendered prompt with its image tokens expanded, as the processor builds it."""
    processor = reference_processor(vl_dir)
    image_bytes = [encoded(5), encoded(6, 200, 120)]
    content = Content("a red boat", images=tuple(image_bytes))
    ours = embedder.vision.embedding(
        content, instruction="Find the picture", truncation=Truncation.NONE, max_length=4096, what="x"
    )
    text = (
        "<|im_start|>system\nFind the picture.<|im_end|>\n<|im_start|>user\n"
        "<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>a red boat"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    resized = [Image.fromarray(v.pixels[0]) for v in ours.visuals]
    theirs = processor(text=[text], images=resized, do_resize=False, return_tensors="pt")
    assert ours.ids == theirs["input_ids"][0].tolist()
    forward = embedder.forward.group_inputs([ours], len(ours))
    assert forward["mm_token_type_ids"][0].tolist() == theirs["mm_token_type_ids"][0].tolist()
    torch.testing.assert_close(forward["pixel_values"], theirs["pixel_values"].float(), atol=1e-6, rtol=0)

    pair = reranker.vision.rerank(
        Content("boats"), content, instruction="", truncation=Truncation.NONE, max_length=4096, what="d"
    )
    text = (
        "<|im_start|>system\nJudge whether the Document meets the requirements based on the Query and the Instruct "
        'provided. Note that the answer can only be "yes" or "no".<|im_end|>\n<|im_start|>user\n'
        "<Instruct>: Given a search query, retrieve relevant candidates that answer the query.<Query>:boats\n"
        "<Document>:<|vision_start|><|image_pad|><|vision_end|><|vision_start|><|image_pad|><|vision_end|>a red boat"
        "<|im_end|>\n<|im_start|>assistant\n"
    )
    theirs = processor(text=[text], images=resized, do_resize=False, return_tensors="pt")
    assert pair.ids == theirs["input_ids"][0].tolist()


def test_video_frames_become_timestamped_temporal_patches(embedder):
    frames = tuple(encoded(10 + i) for i in range(5))  # odd: the last frame is repeated
    seq = embedder.sequence(
        EmbedInput("clip", videos=(Video(frames, fps=4.0),)), task=None, truncation=Truncation.NONE, what="x"
    )
    (video,) = seq.visuals
    assert video.kind == "video" and video.pixels.shape[0] == 6 and video.grid[0] == 3
    assert (video.pixels[5] == video.pixels[4]).all()
    text = embedder.tokenizer.decode(seq.ids)
    # frames (0,1), (2,3), (4,5) at 4 fps: the mean times 0.125, 0.625 and 1.125 s
    assert [f"<{t:.1f} seconds>" in text for t in (0.125, 0.625, 1.125)] == [True] * 3
    per_step = video.grid[1] * video.grid[2] // 4
    assert seq.ids.count(embedder.vision.video_id) == 3 * per_step
    # two identical frames make the same patches as the image itself
    still = encoded(20)
    one = embedder.sequence(
        EmbedInput("", videos=(Video((still, still)),)), task=None, truncation=Truncation.NONE, what="x"
    )
    image = load_image(still, VisionLimits(image_min_pixels=LIMITS.frame_min_pixels, image_max_pixels=96 * 96), "i")
    assert image.grid[1:] == one.visuals[0].grid[1:] == (4, 4)  # both 64 x 64 under these limits
    spec = embedder.vision.spec
    args = dict(patch=spec.patch, merge=spec.merge, temporal=spec.temporal, mean=spec.mean, std=spec.std)
    torch.testing.assert_close(patchify(one.visuals, **args), patchify([image], **args))


# ---------------------------------------------------------------------- the model's numbers


def test_embeddings_equal_a_plain_transformers_forward(vl_dir, embedder):
    """Each input alone through transformers' Qwen3VLModel (its own M-RoPE positions), last
    token, against the served batch of all of them."""
    from transformers import Qwen3VLModel

    plain = Qwen3VLModel.from_pretrained(str(vl_dir)).eval()
    inputs = [
        EmbedInput("what floats on water?", query=True),
        EmbedInput("a red boat", images=(encoded(5),)),
        EmbedInput("", images=(encoded(6, 200, 120), encoded(7, 40, 90))),
        EmbedInput("harbour", videos=(Video(tuple(encoded(30 + i) for i in range(4))),)),
        EmbedInput("both", images=(encoded(8),), videos=(Video((encoded(9), encoded(11))),)),
    ]
    sequences = embedder.sequences(inputs, instruction="Find boats")
    served = outputs(embedder, sequences)
    for seq, vector in zip(sequences, served, strict=True):
        group = embedder.forward.group_inputs([seq], len(seq))
        group.pop("position_ids")  # the model computes its own
        with torch.inference_mode():
            hidden = plain(**group).last_hidden_state[0, -1]
        np.testing.assert_allclose(vector, hidden.numpy(), atol=1e-5, rtol=0)
    assert np.linalg.norm(finish(served[1], 32, True)) == pytest.approx(1.0, abs=1e-6)


def test_a_batch_equals_each_input_alone(embedder):
    inputs = [
        EmbedInput("short"),
        EmbedInput("a much longer text input " * 6, images=(encoded(40),)),
        EmbedInput("", videos=(Video(tuple(encoded(50 + i) for i in range(3))),)),
        EmbedInput("two", images=(encoded(41, 300, 100), encoded(42))),
    ]
    sequences = embedder.sequences(inputs)
    together = outputs(embedder, sequences)
    for seq, vector in zip(sequences, together, strict=True):
        alone = outputs(embedder, [seq])[0]
        np.testing.assert_allclose(vector, alone, atol=1e-5, rtol=0)


def test_rerank_scores_are_p_yes_of_the_language_model_head(vl_dir, reranker):
    from transformers import Qwen3VLForConditionalGeneration

    plain = Qwen3VLForConditionalGeneration.from_pretrained(str(vl_dir)).eval()
    yes = reranker.tokenizer.convert_tokens_to_ids("yes")
    no = reranker.tokenizer.convert_tokens_to_ids("no")
    query = Content("boats", images=(encoded(60),))
    documents = [
        Content("a red boat"),
        Content("", images=(encoded(61),)),
        Content("video", videos=(Video((encoded(62),)),)),
    ]
    sequences = reranker.sequences(query, documents)
    raw = outputs(reranker, sequences)
    for seq, score in zip(sequences, raw, strict=True):
        group = reranker.forward.group_inputs([seq], len(seq))
        group.pop("position_ids")
        with torch.inference_mode():
            logits = plain(**group).logits[0, -1]
        assert probability(score) == pytest.approx(torch.sigmoid(logits[yes] - logits[no]).item(), abs=1e-5)
    alone = [outputs(reranker, [s])[0] for s in sequences]
    np.testing.assert_allclose(raw, alone, atol=1e-5)


def test_a_reranker_query_is_decoded_once_for_all_its_documents(reranker, monkeypatch):
    import guard.retrieval.vl_prompt as vl_prompt

    decoded: list[str] = []
    real = vl_prompt.load_content

    def counting(content, limits, what, **kwargs):
        decoded.append(what)
        return real(content, limits, what, **kwargs)

    monkeypatch.setattr(vl_prompt, "load_content", counting)
    query = Content("boats", images=(encoded(70),))
    reranker.sequences(query, [Content("a boat"), Content("", images=(encoded(71),)), Content("a dock")])
    assert decoded == ["query", "documents[0]", "documents[1]", "documents[2]"]


async def test_media_is_decoded_on_worker_threads_at_most_workers_at_once():
    import asyncio
    import threading

    from server.media import MediaDecoding

    decoding = MediaDecoding(2)
    lock, release = threading.Lock(), threading.Event()
    running, peak, threads = 0, 0, []

    def build() -> str:
        nonlocal running, peak
        with lock:
            running += 1
            peak = max(peak, running)
            threads.append(threading.current_thread())
        release.wait(60)
        with lock:
            running -= 1
        return "built"

    tasks = [asyncio.ensure_future(decoding.run(build)) for _ in range(5)]
    while True:  # two start; the other three wait for a slot
        with lock:
            if running == 2:
                break
        await asyncio.sleep(0.01)
    assert decoding._slots.locked() and not any(t.done() for t in tasks)
    release.set()
    assert await asyncio.gather(*tasks) == ["built"] * 5
    assert peak == 2 and threading.main_thread() not in threads and len(threads) == 5


# ---------------------------------------------------------------------- limits


@pytest.mark.parametrize(
    "item, message",
    [
        (EmbedInput("x", images=(b"not an image",)), "inputs\\[0\\].images\\[0\\] is not a decodable image"),
        (EmbedInput("x", images=(b"",)), "images\\[0\\] is empty"),
        (
            EmbedInput("x", images=(encoded(1, fmt="TIFF"),)),
            "not a decodable image in an accepted format \\(PNG, JPEG, WEBP, GIF, BMP\\)",
        ),
        (EmbedInput("x", images=(encoded(1)[:200],)), "truncated or corrupt PNG"),
        (EmbedInput("x", images=(encoded(1, 700, 600, flat=True),)), "max_source_pixels"),
        (EmbedInput("x", images=(encoded(1, 600, 2),)), "aspect ratio above 200"),
        (EmbedInput("x", images=(encoded(1, 300, 300),)), "max_encoded_bytes"),
        (EmbedInput("x", images=(encoded(1),) * 4), "max_media"),
        (EmbedInput("x", videos=(Video(tuple(encoded(i) for i in range(7))),)), "7 frames; the limit is 6"),
        (EmbedInput("x", videos=(Video(()),)), "has no frames"),
        (EmbedInput("x", videos=(Video((encoded(1),), fps=float("nan")),)), "fps is nan"),
        (EmbedInput("", images=()), "is empty"),
        (EmbedInput("see <|image_pad|> here", images=(encoded(1),)), "contains Qwen3-VL vision tokens"),
        (EmbedInput(token_ids=(1, 2), images=(encoded(1),)), "cannot carry images"),
    ],
)
def test_bad_media_is_refused_by_name(embedder, item, message):
    with pytest.raises(InvalidInput, match=message):
        embedder.sequences([item])


def test_the_text_is_cut_only_when_truncation_is_asked(vl_dir):
    model = Embedder(vl_dir, vision_limits=LIMITS, max_length=80)
    try:
        long = EmbedInput("boat " * 200, images=(encoded(1),))
        with pytest.raises(InvalidInput, match="the limit is 80"):
            model.sequences([long])
        for side in (Truncation.RIGHT, Truncation.LEFT):
            (seq,) = model.sequences([long], truncation=side)
            assert 70 <= len(seq) <= 80 and len(seq.visuals) == 1
        two_images = Content("some text", images=(encoded(2, 500, 500, flat=True),) * 2)  # 2 x 16 tokens
        with pytest.raises(InvalidInput, match="images, videos and the prompt alone"):
            model.vision.embedding(two_images, instruction="", truncation=Truncation.RIGHT, max_length=40, what="x")
    finally:
        model.close()


def test_a_text_only_model_refuses_images_by_name(tmp_path):
    model = Embedder(write_embedding_checkpoint(tmp_path / "text"))
    try:
        assert model.modalities == ("text",)
        with pytest.raises(InvalidInput, match="reads text only"):
            model.sequences([EmbedInput("x", images=(encoded(1),))])
    finally:
        model.close()


# ---------------------------------------------------------------------- over gRPC


@pytest.fixture(scope="module")
def served(demo_dir, vl_dir):
    limits = {f"vision_{k}": getattr(LIMITS, k) for k in LIMITS.__dataclass_fields__ if k != "default_fps"}
    with running_sidecar(
        model=str(demo_dir), judge="", embedder=str(vl_dir), reranker=str(vl_dir), **limits
    ) as running:
        yield running


def image(seed: int, **size) -> mpb.Image:
    return mpb.Image(data=encoded(seed, **size))


def test_embed_and_rerank_images_over_grpc(served, embedder, reranker):
    with grpc.insecure_channel(served.address) as channel:
        stub = epb_grpc.EmbedderStub(channel)
        info = stub.Info(epb.InfoRequest(), timeout=30)
        assert list(info.modalities) == ["text", "image", "video"]
        assert info.vision_limits.max_frames == LIMITS.max_frames
        assert info.default_instruction == "Represent the user's input."
        request = epb.EmbedRequest(
            inputs=[
                epb.EmbedInput(text="a red boat", images=[image(5)]),
                epb.EmbedInput(videos=[mpb.Video(frames=[image(30), image(31)], fps=1.0)]),
                epb.EmbedInput(text="boats?", query=True),
            ],
            instruction="Find boats",
        )
        reply = stub.Embed(request, timeout=120)
        expected = outputs(
            embedder,
            embedder.sequences(
                [
                    EmbedInput("a red boat", images=(encoded(5),)),
                    EmbedInput("", videos=(Video((encoded(30), encoded(31)), 1.0),)),
                    EmbedInput("boats?", query=True),
                ],
                instruction="Find boats",
            ),
        )
        for got, want in zip(reply.embeddings, expected, strict=True):
            np.testing.assert_allclose(got.values, finish(want, len(want), True), atol=1e-5)
        assert reply.embeddings[0].tokens > 20 and reply.metadata.tokens == sum(e.tokens for e in reply.embeddings)
        tokens = stub.Tokenize(epb.TokenizeRequest(inputs=request.inputs[1:2]), timeout=30).inputs[0].tokens
        assert "<|video_pad|>" in tokens and "seconds" in "".join(tokens)

        rerank = rpb_grpc.RerankerStub(channel)
        assert list(rerank.Info(rpb.InfoRequest(), timeout=30).modalities) == ["text", "image", "video"]
        ranked = rerank.Rerank(
            rpb.RerankRequest(
                query_content=mpb.Content(text="boats", images=[image(60)]),
                document_contents=[mpb.Content(text="a red boat"), mpb.Content(images=[image(61)])],
                return_text=True,
            ),
            timeout=120,
        )
        want = outputs(
            reranker,
            reranker.sequences(Content("boats", (encoded(60),)), [Content("a red boat"), Content("", (encoded(61),))]),
        )
        assert {r.index: r.score for r in ranked.ranks} == pytest.approx(
            {i: probability(w) for i, w in enumerate(want)}, abs=1e-5
        )
        assert {r.index: r.text for r in ranked.ranks} == {0: "a red boat", 1: ""}


def test_bad_images_over_grpc_are_invalid_argument_and_harm_no_other_call(served):
    import asyncio

    async def run():
        async with grpc.aio.insecure_channel(served.address) as channel:
            stub = epb_grpc.EmbedderStub(channel)
            rerank = rpb_grpc.RerankerStub(channel)
            bad = [
                stub.Embed(epb.EmbedRequest(inputs=[epb.EmbedInput(text="x", images=[mpb.Image(data=b"garbage")])])),
                stub.Embed(epb.EmbedRequest(inputs=[epb.EmbedInput(videos=[mpb.Video(frames=[image(1)] * 7)])])),
                rerank.Rerank(rpb.RerankRequest(query="q", query_content=mpb.Content(text="q"), documents=["d"])),
                rerank.Rerank(
                    rpb.RerankRequest(query="q", document_contents=[mpb.Content(images=[image(2, fmt="TIFF")])])
                ),
            ]
            good = stub.Embed(epb.EmbedRequest(inputs=[epb.EmbedInput(text="fine", images=[image(3)])]))
            results = await asyncio.gather(*bad, good, return_exceptions=True)
            messages = []
            for result in results[:-1]:
                assert isinstance(result, grpc.aio.AioRpcError), result
                assert result.code() == grpc.StatusCode.INVALID_ARGUMENT
                messages.append(result.details())
            assert "not a decodable image" in messages[0]
            assert "the limit is 6 (max_frames)" in messages[1]
            assert "not both" in messages[2]
            assert "accepted format" in messages[3]
            assert len(results[-1].embeddings) == 1

    asyncio.run(run())


def test_a_text_only_service_answers_images_with_invalid_argument(demo_dir, tmp_path):
    with running_sidecar(
        model=str(demo_dir), judge="", embedder=str(write_embedding_checkpoint(tmp_path / "t"))
    ) as running:
        with grpc.insecure_channel(running.address) as channel:
            stub = epb_grpc.EmbedderStub(channel)
            assert list(stub.Info(epb.InfoRequest(), timeout=30).modalities) == ["text"]
            with pytest.raises(grpc.RpcError) as caught:
                stub.Embed(epb.EmbedRequest(inputs=[epb.EmbedInput(text="x", images=[image(1)])]), timeout=30)
            assert caught.value.code() == grpc.StatusCode.INVALID_ARGUMENT
            assert "reads text only" in caught.value.details()


def test_guard_embed_cli_takes_image_files(vl_dir, tmp_path):
    """`guard embed --image` (default limits, as `guard serve` has them) equals the model."""
    import json

    from cli_runner import guard_main

    path = tmp_path / "boat.png"
    path.write_bytes(encoded(70))
    args = ["embed", "--model", str(vl_dir), "--image", str(path), "--json"]
    done = guard_main(*args)
    assert done.returncode == 0, done.stderr
    out = json.loads(done.stdout)
    model = Embedder(vl_dir)
    try:
        (want,) = outputs(model, model.sequences([EmbedInput(images=(encoded(70),))]))
    finally:
        model.close()
    np.testing.assert_allclose(out["embeddings"][0], finish(want, len(want), True), atol=1e-5)
    bad = tmp_path / "bad.png"
    bad.write_bytes(b"not a png")
    done = guard_main(*args[:-2], str(bad))
    assert done.returncode != 0 and "not a decodable image" in done.stderr


def test_queued_tokens_are_bounded_and_an_oversized_request_is_told_to_split(vl_dir):
    from guard.retrieval.batching import BatchLimits

    model = Embedder(vl_dir, vision_limits=LIMITS, limits=BatchLimits(max_queue_tokens=100))
    try:
        sequences = model.sequences([EmbedInput("a", images=(encoded(i),)) for i in range(4)])
        assert sum(len(s) for s in sequences) > 100
        with pytest.raises(InvalidInput, match=r"at most 100 can wait at once \(max_queue_tokens\): split it"):
            model.submit(sequences)
        assert len(outputs(model, sequences[:2])) == 2  # within the bound
        big = model.sequences([EmbedInput("b " * 120)])
        assert len(big[0]) > 100 and len(outputs(model, big)) == 1  # one sequence alone is always taken
    finally:
        model.close()
