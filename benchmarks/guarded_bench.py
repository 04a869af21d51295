"""GuardedGeneration against a direct vLLM stream, in the same run: the latency each chunk gains
by going through the sidecar, and how many tokens vLLM generates after an interrupt.

Starts a real vLLM (the tests' cached environment and tiny model) and the sidecar with the demo
guard. Usage:  python benchmarks/guarded_bench.py [--adapter http|grpc] [--tokens 64] [--runs 5] [--json PATH]

With ``--adapter grpc`` the upstream is vLLM's gRPC server (VllmEngine), the direct stream is a
VllmEngine.Generate call, and the tokens after the interrupt are those the sidecar still received
before vLLM's abort landed (that server exports no token counter).
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
from vllm_runtime import running_vllm_grpc, running_vllm_http, tiny_upstream_model, vllm_metric  # noqa: E402

from guard.demo.stream_model import demo_checkpoint_dir  # noqa: E402
from guard.text.conversation import GuardTokenizer, Message  # noqa: E402
from server.qwen3guard.v1 import guard_pb2 as pb  # noqa: E402
from server.qwen3guard.v1 import guard_pb2_grpc as pb_grpc  # noqa: E402

PROMPT = [{"role": "user", "content": "Explain how a bicycle gear works."}]


async def direct_http(url: str, prompt_ids: list[int], tokens: int) -> list[float]:
    """Arrival time of each token of a direct vLLM stream, from the request's start (seconds)."""
    arrivals, start = [], time.perf_counter()
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
                ids = json.loads(line[len("data: ") :])["choices"][0].get("token_ids") or []
                arrivals += [time.perf_counter() - start] * len(ids)
    return arrivals


async def direct_grpc(target: str, prompt_ids: list[int], tokens: int) -> list[float]:
    """Arrival time of each token of a direct VllmEngine.Generate stream, from its start."""
    from smg_grpc_proto import vllm_engine_pb2 as vpb
    from smg_grpc_proto import vllm_engine_pb2_grpc as vrpc

    arrivals, start = [], time.perf_counter()
    async with grpc.aio.insecure_channel(target) as channel:
        call = vrpc.VllmEngineStub(channel).Generate(
            vpb.GenerateRequest(
                request_id=f"direct-{time.monotonic_ns()}",
                tokenized=vpb.TokenizedInput(input_ids=prompt_ids),
                sampling_params=vpb.SamplingParams(temperature=0, max_tokens=tokens, n=1),
                stream=True,
            )
        )
        async for response in call:
            if response.WhichOneof("response") == "chunk":
                arrivals += [time.perf_counter() - start] * len(response.chunk.token_ids)
    return arrivals


async def guarded(address: str, tokens: int, domain: str) -> tuple[list[float], pb.GenerationEnd]:
    """Arrival time of each released token through GuardedGeneration, and its end message."""
    arrivals, end, start = [], None, time.perf_counter()
    async with grpc.aio.insecure_channel(address) as channel:
        call = pb_grpc.GuardedGenerationStub(channel).Generate(
            pb.GenerateRequest(
                domain=domain,
                messages=[pb.ChatMessage(**m) for m in PROMPT],
                sampling=pb.SamplingParams(max_tokens=tokens),
            )
        )
        async for response in call:
            if response.WhichOneof("kind") == "chunk":
                arrivals += [time.perf_counter() - start] * len(response.chunk.token_ids)
            elif response.WhichOneof("kind") == "end":
                end = response.end
    return arrivals, end


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
    grpc_adapter = args.adapter == "grpc"
    with (
        (running_vllm_grpc if grpc_adapter else running_vllm_http)(model) as upstream,
        running_sidecar(
            model=str(demo_checkpoint_dir()),
            policies=str(policies),
            judge="",
            **({"upstream_grpc": upstream} if grpc_adapter else {"upstream_url": upstream}),
        ) as sidecar,
    ):
        direct_stream = direct_grpc if grpc_adapter else direct_http
        await direct_stream(upstream, prompt_ids, 8)  # warm-up; for the sidecar also its one-time
        await guarded(sidecar.address, 8, "permissive")  # tokenizer probe (gRPC: GetTokenizer's bundle)
        added, direct_per_token, guarded_per_token = [], [], []
        ttft: dict[str, list[float]] = {"direct": [], "guarded": []}  # first token (the prompt check is before it)
        steady: dict[str, list[float]] = {"direct": [], "guarded": []}  # ms / token after the first
        for _ in range(args.runs):  # interleaved, so both see the same machine load
            d_arrivals = await direct_stream(upstream, prompt_ids, args.tokens)
            g_arrivals = (await guarded(sidecar.address, args.tokens, "permissive"))[0]
            assert len(d_arrivals) == len(g_arrivals) == args.tokens, (len(d_arrivals), len(g_arrivals))
            added += [g - d for g, d in zip(g_arrivals, d_arrivals, strict=True)]  # same token, both paths
            direct_per_token.append(d_arrivals[-1] / args.tokens)
            guarded_per_token.append(g_arrivals[-1] / args.tokens)
            ttft["direct"].append(d_arrivals[0])
            ttft["guarded"].append(g_arrivals[0])
            steady["direct"].append((d_arrivals[-1] - d_arrivals[0]) / (args.tokens - 1))
            steady["guarded"].append((g_arrivals[-1] - g_arrivals[0]) / (args.tokens - 1))
        after = []
        for _ in range(args.runs):
            if grpc_adapter:
                _, end = await guarded(sidecar.address, 1000, "always_interrupt")
                after.append(end.tokens_after_interrupt)
                continue
            before = vllm_metric(upstream, "vllm:generation_tokens_total")
            _, end = await guarded(sidecar.address, 1000, "always_interrupt")
            while vllm_metric(upstream, "vllm:num_requests_running"):
                await asyncio.sleep(0.1)
            generated = vllm_metric(upstream, "vllm:generation_tokens_total") - before
            after.append(generated - (end.offset + 1))
    d, g = statistics.median(direct_per_token) * 1e3, statistics.median(guarded_per_token) * 1e3
    added_sorted = sorted(added)
    result = {
        "direct_ms_per_token": d,
        "guarded_ms_per_token": g,
        "ratio": g / d,
        "added_p50_ms": statistics.median(added) * 1e3,
        "added_p99_ms": added_sorted[int(0.99 * (len(added_sorted) - 1))] * 1e3,
        "direct_ttft_ms": statistics.median(ttft["direct"]) * 1e3,
        "guarded_ttft_ms": statistics.median(ttft["guarded"]) * 1e3,
        "direct_steady_ms_per_token": statistics.median(steady["direct"]) * 1e3,
        "guarded_steady_ms_per_token": statistics.median(steady["guarded"]) * 1e3,
        "tokens_after_interrupt": after,
        "adapter": args.adapter,
        "runs": args.runs,
        "tokens": args.tokens,
    }
    print(f"# {args.adapter}: {args.runs} runs x {args.tokens} tokens (vLLM on CPU, tiny Qwen3; demo guard)")
    print(f"{'path':<18} {'first token ms':>15} {'ms/token after it':>18} {'ms/token overall':>17}")
    for label, key, overall in (("direct vLLM", "direct", d), ("GuardedGeneration", "guarded", g)):
        first, then = result[f"{key}_ttft_ms"], result[f"{key}_steady_ms_per_token"]
        print(f"{label:<18} {first:>15.2f} {then:>18.2f} {overall:>17.2f}")
    print(
        f"ratio {g / d:.2f}x; each token arrives {result['added_p50_ms']:.2f} ms later at p50, "
        f"{result['added_p99_ms']:.2f} ms at p99; tokens generated after the interrupt: {after}"
    )
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", choices=("http", "grpc"), default="http")
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
