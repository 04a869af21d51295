"""ParScale decoding cost against P: tokens/s and KV bytes per request at P = 1, 2, 4, 8, batch 1
and 8, through the serving engine (one batched forward per step, KV slots per stream).

The paper's claim: at batch 1 decoding is memory-bound, so latency grows far less than P (the
P streams share one pass over the weights). The table shows latency(P) / latency(P=1) measured
here, per shape and batch, beside tokens/s, the prefill and KV bytes per request. Shapes: ``demo``
(the tiny demo model's shape) and ``1.8B`` (ParScale-1.8B-P*, 48 prefix tokens, random weights
built in memory; float32 on CPU needs about 8 GB, one model at a time). A step's time is the
decode phase (from the last prefill's return to the end) over its steps; each point is the median
of ``--repeat`` runs. The machine is shared: compare the ratios of one run.

    python benchmarks/parscale_bench.py --shape demo --tokens 16 --repeat 3
    python benchmarks/parscale_bench.py --shape 1.8B --tokens 4 --prompt-tokens 8 --repeat 1
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import time

import torch

from guard.parscale.checkpoint_writer import parscale_config_dict
from guard.parscale.config import ParScaleConfig
from guard.parscale.engine import ParScaleEngine, ParScaleLimits
from guard.parscale.model import ParScaleLM

PS = (1, 2, 4, 8)


async def decode(engine: ParScaleEngine, prompt: list[int], tokens: int) -> tuple[float, float]:
    """Prefill, then ``tokens - 1`` decode steps; when the prefill came back, and when it ended."""
    request = engine.open()
    argmax = lambda logits: int(logits.argmax())  # noqa: E731
    try:
        out = (await asyncio.wrap_future(request.step(prompt, sample=argmax))).value
        prefilled = time.perf_counter()
        for _ in range(tokens - 1):
            out = (await asyncio.wrap_future(request.step([out.next_id], sample=argmax))).value
        return prefilled, time.perf_counter()
    finally:
        request.close()


def measure(model: ParScaleLM, batch: int, prompt_tokens: int, tokens: int) -> dict:
    """One run: ``batch`` requests decoding together. Decode time runs from the last prefill's
    return to the last request's end (prefill is reported apart)."""
    limits = ParScaleLimits(max_requests=batch, max_tokens_per_request=prompt_tokens + tokens, wait_ms=50)
    engine = ParScaleEngine(model, limits)
    try:
        prompts = [[(7 * k + i) % 5000 for i in range(prompt_tokens)] for k in range(batch)]

        async def together() -> list[tuple[float, float]]:
            return await asyncio.gather(*(decode(engine, prompt, tokens) for prompt in prompts))

        started = time.perf_counter()
        marks = asyncio.run(together())
        prefilled, ended = max(m[0] for m in marks), max(m[1] for m in marks)
        steps = engine.stats.steps
        return {
            "prefill_s": prefilled - started,
            "decode_s": ended - prefilled,
            "steps": steps,
            "rows_per_step": engine.stats.rows / max(steps, 1),
        }
    finally:
        engine.close()


def bench_shape(shape: str, batches: list[int], prompt_tokens: int, tokens: int, repeat: int) -> list[dict]:
    """One model at a time (a 1.8B model in float32 is about 7 GB): built, measured at every batch
    size ``repeat`` times (median), freed."""
    rows = []
    for p in PS:
        config = ParScaleConfig.from_dict(parscale_config_dict(shape, parscale_n=p, prefix_tokens=48))
        model = ParScaleLM.random(config, seed=p)
        per_token = config.kv_bytes_per_token(model.model.embed_tokens.weight.element_size())
        measure(model, 1, prompt_tokens, 2)  # warm-up
        for batch in batches:
            runs = [measure(model, batch, prompt_tokens, tokens) for _ in range(repeat)]
            decode_s = statistics.median(r["decode_s"] for r in runs)
            rows.append({
                "shape": shape, "P": p, "batch": batch,
                "step_ms": decode_s / (tokens - 1) * 1e3,
                "tokens_per_s": batch * (tokens - 1) / decode_s,
                "prefill_ms": statistics.median(r["prefill_s"] for r in runs) * 1e3,
                "rows_per_step": statistics.median(r["rows_per_step"] for r in runs),
                "kv_bytes_per_request": per_token * (config.prefix_tokens + prompt_tokens + tokens),
            })  # fmt: skip
        del model
    for r in rows:
        base = next(b for b in rows if b["batch"] == r["batch"] and b["P"] == 1)
        r["latency_ratio"] = r["step_ms"] / base["step_ms"]
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", action="append", choices=["demo", "1.8B"], help="repeatable (default: both)")
    parser.add_argument("--batches", default="1,8")
    parser.add_argument("--prompt-tokens", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=16, help="tokens generated per request (>= 2)")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--threads", type=int, default=0, help="torch intra-op threads (0: torch's default)")
    parser.add_argument("--json", help="write the results here")
    args = parser.parse_args()
    if args.tokens < 2:
        parser.error("--tokens must be at least 2 (one decode step after the prefill)")
    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = args.shape or ["demo", "1.8B"]
    batches = [int(b) for b in args.batches.split(",")]
    rows = []
    for shape in shapes:
        shape_key = "tiny" if shape == "demo" else shape
        for row in bench_shape(shape_key, batches, args.prompt_tokens, args.tokens, args.repeat):
            rows.append(dict(row, shape=shape))
    head = f"{'shape':>6} {'batch':>5} {'P':>2} {'tokens/s':>10} {'ms/step':>9} {'latency/P1':>10} {'prefill ms':>10}"
    print(f"{head} {'KV/request':>12}")
    for r in rows:
        print(
            f"{r['shape']:>6} {r['batch']:>5} {r['P']:>2} {r['tokens_per_s']:>10.1f} {r['step_ms']:>9.2f} "
            f"{r['latency_ratio']:>10.2f} {r['prefill_ms']:>10.1f} {r['kv_bytes_per_request'] / 2**20:>10.2f} MiB"
        )
    if args.json:
        meta = {
            "machine": platform.platform(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "threads": torch.get_num_threads(), "argv": sys.argv[1:],
        }  # fmt: skip
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
