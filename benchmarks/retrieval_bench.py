"""Embedder and Reranker throughput: the model against batch size, concurrent gRPC callers against
serial calls, and padding waste with and without length sorting.

What it measures, in one run:

1. **Model vs batch size** (in process, no batcher): embeddings/s (pairs/s for the reranker) for
   batches of 1, 8 and 32 inputs of mixed length (``--lengths``), with the same inputs.
2. **Concurrent vs serial over gRPC**: a sidecar (``guard serve``) in its own process serving
   the Embedder and Reranker; the same N inputs sent (a) one unary call at a time, one input per
   call, and (b) by ``--callers`` concurrent callers, one input per call, so the server batches
   across callers. Target (issue 11, demo models on this CPU): (b) >= 4x (a).
3. **Padding**: for a batch of mixed lengths cut by the token budget, positions computed
   (padding included) against real tokens, length-sorted groups against arrival order, with the
   time of each.

4. **Images** (``--only vision``; Qwen3-VL-Embedding on a tiny random Qwen3-VL, official pixel
   limits): per image, the decode + resize + prompt cost against the forward pass, for a small
   and a camera-sized JPEG, and images/s at batch 1 and 8.

``--shape 0.6B`` writes a random checkpoint of the 0.6B shape (Qwen3-Embedding-0.6B /
Qwen3-Reranker-0.6B) to a temporary directory and measures part 1 on it.

    python benchmarks/retrieval_bench.py --json benchmarks/results/retrieval-demo-cpu.json
    python benchmarks/retrieval_bench.py --shape 0.6B --only model --batches 1,8,32
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import random
import sys
import tempfile
import time
from pathlib import Path

import grpc
import torch
from load_test import free_port, percentile, wait_serving
from processes import guard_command, running

from guard.retrieval.backbone import LastHiddenState
from guard.retrieval.embedder import Embedder, EmbedInput
from guard.retrieval.reranker import Reranker
from guard.runtime import resolve_retrieval_model
from server.qwen3guard.embedding.v1 import embedding_pb2 as epb
from server.qwen3guard.embedding.v1 import embedding_pb2_grpc as epb_grpc
from server.qwen3guard.rerank.v1 import rerank_pb2 as rpb
from server.qwen3guard.rerank.v1 import rerank_pb2_grpc as rpb_grpc

SENTENCE = (
    "the guard reads every token of the stream and stops the answer at the first unsafe one while "
    "retrieval finds passages that answer questions about routers gardens bicycles taxes and weather"
)
WORDS = tuple(SENTENCE.split(" "))


def texts(count: int, lengths: tuple[int, int], seed: int) -> list[str]:
    """``count`` texts of ``lengths[0]..lengths[1]`` words (mixed lengths, as real traffic)."""
    rng = random.Random(seed)
    return [" ".join(rng.choices(WORDS, k=rng.randint(*lengths))) for _ in range(count)]


def timed(fn, repeat: int) -> float:
    """Median seconds of ``repeat`` calls after one warm-up."""
    fn()
    runs = []
    for _ in range(repeat):
        started = time.perf_counter()
        fn()
        runs.append(time.perf_counter() - started)
    return sorted(runs)[len(runs) // 2]


# ------------------------------------------------------------------------------- in process


def model_levels(kind: str, path: Path, batches: list[int], lengths: tuple[int, int], repeat: int) -> list[dict]:
    model = Embedder(path) if kind == "embedder" else Reranker(path)
    try:
        sample = texts(max(batches), lengths, seed=1)
        if kind == "embedder":
            sequences = model.sequences([EmbedInput(t) for t in sample])
        else:
            sequences = model.sequences("what answers questions about routers", sample)
        rows = []
        for batch in batches:
            seconds = timed(lambda b=batch: model.forward(sequences[:b]), repeat)
            rows.append(
                {
                    "model": kind,
                    "batch": batch,
                    "per_s": batch / seconds,
                    "ms_per_batch": seconds * 1e3,
                    "tokens": sum(len(s) for s in sequences[:batch]),
                }
            )
        return rows
    finally:
        model.close()


def padding_levels(kind: str, path: Path, count: int, lengths: tuple[int, int], budget: int, repeat: int) -> list:
    model = Embedder(path) if kind == "embedder" else Reranker(path)
    try:
        sample = texts(count, lengths, seed=2)
        if kind == "embedder":
            sequences = model.sequences([EmbedInput(t) for t in sample])
        else:
            sequences = model.sequences("what answers questions about routers", sample)
        forward = LastHiddenState(model.forward.backbone, pad_id=model.forward.pad_id, max_padded_tokens=budget)
        rows = []
        for sort in (False, True):
            stats = forward(sequences, sort=sort)[1]
            seconds = timed(lambda s=sort: forward(sequences, sort=s), repeat)
            rows.append(
                {
                    "model": kind,
                    "sorted": sort,
                    "sequences": count,
                    "real_tokens": stats.real_tokens,
                    "padded_tokens": stats.padded_tokens,
                    "waste": 1 - stats.real_tokens / stats.padded_tokens,
                    "groups": stats.groups,
                    "per_s": count / seconds,
                }
            )
        return rows
    finally:
        model.close()


# ------------------------------------------------------------------------------- over gRPC


async def grpc_level(kind: str, call, sample: list[str], callers: int) -> dict:
    """The same inputs one call at a time, then from ``callers`` concurrent callers."""
    for text in sample[:4]:  # warm-up
        await call(text)
    latency: list[float] = []
    sizes: list[int] = []

    async def one(text: str) -> None:
        started = time.perf_counter()
        reply = await call(text)
        latency.append(time.perf_counter() - started)
        sizes.append(reply.metadata.batch_size)

    started = time.perf_counter()
    for text in sample:
        await one(text)
    serial = time.perf_counter() - started
    serial_p50 = percentile(latency, 0.5)
    latency.clear()
    sizes.clear()
    pending = list(reversed(sample))

    async def caller() -> None:
        while pending:
            await one(pending.pop())

    started = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    concurrent = time.perf_counter() - started
    return {
        "model": kind,
        "inputs": len(sample),
        "callers": callers,
        "serial_per_s": len(sample) / serial,
        "concurrent_per_s": len(sample) / concurrent,
        "speedup": serial / concurrent,
        "serial_p50_ms": serial_p50 * 1e3,
        "concurrent_p50_ms": percentile(latency, 0.5) * 1e3,
        "mean_batch": sum(sizes) / len(sizes),
    }


async def grpc_levels(address: str, count: int, callers: int, lengths: tuple[int, int]) -> list[dict]:
    sample = texts(count, lengths, seed=3)
    async with grpc.aio.insecure_channel(address) as channel:
        embed = epb_grpc.EmbedderStub(channel)
        rerank = rpb_grpc.RerankerStub(channel)

        def embed_one(text: str):
            return embed.Embed(epb.EmbedRequest(inputs=[epb.EmbedInput(text=text)]), timeout=300)

        def rerank_one(text: str):
            return rerank.Rerank(rpb.RerankRequest(query="what answers questions", documents=[text]), timeout=300)

        return [
            await grpc_level("embedder", embed_one, sample, callers),
            await grpc_level("reranker", rerank_one, sample, callers),
        ]


def serve_command(args, address: str) -> list[str]:
    return guard_command(
        "serve", "--model", "demo", "--judge", "",
        "--embedder", str(args.embedder), "--reranker", str(args.reranker), "--address", address,
        "--metrics-port", "0", "--log-level", "WARNING", "--audit-log", "",
    )  # fmt: skip


# ------------------------------------------------------------------------------- output


def jpeg(width: int, height: int, seed: int) -> bytes:
    import io

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    # smooth gradients plus a little noise: closer to a photo than pure noise (which JPEG cannot compress)
    y, x = np.mgrid[0:height, 0:width]
    base = np.stack([(x * 255 // width), (y * 255 // height), ((x + y) * 127 // (width + height))], -1)
    pixels = np.clip(base + rng.normal(0, 12, base.shape), 0, 255).astype(np.uint8)
    out = io.BytesIO()
    Image.fromarray(pixels).save(out, "JPEG", quality=90)
    return out.getvalue()


def vision_levels(batches: list[int], repeat: int) -> list[dict]:
    from guard.retrieval.checkpoint_writer import write_vl_checkpoint

    rows = []
    with tempfile.TemporaryDirectory(prefix="retrieval-vl-") as tmp:
        model = Embedder(write_vl_checkpoint(Path(tmp) / "vl"))
        try:
            for width, height in ((224, 224), (1280, 720)):
                images = [jpeg(width, height, seed) for seed in range(max(batches))]
                inputs = [EmbedInput("a photo", images=(data,)) for data in images]
                prepare = timed(lambda i=inputs[:1]: model.sequences(i), repeat)
                sequences = model.sequences(inputs)
                for batch in batches:
                    seconds = timed(lambda b=batch, s=sequences: model.forward(s[:b]), repeat)
                    rows.append(
                        {
                            "image": f"{width}x{height}",
                            "batch": batch,
                            "tokens": len(sequences[0]),
                            "prepare_ms": prepare * 1e3,
                            "forward_ms_per_image": seconds * 1e3 / batch,
                            "images_per_s": batch / (seconds + prepare * batch),
                        }
                    )
        finally:
            model.close()
    return rows


def table(title: str, rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    print(f"\n## {title}")
    print("  ".join(f"{head:>{len(head) + 2}}" for head, _, _ in columns))
    for row in rows:
        print("  ".join(f"{format(row[key], fmt):>{len(head) + 2}}" for head, key, fmt in columns))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["demo", "0.6B"], default="demo")
    p.add_argument("--only", choices=["model", "grpc", "padding", "vision"], action="append")
    p.add_argument("--batches", default="1,8,32")
    p.add_argument("--lengths", default="4,60", help="words per input, min,max")
    p.add_argument("--inputs", type=int, default=256, help="inputs sent over gRPC (each way)")
    p.add_argument("--callers", type=int, default=32)
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--budget", type=int, default=2048, help="padded tokens per group in the padding part")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    parts = set(args.only or ["model", "grpc", "padding", "vision"])
    lengths = tuple(int(x) for x in args.lengths.split(","))
    batches = [int(x) for x in args.batches.split(",")]
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cores": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "shape": args.shape,
    }
    print(f"# {meta}")
    tmp = None
    if args.shape == "0.6B":
        from guard.retrieval.checkpoint_writer import write_embedding_checkpoint, write_reranker_checkpoint

        tmp = tempfile.TemporaryDirectory(prefix="retrieval-0.6B-")
        args.embedder = write_embedding_checkpoint(Path(tmp.name) / "emb", shape="0.6B")
        args.reranker = write_reranker_checkpoint(Path(tmp.name) / "rr", shape="0.6B")
    else:
        args.embedder = resolve_retrieval_model("demo", "embedder")
        args.reranker = resolve_retrieval_model("demo", "reranker")
    results: dict = {"meta": meta}
    try:
        if "model" in parts:
            rows = [r for kind in ("embedder", "reranker") for r in model_levels(
                kind, Path(args.__dict__[kind]), batches, lengths, args.repeat)]  # fmt: skip
            results["model"] = rows
            table("model vs batch size (in process)", rows, [
                ("model", "model", "s"), ("batch", "batch", "d"), ("per s", "per_s", ",.1f"),
                ("ms/batch", "ms_per_batch", ".1f"), ("tokens", "tokens", "d")])  # fmt: skip
        if "padding" in parts:
            rows = [r for kind in ("embedder", "reranker") for r in padding_levels(
                kind, Path(args.__dict__[kind]), 64, lengths, args.budget, args.repeat)]  # fmt: skip
            results["padding"] = rows
            table(f"padding, 64 mixed-length inputs, {args.budget}-token groups", rows, [
                ("model", "model", "s"), ("sorted", "sorted", "d"), ("real", "real_tokens", "d"),
                ("computed", "padded_tokens", "d"), ("waste", "waste", ".0%"), ("groups", "groups", "d"),
                ("per s", "per_s", ",.1f")])  # fmt: skip
        if "vision" in parts:
            rows = vision_levels([b for b in batches if b <= 8] or [1], args.repeat)
            results["vision"] = rows
            table("images: Qwen3-VL-Embedding (tiny random model, official pixel limits)", rows, [
                ("image", "image", "s"), ("batch", "batch", "d"), ("tokens", "tokens", "d"),
                ("prepare ms", "prepare_ms", ".2f"), ("forward ms/img", "forward_ms_per_image", ".2f"),
                ("images/s", "images_per_s", ",.1f")])  # fmt: skip
        if "grpc" in parts:
            address = f"127.0.0.1:{free_port()}"
            with running(serve_command(args, address), "sidecar"):
                asyncio.run(wait_serving(address))
                rows = asyncio.run(grpc_levels(address, args.inputs, args.callers, lengths))
            results["grpc"] = rows
            table(f"{args.callers} concurrent callers vs serial calls (gRPC, one input per call)", rows, [
                ("model", "model", "s"), ("serial/s", "serial_per_s", ",.1f"),
                ("concurrent/s", "concurrent_per_s", ",.1f"), ("speed-up", "speedup", ".2f"),
                ("serial p50 ms", "serial_p50_ms", ".1f"), ("conc. p50 ms", "concurrent_p50_ms", ".1f"),
                ("mean batch", "mean_batch", ".1f")])  # fmt: skip
            for row in rows:
                verdict = "met" if row["speedup"] >= 4 else "NOT met"
                print(f"target {row['model']}: concurrent >= 4x serial: {row['speedup']:.2f}x ({verdict})")
    finally:
        if tmp is not None:
            tmp.cleanup()
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
