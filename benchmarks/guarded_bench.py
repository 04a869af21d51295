"""GuardedGeneration against a direct vLLM stream, in the same run: the latency each chunk gains
by going through the sidecar, and how many tokens vLLM generates after an interrupt.

Starts a real vLLM (the tests' cached environment and tiny model) and the sidecar with the demo
guard. Usage:
  python benchmarks/guarded_bench.py [--adapter http|grpc|interceptor] [--tokens 64] [--runs 5] [--json PATH]

With ``--adapter grpc`` the upstream is vLLM's gRPC server (VllmEngine), the direct stream is a
VllmEngine.Generate call, and the tokens after the interrupt are those the sidecar still received
before vLLM's abort landed (that server exports no token counter).

With ``--adapter interceptor`` the guarded path is the gateway's instead: the same
VllmEngine.Generate call on a channel with ``GuardInterceptor`` installed (HOLD_BACK), each
response's token ids moderated on the sidecar's Moderate stream. The tokens after the interrupt
are those the vLLM stream still yielded to the gateway's channel past the flagged token (counted
by an interceptor below the guard's) before the cancel landed.
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
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))  # the real-vLLM and sidecar harness the tests use

import grpc  # noqa: E402
import httpx  # noqa: E402
from servers import running_sidecar  # noqa: E402
from vllm_runtime import running_vllm_grpc, running_vllm_http, tiny_upstream_model, vllm_metric  # noqa: E402

from guard.demo.stream_model import demo_checkpoint_dir  # noqa: E402
from guard.text.conversation import GuardTokenizer, Message  # noqa: E402
from server.interceptor import GuardInterceptor, StopInfo  # noqa: E402
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


def vllm_request(prompt_ids: list[int], tokens: int, tag: str) -> Any:
    """The VllmEngine.Generate request both gRPC paths send: greedy, streamed, ``tokens`` at most."""
    from smg_grpc_proto import vllm_engine_pb2 as vpb

    return vpb.GenerateRequest(
        request_id=f"{tag}-{time.monotonic_ns()}",
        tokenized=vpb.TokenizedInput(input_ids=prompt_ids),
        sampling_params=vpb.SamplingParams(temperature=0, max_tokens=tokens, n=1),
        stream=True,
    )


def chunk_ids(response: Any) -> list[int] | None:
    """A VllmEngine response's new token ids; None for the closing ``complete`` (it repeats them all)."""
    return list(response.chunk.token_ids) if response.WhichOneof("response") == "chunk" else None


async def direct_grpc(target: str, prompt_ids: list[int], tokens: int) -> list[float]:
    """Arrival time of each token of a direct VllmEngine.Generate stream, from its start."""
    from smg_grpc_proto import vllm_engine_pb2_grpc as vrpc

    arrivals, start = [], time.perf_counter()
    async with grpc.aio.insecure_channel(target) as channel:
        async for response in vrpc.VllmEngineStub(channel).Generate(vllm_request(prompt_ids, tokens, "direct")):
            arrivals += [time.perf_counter() - start] * len(chunk_ids(response) or ())
    return arrivals


class BackendTokens(grpc.aio.UnaryStreamClientInterceptor):
    """Installed below the guard: counts the token ids vLLM's stream yields to the channel, which
    the guard alone does not expose (what its pump had read ahead is dropped at the interrupt)."""

    def __init__(self) -> None:
        self.count = 0

    async def intercept_unary_stream(self, continuation, client_call_details, request) -> AsyncIterator[Any]:
        call = await continuation(client_call_details, request)

        async def counted() -> AsyncIterator[Any]:
            async for response in call:
                self.count += len(chunk_ids(response) or ())
                yield response

        return counted()  # grpc.aio wraps it; cancel() and status still reach the real call


@dataclass
class Intercepted:
    """One call through the interceptor: what the caller saw, and what vLLM's stream yielded."""

    arrivals: list[float] = field(default_factory=list)  # per released token, seconds from the start
    stop: StopInfo | None = None  # the interceptor's stopped message, if it interrupted
    error: str | None = None  # the status the call raised, if any
    backend_tokens: int = 0


async def intercepted(target: str, sidecar: str, prompt_ids: list[int], tokens: int, domain: str) -> Intercepted:
    """The direct request again, on a gateway channel with GuardInterceptor (HOLD_BACK) installed."""
    from smg_grpc_proto import vllm_engine_pb2_grpc as vrpc

    out, counter, start = Intercepted(), BackendTokens(), time.perf_counter()
    async with grpc.aio.insecure_channel(sidecar) as sidecar_channel:
        guard = GuardInterceptor(
            sidecar_channel,
            conversation=lambda _request: PROMPT,  # the gateway knows the chat it rendered into prompt_ids
            extract=chunk_ids,
            make_stopped=lambda stop: stop,  # the caller tells it apart by type
            release_mode=pb.HOLD_BACK,
            domain=domain,
        )
        async with grpc.aio.insecure_channel(target, interceptors=[*guard.interceptors(), counter]) as channel:
            try:
                async for message in vrpc.VllmEngineStub(channel).Generate(vllm_request(prompt_ids, tokens, "gw")):
                    if isinstance(message, StopInfo):
                        out.stop = message
                    else:
                        out.arrivals += [time.perf_counter() - start] * len(chunk_ids(message) or ())
            except grpc.aio.AioRpcError as exc:
                out.error = f"{exc.code().name}: {exc.details()}"
    out.backend_tokens = counter.count
    return out


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


GuardedPath = Callable[[int, str], Awaitable[list[float]]]  # (max tokens, domain) -> per-token arrivals


def sidecar_upstream(adapter: str, upstream: str) -> dict[str, str]:
    """The sidecar's upstream option: none for the interceptor (the gateway calls vLLM, the sidecar only moderates)."""
    return {"http": {"upstream_url": upstream}, "grpc": {"upstream_grpc": upstream}}.get(adapter, {})


async def interrupts_interceptor(upstream: str, sidecar: str, prompt_ids: list[int], runs: int) -> list[dict]:
    """Interrupted calls through the interceptor: what reached the caller and what vLLM still yielded.
    ``after`` counts the backend's tokens past the flagged one (as GuardedGeneration's
    tokens_after_interrupt does); None if the call was not interrupted."""
    out = []
    for _ in range(runs):
        got = await intercepted(upstream, sidecar, prompt_ids, 1000, "always_interrupt")
        index = got.stop.first_unsafe_index if got.stop else None
        out.append(
            {
                "first_unsafe_index": index,
                "released_tokens": got.stop.released_tokens if got.stop else None,  # the StopInfo's count
                "caller_tokens": len(got.arrivals),  # token ids in the messages the caller received
                "backend_tokens": got.backend_tokens,  # token ids vLLM's stream yielded to the channel
                "after": None if index is None else got.backend_tokens - (index + 1),
                "stop_reason": got.stop.reason if got.stop else None,
                "error": got.error,
            }
        )
    return out


async def main_async(args: argparse.Namespace) -> dict:
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
    adapter = args.adapter
    over_grpc = adapter in ("grpc", "interceptor")
    label = "GuardInterceptor" if adapter == "interceptor" else "GuardedGeneration"
    interrupts: list[dict] = []
    with (
        (running_vllm_grpc if over_grpc else running_vllm_http)(model) as upstream,
        running_sidecar(
            model=str(demo_checkpoint_dir()),
            policies=str(policies),
            judge="",
            **sidecar_upstream(adapter, upstream),
        ) as sidecar,
    ):
        direct_stream = direct_grpc if over_grpc else direct_http

        async def via_sidecar(tokens: int, domain: str) -> list[float]:
            return (await guarded(sidecar.address, tokens, domain))[0]

        async def via_interceptor(tokens: int, domain: str) -> list[float]:
            return (await intercepted(upstream, sidecar.address, prompt_ids, tokens, domain)).arrivals

        guarded_path: GuardedPath = via_interceptor if adapter == "interceptor" else via_sidecar
        await direct_stream(upstream, prompt_ids, 8)  # warm-up; for the sidecar also its one-time
        await guarded_path(8, "permissive")  # tokenizer probe (gRPC: GetTokenizer's bundle)
        added, direct_per_token, guarded_per_token = [], [], []
        ttft: dict[str, list[float]] = {"direct": [], "guarded": []}  # first token (the prompt check is before it)
        steady: dict[str, list[float]] = {"direct": [], "guarded": []}  # ms / token after the first
        for _ in range(args.runs):  # interleaved, so both see the same machine load
            d_arrivals = await direct_stream(upstream, prompt_ids, args.tokens)
            g_arrivals = await guarded_path(args.tokens, "permissive")
            assert len(d_arrivals) == len(g_arrivals) == args.tokens, (len(d_arrivals), len(g_arrivals))
            added += [g - d for g, d in zip(g_arrivals, d_arrivals, strict=True)]  # same token, both paths
            direct_per_token.append(d_arrivals[-1] / args.tokens)
            guarded_per_token.append(g_arrivals[-1] / args.tokens)
            ttft["direct"].append(d_arrivals[0])
            ttft["guarded"].append(g_arrivals[0])
            steady["direct"].append((d_arrivals[-1] - d_arrivals[0]) / (args.tokens - 1))
            steady["guarded"].append((g_arrivals[-1] - g_arrivals[0]) / (args.tokens - 1))
        after: list[int | None] = []
        if adapter == "interceptor":
            interrupts = await interrupts_interceptor(upstream, sidecar.address, prompt_ids, args.runs)
            after = [run["after"] for run in interrupts]
        else:
            for _ in range(args.runs):
                if adapter == "grpc":
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
        "adapter": adapter,
        "guarded_path": label + (" (HOLD_BACK)" if adapter == "interceptor" else ""),
        "runs": args.runs,
        "tokens": args.tokens,
    }
    if interrupts:
        result["interrupts"] = interrupts
    print(f"# {adapter}: {args.runs} runs x {args.tokens} tokens (vLLM on CPU, tiny Qwen3; demo guard)")
    print(f"{'path':<18} {'first token ms':>15} {'ms/token after it':>18} {'ms/token overall':>17}")
    for name, key, overall in (("direct vLLM", "direct", d), (label, "guarded", g)):
        first, then = result[f"{key}_ttft_ms"], result[f"{key}_steady_ms_per_token"]
        print(f"{name:<18} {first:>15.2f} {then:>18.2f} {overall:>17.2f}")
    after_what = (
        "tokens vLLM's stream yielded past the flagged one" if interrupts else "tokens generated after the interrupt"
    )
    print(
        f"ratio {g / d:.2f}x; each token arrives {result['added_p50_ms']:.2f} ms later at p50, "
        f"{result['added_p99_ms']:.2f} ms at p99; {after_what}: {after}"
    )
    for run in interrupts:
        print(
            f"  interrupt at token {run['first_unsafe_index']}: caller got {run['caller_tokens']} tokens "
            f"(StopInfo.released_tokens {run['released_tokens']}), vLLM's stream yielded {run['backend_tokens']}"
            + (f"; error {run['error']}" if run["error"] else "")
        )
    return result


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--adapter", choices=("http", "grpc", "interceptor"), default="http")
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
