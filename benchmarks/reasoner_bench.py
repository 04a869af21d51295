"""The Reasoner's local backend: what steering costs per token, and how the memory agent's wall
time grows with the document.

1. **Steered vs unsteered** (``LocalCausalLM.generate``, greedy, in process): the same prompt
   decoded N tokens without steering and with a steer covering every response token (the hook
   adds alpha * f at each position), runs interleaved (A B A B ...) so machine noise hits both
   alike; the ratio of per-token medians is the steering cost. Target (issue 12): under 5%.
   ``--shape demo`` (the demo reasoner) and ``--shape 0.6B`` (a random Qwen3 of the 0.6B shape,
   written to a temporary directory).
2. **Memory agent vs document length**: the demo reasoner reads documents of 1, 2, 4, 8, 16
   chunks (``--chunk-tokens``), each call bounded to ``--memory-tokens`` of memory; wall time
   per document and per chunk (linear: the per-chunk time stays flat).

    python benchmarks/reasoner_bench.py --json benchmarks/results/reasoner-cpu.json
    python benchmarks/reasoner_bench.py --shape 0.6B --only steering --tokens 16 --repeat 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from guard.demo.reasoner_model import DEMO_SAE_LAYER, SHOWCASE, demo_reasoner_dir, render_prompt
from guard.reasoning.local_lm import LocalCausalLM
from guard.reasoning.memory_agent import MemoryAgent, MemoryAgentConfig, MemoryTemplates, Ready
from guard.reasoning.steering import Steer, SteerLimits

FILLER = (
    "The harbour archive lists crates of apples, pears and plums delivered each day, with the ship, "
    "the captain and the weather noted beside every entry. "
)


def steering_levels(path: Path, layer: int, tokens: int, repeat: int) -> dict:
    lm = LocalCausalLM(path)
    prompt = lm.tokenizer.encode(render_prompt(lm.tokenizer, SHOWCASE[0][0], thinking=True), add_special_tokens=False)
    hidden = int(lm.config.hidden_size)
    direction = torch.randn(hidden, generator=torch.Generator().manual_seed(0))
    direction = direction / direction.norm()
    steer = Steer(direction, 4.0, 0, tokens)
    limits = SteerLimits(max_alpha=100.0, max_tokens=max(tokens, 1))

    def run(steered: bool) -> float:
        started = time.perf_counter()
        produced = sum(
            1
            for _ in lm.generate(
                prompt, max_tokens=tokens, steers=[steer] if steered else (), layer=layer if steered else None,
                limits=limits,
            )
        )  # fmt: skip
        return (time.perf_counter() - started) / produced

    run(False), run(True)  # warm-up
    plain, steered = [], []
    for _ in range(repeat):
        plain.append(run(False))
        steered.append(run(True))
    p, s = statistics.median(plain), statistics.median(steered)
    hook_s = hook_seconds(lm, layer, steer, limits)
    return {
        "model": path.name,
        "hidden": hidden,
        "layers": int(lm.config.num_hidden_layers),
        "tokens": tokens,
        "plain_ms_per_token": p * 1e3,
        "steered_ms_per_token": s * 1e3,
        "plain_tok_s": 1 / p,
        "steered_tok_s": 1 / s,
        "cost": s / p - 1,
        "hook_us": hook_s * 1e6,
        "hook_share": hook_s / p,
    }


def hook_seconds(lm: LocalCausalLM, layer: int, steer: Steer, limits: SteerLimits, calls: int = 2000) -> float:
    """The steering hook's own time for one decode step (its layer's output for one token, inside
    the steered span): what steering adds per token, free of the machine's noise on whole runs."""
    from guard.reasoning.steering import SteeringHook

    hidden = torch.randn(1, 1, int(lm.config.hidden_size))
    positions = torch.tensor([[10]])
    with SteeringHook(lm.model, layer, prompt_len=0, steers=[steer], limits=limits) as hook:
        for _ in range(100):
            hook._hook(None, (), {"position_ids": positions}, hidden)
        started = time.perf_counter()
        for _ in range(calls):
            hook._hook(None, (), {"position_ids": positions}, hidden)
        return (time.perf_counter() - started) / calls


def memory_levels(chunk_tokens: int, memory_tokens: int, counts: list[int]) -> list[dict]:
    path = demo_reasoner_dir()
    lm = LocalCausalLM(path)
    config = MemoryAgentConfig(chunk_tokens=chunk_tokens, memory_tokens=memory_tokens, answer_thinking=False)
    agent = MemoryAgent(lm.tokenizer, config, MemoryTemplates.from_model_dir(path))
    filler_ids = lm.tokenizer.encode(FILLER, add_special_tokens=False)

    async def complete(prompt_ids: list[int]) -> str:
        ids = list(lm.generate(prompt_ids, max_tokens=memory_tokens, stop_ids=lm.stop_ids))
        return lm.tokenizer.decode(ids)

    async def read(document: str) -> int:
        calls = 0
        async for event in agent.run("How many crates of plums arrived?", document, complete):
            if not isinstance(event, Ready):
                calls += 1
        return calls

    rows = []
    for count in counts:
        document = lm.tokenizer.decode(
            (filler_ids * (count * chunk_tokens // len(filler_ids) + 1))[: count * chunk_tokens]
        )
        started = time.perf_counter()
        calls = asyncio.run(read(document))
        seconds = time.perf_counter() - started
        rows.append(
            {
                "chunks": calls,
                "document_tokens": len(agent.encode(document)),
                "seconds": seconds,
                "ms_per_chunk": seconds * 1e3 / calls,
            }
        )
    return rows


def table(title: str, rows: list[dict], columns: list[tuple[str, str, str]]) -> None:
    print(f"\n## {title}")
    print("  ".join(f"{head:>{len(head) + 2}}" for head, _, _ in columns))
    for row in rows:
        print("  ".join(f"{format(row[key], fmt):>{len(head) + 2}}" for head, key, fmt in columns))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["demo", "0.6B"], action="append", help="steering models (default: demo)")
    p.add_argument("--only", choices=["steering", "memory"], action="append")
    p.add_argument("--tokens", type=int, default=64, help="tokens decoded per steering run")
    p.add_argument("--repeat", type=int, default=7)
    p.add_argument("--chunk-tokens", type=int, default=256)
    p.add_argument("--memory-tokens", type=int, default=32)
    p.add_argument("--chunks", default="1,2,4,8,16")
    p.add_argument("--json", help="write the results here")
    args = p.parse_args(argv)
    parts = set(args.only or ["steering", "memory"])
    torch.set_num_threads(max(1, torch.get_num_threads()))
    meta = {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cores": os.cpu_count(),
        "cpu": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
    }
    print(f"# {meta}")
    results: dict = {"meta": meta}
    if "steering" in parts:
        rows = []
        for shape in args.shape or ["demo"]:
            if shape == "demo":
                rows.append(steering_levels(demo_reasoner_dir(), DEMO_SAE_LAYER, args.tokens, args.repeat))
                continue
            from guard.retrieval.checkpoint_writer import write_reranker_checkpoint

            with tempfile.TemporaryDirectory(prefix="reasoner-0.6B-") as tmp:
                path = write_reranker_checkpoint(Path(tmp) / "qwen3-0.6B-shape", shape="0.6B")
                rows.append(steering_levels(path, 14, args.tokens, args.repeat))
        results["steering"] = rows
        table("steered vs unsteered greedy decoding (one steer over every token)", rows, [
            ("model", "model", "s"), ("hidden", "hidden", "d"), ("tokens", "tokens", "d"),
            ("plain ms/tok", "plain_ms_per_token", ".2f"), ("steered ms/tok", "steered_ms_per_token", ".2f"),
            ("plain tok/s", "plain_tok_s", ",.1f"), ("cost (runs)", "cost", "+.1%"), ("hook us", "hook_us", ".1f"),
            ("hook share", "hook_share", ".2%")])  # fmt: skip
        for row in rows:
            verdict = "met" if row["hook_share"] < 0.05 else "NOT met"
            print(
                f"target {row['model']}: steering costs < 5% per token: the hook adds {row['hook_share']:.2%} "
                f"({verdict}); whole runs differ by {row['cost']:+.1%} (includes this machine's noise)"
            )
    if "memory" in parts:
        counts = [int(c) for c in args.chunks.split(",")]
        rows = memory_levels(args.chunk_tokens, args.memory_tokens, counts)
        results["memory"] = rows
        table(f"memory agent, {args.chunk_tokens}-token chunks, memory <= {args.memory_tokens} tokens", rows, [
            ("chunks", "chunks", "d"), ("doc tokens", "document_tokens", ",d"), ("seconds", "seconds", ".2f"),
            ("ms/chunk", "ms_per_chunk", ".1f")])  # fmt: skip
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2, default=str) + "\n")
        print(f"wrote {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
