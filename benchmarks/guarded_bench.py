"""GuardedGeneration against a direct vLLM stream, in the same run: the latency each chunk gains
by going through the sidecar, and how many tokens vLLM generates after an interrupt.

Starts a real vLLM (the tests' cached environment and tiny model) and the sidecar with the demo
guard. Usage:  python benchmarks/guarded_bench.py [--tokens 64] [--runs 5] [--json PATH]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the real-vLLM and sidecar harness the tests use

import grpc  # noqa: E402
import httpx  # noqa: E402
from servers import running_sidecar  # noqa: E402
from vllm_runtime import running_vllm_http, tiny_upstream_model, vllm_metric  # noqa: E402

from guard.conversation import GuardTokenizer, Message  # noqa: E402
from guard.demo import demo_checkpoint_dir  # noqa: E402
from server.qwen3guard.v1 import guard_pb2 as pb  # noqa: E402
from server.qwen3guard.v1 import guard_pb2_grpc as pb_grpc  # noqa: E402

PROMPT = [{"role": "user", "content": "Explain how a bicycle gear works."}]


async def direct_gaps(url: str, prompt_ids: list[int], tokens: int) -> list[float]:
    """Seconds between consecutive token deltas of a direct vLLM stream."""
    gaps, last = [], None
    body = {
        "model": "tiny-qwen3",
        "prompt": prompt_ids,
        "max_tokens": tokens,
        "temperature": 0,
        "stream": True,
        "return_token_ids": True,
    }
    async with (
        httpx.AsyncClient(timeout=60) as client,
        client.stream("POST", url + "/v1/completions", json=body) as response,
    ):
        async for line in response.aiter_lines():
            if line.startswith("data: {"):
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now
    return gaps


async def guarded_gaps(address: str, tokens: int, domain: str) -> tuple[list[float], pb.GenerationEnd]:
    gaps, last, end = [], None, None
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.GuardedGenerationStub(channel).Generate(
            pb.GenerateRequest(
                domain=domain,
                messages=[pb.ChatMessage(**m) for m in PROMPT],
                sampling=pb.SamplingParams(max_tokens=tokens),
            )
        )
        async for response in call:
            if response.WhichOneof("kind") == "chunk" and response.chunk.token_ids:
                now = time.perf_counter()
                if last is not None:
                    gaps.append(now - last)
                last = now
            elif response.WhichOneof("kind") == "end":
                end = response.end
    return gaps, end


async def main_async(args) -> dict:
    policies = Path(tempfile.mkdtemp()) / "policies"
    shutil.copytree(REPO / "policies", policies)
    (policies / "permissive.yaml").write_text("extends: default\nthresholds:\n  unsafe: 1.0\n")
    (policies / "always_interrupt.yaml").write_text(
        "extends: default\nthresholds:\n  unsafe: 0.0\nprompt:\n  unsafe: ALLOW\n"
    )
    model = tiny_upstream_model()
    tokenizer = GuardTokenizer.from_dir(model)
    rendered = tokenizer.render_prompt([Message(**m) for m in PROMPT])
    prompt_ids = [*rendered.prompt_ids, *rendered.preamble_ids]
    with (
        running_vllm_http(model) as url,
        running_sidecar(
            model=str(demo_checkpoint_dir()), policies=str(policies), upstream_url=url, judge=""
        ) as sidecar,
    ):
        await direct_gaps(url, prompt_ids, 8)  # warm-up
        direct, guarded = [], []
        for _ in range(args.runs):  # interleaved, so both see the same machine load
            direct += await direct_gaps(url, prompt_ids, args.tokens)
            guarded += (await guarded_gaps(sidecar.address, args.tokens, "permissive"))[0]
        after = []
        for _ in range(args.runs):
            before = vllm_metric(url, "vllm:generation_tokens_total")
            _, end = await guarded_gaps(sidecar.address, 1000, "always_interrupt")
            while vllm_metric(url, "vllm:num_requests_running"):
                await asyncio.sleep(0.1)
            generated = vllm_metric(url, "vllm:generation_tokens_total") - before
            after.append(generated - (end.offset + 1))
    d, g = statistics.median(direct) * 1e3, statistics.median(guarded) * 1e3
    result = {
        "direct_p50_ms": d,
        "guarded_p50_ms": g,
        "added_p50_ms": g - d,
        "ratio": g / d,
        "direct_p99_ms": sorted(direct)[int(0.99 * len(direct))] * 1e3,
        "guarded_p99_ms": sorted(guarded)[int(0.99 * len(guarded))] * 1e3,
        "tokens_after_interrupt": after,
        "runs": args.runs,
        "tokens": args.tokens,
    }
    print(f"# {args.runs} runs x {args.tokens} tokens, chunks of 1 token (vLLM on CPU, tiny Qwen3; demo guard)")
    print(f"{'path':<18} {'p50 ms/chunk':>13} {'p99 ms/chunk':>13}")
    print(f"{'direct vLLM':<18} {d:>13.2f} {result['direct_p99_ms']:>13.2f}")
    print(f"{'GuardedGeneration':<18} {g:>13.2f} {result['guarded_p99_ms']:>13.2f}")
    print(f"added per chunk: {g - d:.2f} ms ({g / d:.2f}x); tokens generated after the interrupt: {after}")
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tokens", type=int, default=64)
    p.add_argument("--runs", type=int, default=5)
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    result = asyncio.run(main_async(args))
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
