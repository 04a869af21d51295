"""Stream engine benchmark: per-token cost against context length (ours vs. a naive baseline:
a no-cache recompute of the prefix with our own model code), and aggregate tokens/s for many
concurrent streams and chunk sizes. Prints a table; ``--json PATH`` writes the results.

Both approaches run the same model code in the same process and run, so ratios are meaningful
on a shared, noisy machine. Usage:

    python benchmarks/stream_bench.py --model demo --json benchmarks/results/demo.json
    python benchmarks/stream_bench.py --model 0.6B --contexts 128,1024,4096 --streams 1,4,16 --chunks 1,8
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import statistics
import sys
import time
from pathlib import Path

import torch

from guard.cache import cache_dir
from guard.model.checkpoint import load_stream_guard
from guard.model.checkpoint_writer import SHAPES, write_random_checkpoint
from guard.model.engine import EngineLimits, StreamEngine
from guard.model.kv_cache import StepLayout, StepRow
from guard.runtime import parse_dtype, resolve_model


def model_path(spec: str) -> Path:
    """``demo`` (the trained demo), a shape name from SHAPES (random weights, cached), or a directory."""
    if spec != "demo" and spec in SHAPES:
        target = cache_dir() / f"bench-random-{spec}"
        if not (target / "config.json").exists():
            print(f"writing a random {spec} checkpoint to {target} ...", file=sys.stderr)
            write_random_checkpoint(target, spec, seed=0)
        return target
    return resolve_model(spec)


def ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(0, 150_000) for _ in range(n)]


def per_token_ours(engine: StreamEngine, context: int, tokens: int, rng: random.Random) -> float:
    """Seconds per token, chunk size 1, after a prompt of ``context`` tokens (cache reused)."""
    session, prompt = engine.open_session(ids(rng, context))
    prompt.result()
    engine.submit(session, ids(rng, 2)).result()  # warm-up at this length
    started = time.perf_counter()
    for _ in range(tokens):
        engine.submit(session, ids(rng, 1)).result()
    elapsed = time.perf_counter() - started
    engine.close(session)
    return elapsed / tokens


def per_token_naive(guard, context: int, reps: int, rng: random.Random) -> float:
    """Seconds per token when every new token re-runs the whole prefix (no cache reuse)."""
    model = guard.model
    cache = model.new_cache(max_slots=1, max_tokens=context + 1)
    slot = cache.allocate()
    cache.reserve_tokens(context + 1)
    seq = torch.tensor(ids(rng, context + 1))
    times = []
    for _ in range(reps):
        started = time.perf_counter()
        hidden = model.step(seq, StepLayout([StepRow(slot, 0, len(seq))], cache.device), cache)
        with torch.inference_mode():
            model.response_head(hidden[-1:])
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def throughput(guard, streams: int, chunk: int, tokens_per_stream: int, prompt: int, rng: random.Random) -> dict:
    """Aggregate response tokens/s: every stream sends its next chunk when the previous is judged."""
    rows: list[int] = []
    engine = StreamEngine(
        guard,
        EngineLimits(
            max_sessions=max(streams, 1), max_step_tokens=4096, max_tokens_per_session=prompt + tokens_per_stream + 64
        ),
        on_step=lambda s: rows.append(s.rows),
    )
    try:
        sessions = [engine.open_session(ids(rng, prompt)) for _ in range(streams)]
        for _, f in sessions:
            f.result()
        for f in [engine.submit(s, ids(rng, chunk)) for s, _ in sessions]:  # warm-up step
            f.result()
        rows.clear()
        rounds = max(1, tokens_per_stream // chunk)
        latencies = []
        started = time.perf_counter()
        for _ in range(rounds):
            futures = [engine.submit(s, ids(rng, chunk)) for s, _ in sessions]
            for f in futures:
                r = f.result()
                latencies.append(r.queue_s + r.compute_s)
        elapsed = time.perf_counter() - started
    finally:
        engine.shutdown()
    total = rounds * chunk * streams
    return {
        "streams": streams,
        "chunk": chunk,
        "tokens": total,
        "seconds": elapsed,
        "tokens_per_s": total / elapsed,
        "mean_rows_per_step": statistics.mean(rows) if rows else 0.0,
        "p50_chunk_ms": 1000 * statistics.median(latencies),
    }


def check_targets(context_rows: list[dict], tp_rows: list[dict]) -> list[dict]:
    """The issue's targets, where this run measured the points they need."""
    out = []
    by_ctx = {r["context"]: r for r in context_rows}
    if 128 in by_ctx and 4096 in by_ctx:
        ratio = by_ctx[4096]["ours_ms"] / by_ctx[128]["ours_ms"]
        out.append({"name": "per-token cost 4096 / 128", "value": ratio, "target": "<= 1.5", "ok": ratio <= 1.5})
    if by_ctx.get(2048, {}).get("speedup"):
        speedup = by_ctx[2048]["speedup"]
        out.append({"name": "speed-up over naive at 2048", "value": speedup, "target": ">= 20", "ok": speedup >= 20})
    tp = {(r["streams"], r["chunk"]): r["tokens_per_s"] for r in tp_rows}
    if (1, 1) in tp and (16, 1) in tp:
        gain = tp[(16, 1)] / tp[(1, 1)]
        out.append(
            {"name": "16 streams / 1 stream tokens/s (chunk 1)", "value": gain, "target": ">= 6", "ok": gain >= 6}
        )
    return out


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo", help=f"demo, a random shape ({', '.join(SHAPES)}), or a directory")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--contexts", default="128,256,512,1024,2048,4096")
    p.add_argument("--naive-contexts", default=None, help="contexts for the naive approach (default: --contexts)")
    p.add_argument("--tokens", type=int, default=64, help="tokens timed per context (ours)")
    p.add_argument("--naive-reps", type=int, default=5)
    p.add_argument("--streams", default="1,4,16,64")
    p.add_argument("--chunks", default="1,8,32")
    p.add_argument("--tokens-per-stream", type=int, default=64)
    p.add_argument("--prompt", type=int, default=64, help="prompt tokens per stream in the throughput runs")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--json", default=None, help="write the results here")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    rng = random.Random(0)
    path = model_path(args.model)
    guard = load_stream_guard(path, device=args.device, dtype=parse_dtype(args.dtype))
    cfg = guard.config
    contexts = parse_ints(args.contexts)
    naive_contexts = parse_ints(args.naive_contexts) if args.naive_contexts else contexts
    meta = {
        "model": args.model,
        "path": str(path),
        "layers": cfg.num_hidden_layers,
        "hidden": cfg.hidden_size,
        "device": args.device,
        "dtype": args.dtype,
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "date": time.strftime("%Y-%m-%d %H:%M"),
    }
    print(
        f"# {args.model}: {cfg.num_hidden_layers} layers, hidden {cfg.hidden_size}, {args.device} {args.dtype}, "
        f"torch {torch.__version__}, {torch.get_num_threads()} threads"
    )

    engine = StreamEngine(guard, EngineLimits(max_sessions=4, max_tokens_per_session=max(contexts) + args.tokens + 8))
    print("\n## Per-token cost against context length (chunk size 1, one stream)")
    print(f"{'context':>8} {'ours ms/token':>14} {'naive ms/token':>15} {'speed-up':>9}")
    context_rows = []
    try:
        # Engine runs first, the naive runs last: torch's thread pool of the calling thread keeps
        # spinning after a large forward, which would slow the engine thread measured next.
        ours = {c: per_token_ours(engine, c, args.tokens, rng) for c in contexts}
    finally:
        engine.shutdown()
    tp_rows = [
        throughput(guard, n, chunk, max(chunk, args.tokens_per_stream), args.prompt, rng)
        for chunk in parse_ints(args.chunks)
        for n in parse_ints(args.streams)
    ]
    naive = {c: per_token_naive(guard, c, args.naive_reps, rng) for c in naive_contexts}
    for c in contexts:
        n = naive.get(c)
        context_rows.append(
            {
                "context": c,
                "ours_ms": ours[c] * 1e3,
                "naive_ms": n * 1e3 if n else None,
                "speedup": n / ours[c] if n else None,
            }
        )
        print(
            f"{c:>8} {ours[c] * 1e3:>14.3f} {n * 1e3 if n else float('nan'):>15.3f} "
            f"{n / ours[c] if n else float('nan'):>8.1f}x"
        )
    base = context_rows[0]["ours_ms"]
    for row in context_rows:
        row["ratio_to_first"] = row["ours_ms"] / base
    print(f"flatness: per-token cost at {contexts[-1]} / at {contexts[0]} = {context_rows[-1]['ratio_to_first']:.2f}x")

    print(
        "\n## Aggregate throughput, concurrent streams (prompt "
        f"{args.prompt} tokens, {args.tokens_per_stream} response tokens per stream)"
    )
    print(f"{'streams':>8} {'chunk':>6} {'tokens/s':>10} {'vs 1 stream':>12} {'rows/step':>10} {'p50 chunk ms':>13}")
    single: dict[int, float] = {}
    for r in tp_rows:
        single.setdefault(r["chunk"], r["tokens_per_s"])  # the first (fewest) streams of each chunk size
        r["vs_one_stream"] = r["tokens_per_s"] / single[r["chunk"]]
        n, chunk = r["streams"], r["chunk"]
        print(
            f"{n:>8} {chunk:>6} {r['tokens_per_s']:>10.0f} {r['vs_one_stream']:>11.1f}x "
            f"{r['mean_rows_per_step']:>10.1f} {r['p50_chunk_ms']:>13.2f}"
        )
    targets = check_targets(context_rows, tp_rows)
    if targets:
        print("\n## Targets (issue 2)")
        for t in targets:
            print(f"{'PASS' if t['ok'] else 'MISS'}  {t['name']}: {t['value']:.2f} (target {t['target']})")
    result = {"meta": meta, "context": context_rows, "throughput": tp_rows, "targets": targets}
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"\nwrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
