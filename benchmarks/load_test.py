"""Load test: N concurrent Moderate streams against a sidecar over loopback.

Each of N workers runs moderation requests back to back: open (a conversation), send the
response in chunks (each awaited), close. Reports per-chunk latency (p50/p99, write to verdict),
throughput, errors, the engine's own per-chunk time at the same load (queue + compute, from the
responses' timing) and the sidecar overhead = gRPC p50 / engine p50. After the run it checks
through Info that no session is left. Bounded in requests and time; loopback only.

    python benchmarks/load_test.py                      # starts `guard serve` with the demo model
    python benchmarks/load_test.py --address 127.0.0.1:50051 --streams 1,16,64 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import socket
import sys
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc
from processes import guard_command, running

from guard.demo.corpus import SHOWCASE
from guard.runtime import resolve_model
from guard.text.conversation import GuardTokenizer, Message
from server.client import SidecarClient


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


async def worker(
    client: SidecarClient, prompt: str, ids: list[int], chunk: int, requests: int, deadline: float, stats: dict
) -> None:
    for _ in range(requests):
        if time.monotonic() > deadline:
            return
        try:
            async with client.moderate(messages=[{"role": "user", "content": prompt}]) as stream:
                for i in range(0, len(ids), chunk):
                    started = time.perf_counter()
                    response = await stream.send_ids(ids[i : i + chunk])
                    stats["latency"].append(time.perf_counter() - started)
                    timing = response.chunk.timing
                    stats["engine"].append((timing.queue_ms + timing.compute_ms) / 1e3)
                    stats["tokens"] += len(response.chunk.tokens)
                    if stream.interrupted:
                        stats["interrupts"] += 1
                        break
                await stream.close()
                stats["requests"] += 1
        except grpc.aio.AioRpcError as exc:
            stats["errors"].append(exc.code().name)


async def run_level(
    target: str | grpc.aio.Channel,
    streams: int,
    chunk: int,
    requests: int,
    seconds: float,
    prompt: str,
    ids: list[int],
) -> dict:
    """One load level against ``target`` (an address, or a channel: TLS, call credentials)."""
    stats = {"latency": [], "engine": [], "tokens": 0, "requests": 0, "interrupts": 0, "errors": []}
    deadline = time.monotonic() + seconds
    async with SidecarClient(target, timeout=60) as client:
        started = time.perf_counter()
        await asyncio.gather(*(worker(client, prompt, ids, chunk, requests, deadline, stats) for _ in range(streams)))
        elapsed = time.perf_counter() - started
        live = -1
        for _ in range(100):  # sessions close in the handlers' finally; give them a moment
            live = (await client.info()).live_sessions
            if live == 0:
                break
            await asyncio.sleep(0.05)
    p50, engine_p50 = percentile(stats["latency"], 0.5), percentile(stats["engine"], 0.5)
    return {
        "streams": streams,
        "chunk_tokens": chunk,
        "chunks": len(stats["latency"]),
        "requests": stats["requests"],
        "seconds": elapsed,
        "tokens_per_s": stats["tokens"] / elapsed,
        "p50_ms": p50 * 1e3,
        "p99_ms": percentile(stats["latency"], 0.99) * 1e3,
        "engine_p50_ms": engine_p50 * 1e3,
        "overhead": p50 / engine_p50 if engine_p50 else float("nan"),
        "errors": len(stats["errors"]),
        "error_codes": sorted(set(stats["errors"])),
        "interrupts": stats["interrupts"],
        "live_sessions_after": live,
    }


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def wait_serving(address: str, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    async with grpc.aio.insecure_channel(address) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            try:
                if (await stub.Check(health_pb2.HealthCheckRequest(), timeout=2)).status == 1:
                    return
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.2)
    raise TimeoutError(f"{address} did not become SERVING")


async def main_async(args) -> dict:
    address = args.address
    with contextlib.ExitStack() as stack:
        if address is None:
            address = f"127.0.0.1:{free_port()}"
            command = guard_command("serve", "--model", args.model, "--address", address, "--metrics-port", "0",
                                    "--log-level", "WARNING", "--audit-log", "",
                                    "--max-sessions", str(max(args.streams) * 2))  # fmt: skip
            stack.enter_context(running(command, "sidecar"))
        await wait_serving(address)
        async with SidecarClient(address) as client:
            info = await client.info()
        example = SHOWCASE[0]
        tokenizer = GuardTokenizer.from_dir(resolve_model(args.model))
        _, ids = tokenizer.split_response([Message("user", example.prompt), Message("assistant", example.response)])
        rows = []
        print(
            f"# sidecar {address}: model {info.model_name} (demo={info.demo}), {len(ids)} tokens per response, "
            f"chunks of {args.chunk} tokens"
        )
        print(
            f"{'streams':>7} {'chunks':>7} {'p50 ms':>8} {'p99 ms':>8} {'tokens/s':>9} {'engine p50':>11} "
            f"{'overhead':>9} {'errors':>7} {'live after':>10}"
        )
        for n in args.streams:
            row = await run_level(address, n, args.chunk, args.requests, args.seconds, example.prompt, ids)
            rows.append(row)
            print(
                f"{n:>7} {row['chunks']:>7} {row['p50_ms']:>8.2f} {row['p99_ms']:>8.2f} {row['tokens_per_s']:>9.0f} "
                f"{row['engine_p50_ms']:>10.2f}  {row['overhead']:>8.2f}x {row['errors']:>7} "
                f"{row['live_sessions_after']:>10}"
            )
        return {
            "meta": {
                "address": address,
                "model": info.model_name,
                "demo": info.demo,
                "chunk_tokens": args.chunk,
                "requests_per_stream": args.requests,
                "cpu": platform.machine(),
                "cores": os.cpu_count(),
                "date": time.strftime("%Y-%m-%d %H:%M"),
            },
            "levels": rows,
        }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--address", default=None, help="a running sidecar; default: start one with --model")
    p.add_argument("--model", default="demo")
    p.add_argument("--streams", type=lambda s: [int(x) for x in s.split(",")], default=[1, 16, 64])
    p.add_argument("--chunk", type=int, default=4, help="tokens per chunk")
    p.add_argument("--requests", type=int, default=10, help="moderation requests per stream worker")
    p.add_argument("--seconds", type=float, default=60.0, help="time cap per level")
    p.add_argument("--json", default=None)
    args = p.parse_args(argv)
    result = asyncio.run(main_async(args))
    failed = [r for r in result["levels"] if r["errors"] or r["live_sessions_after"] != 0]
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {args.json}")
    if failed:
        print(f"FAILED: errors or leaked sessions at {[r['streams'] for r in failed]} streams", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
