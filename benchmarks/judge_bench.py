"""Generative judge: greedy generation vs scored mode (probabilities from the logits), batched.

python benchmarks/judge_bench.py [--model demo|DIR] [--requests 64] [--json PATH]
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

from guard.demo.judge_model import demo_judge_dir, judge_examples
from guard.judge.local import LocalJudge


def run(judge: LocalJudge, conversations: list, scored: bool) -> dict:
    started = time.perf_counter()
    futures = [judge.classify(m, scored=scored) for m in conversations]
    results = [f.result() for f in futures]
    elapsed = time.perf_counter() - started
    return {
        "mode": "scored" if scored else "generate",
        "requests": len(results),
        "seconds": elapsed,
        "requests_per_s": len(results) / elapsed,
        "p50_inference_ms": 1e3 * statistics.median(r.inference_s for r in results),
        "answers": [r.raw_text for r in results],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="demo")
    p.add_argument("--requests", type=int, default=64)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    judge = LocalJudge(demo_judge_dir() if args.model == "demo" else args.model, max_batch=args.max_batch)
    conversations = [m for m, _ in judge_examples(args.requests, seed=4242)]
    try:
        run(judge, conversations[:8], False)  # warm-up
        rows = [run(judge, conversations, scored) for scored in (False, True)]
    finally:
        judge.close()
    agree = sum(
        a.splitlines()[0] == b.splitlines()[0] for a, b in zip(rows[0]["answers"], rows[1]["answers"], strict=True)
    )
    print(f"# judge {args.model}, {args.requests} concurrent requests, batches of {args.max_batch}")
    print(f"{'mode':<9} {'req/s':>7} {'p50 batch ms':>13}")
    for r in rows:
        print(f"{r['mode']:<9} {r['requests_per_s']:>7.1f} {r['p50_inference_ms']:>13.1f}")
    print(
        f"scored / generate throughput: {rows[1]['requests_per_s'] / rows[0]['requests_per_s']:.1f}x; "
        f"same Safety line in {agree}/{args.requests}"
    )
    if args.json:
        for r in rows:
            r.pop("answers")
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"rows": rows, "agree": agree}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
