"""One stream's Moderate open (the prompt check, before a response's first token can go out),
with the idle KV cache kept (the default) and given back (``--kv-cache-release-idle``).

One client opens streams back to back, each judged and closed before the next, so the engine is
idle between them: the case where a released pool is allocated again on the way in. Both
variants run in the same sitting, alternating sidecar processes round by round, and are
compared as ratios.

    python benchmarks/open_bench.py                   # 3 rounds x 40 opens per variant, demo model
    python benchmarks/open_bench.py --rounds 5 --opens 60 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import time

from load_test import free_port, wait_serving
from processes import guard_command, running

from server.client import SidecarClient

VARIANTS = {"kept": [], "released": ["--kv-cache-release-idle"]}


async def opens(address: str, count: int) -> list[float]:
    """Milliseconds from writing `open` to reading the prompt verdict, one stream at a time."""
    out = []
    async with SidecarClient(address) as client:
        for i in range(count):
            started = time.perf_counter()
            async with client.moderate(messages=[{"role": "user", "content": f"How do I bake bread? ({i})"}]) as s:
                out.append((time.perf_counter() - started) * 1e3)
                await s.send_text("Mix flour, water, salt and yeast.")
                await s.close()
    return out


def run_variant(model: str, extra: list[str], count: int) -> list[float]:
    port = free_port()
    args = ["serve", "--model", model, "--judge", "", "--address", f"127.0.0.1:{port}", "--metrics-port", "0"]
    with running(guard_command(*args, "--audit-log", "", *extra), "sidecar", quiet=True):
        asyncio.run(wait_serving(f"127.0.0.1:{port}"))
        asyncio.run(opens(f"127.0.0.1:{port}", 5))  # warm-up: first calls, lazy imports
        return asyncio.run(opens(f"127.0.0.1:{port}", count))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", default="demo")
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--opens", type=int, default=40, help="opens per variant per round")
    p.add_argument("--json", default=None)
    args = p.parse_args()
    samples: dict[str, list[float]] = {name: [] for name in VARIANTS}
    for round_ in range(args.rounds):
        for name, extra in VARIANTS.items():
            got = run_variant(args.model, extra, args.opens)
            samples[name] += got
            print(f"# round {round_ + 1} {name}: p50 {statistics.median(got):.2f} ms", file=sys.stderr)
    rows = {}
    for name, values in samples.items():
        deciles = statistics.quantiles(values, n=10)
        rows[name] = {"n": len(values), "p50_ms": statistics.median(values), "p90_ms": deciles[-1]}
    base = rows["released"]
    print(f"{'idle KV cache':<14} {'n':>5} {'open p50 ms':>12} {'open p90 ms':>12} {'p50 x':>7} {'p90 x':>7}")
    for name, row in rows.items():
        row["p50_ratio"] = row["p50_ms"] / base["p50_ms"]
        row["p90_ratio"] = row["p90_ms"] / base["p90_ms"]
        print(f"{name:<14} {row['n']:>5} {row['p50_ms']:>12.2f} {row['p90_ms']:>12.2f} "
              f"{row['p50_ratio']:>7.2f} {row['p90_ratio']:>7.2f}")  # fmt: skip
    if args.json:
        meta = {"machine": platform.processor() or platform.machine(), "python": platform.python_version()}
        with open(args.json, "w") as f:
            json.dump({"meta": meta, "args": vars(args), "results": rows}, f, indent=2)
    return 0


if __name__ == "__main__":
    sys.exit(main())
