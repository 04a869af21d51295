"""Soak: a `guard serve` process under mixed, misbehaving load for a long time (10 minutes by
default), sampling its memory and open sessions, to show that nothing accumulates.

    .venv/bin/python benchmarks/soak.py [--minutes 10] [--streams 16] [--sample-s 15] [--json PATH]

Each worker loops over a mix of showcase conversations (safe ones streamed to the end, unsafe
ones interrupted by the policy), streams abandoned mid-way (the client cancels), and requests
naming an unknown domain (refused). Every ``--sample-s`` seconds it
prints the server's RSS (from /proc), live sessions and KV-cache bytes (Info), and the number of
calls done. At the end the load stops, and live sessions must return to 0; RSS growth is
reported from the first sample after warm-up (first minute) to the last. Exit 1 on a leak or
an unexpected error.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import grpc  # noqa: E402
from load_test import free_port, wait_serving  # noqa: E402
from processes import guard_command, running  # noqa: E402

from guard.demo.corpus import SHOWCASE  # noqa: E402
from server.qwen3guard.v1 import guard_pb2 as pb  # noqa: E402
from server.qwen3guard.v1 import guard_pb2_grpc as pb_grpc  # noqa: E402

EXPECTED = {"OK", "INVALID_ARGUMENT", "CANCELLED"}  # what the mix provokes on purpose


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def one_call(stub: pb_grpc.StreamGuardStub, kind: str, rng: random.Random) -> str:
    example = SHOWCASE[rng.randrange(len(SHOWCASE))]
    domain = "no-such-domain" if kind == "refused" else "default"
    call = stub.Moderate(timeout=60)
    try:
        await call.write(pb.ModerateRequest(open=pb.OpenRequest(
            domain=domain, messages=[pb.ChatMessage(role="user", content=example.prompt)])))  # fmt: skip
        if (await call.read()) is grpc.aio.EOF:
            return (await call.code()).name
        text = example.response
        pieces = [text[i : i + 12] for i in range(0, len(text), 12)]
        for index, piece in enumerate(pieces):
            if kind == "abandoned" and index == len(pieces) // 2:
                call.cancel()
                return "CANCELLED"
            await call.write(pb.ModerateRequest(chunk=pb.ChunkRequest(text=piece)))
            reply = await call.read()
            if reply is grpc.aio.EOF or (reply.WhichOneof("kind") == "final"):
                break
        else:
            await call.write(pb.ModerateRequest(close=pb.CloseRequest()))
        while await call.read() is not grpc.aio.EOF:
            pass
        return (await call.code()).name
    except grpc.aio.AioRpcError as exc:
        return exc.code().name


async def worker(address: str, stop: asyncio.Event, counts: dict, seed: int) -> None:
    rng = random.Random(seed)
    kinds = ("complete", "complete", "complete", "abandoned", "refused")
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.StreamGuardStub(channel)
        while not stop.is_set():
            code = await one_call(stub, rng.choice(kinds), rng)
            counts[code] = counts.get(code, 0) + 1


async def soak(args, process: subprocess.Popen, address: str) -> dict:
    stop = asyncio.Event()
    counts: dict[str, int] = {}
    workers = [asyncio.create_task(worker(address, stop, counts, seed)) for seed in range(args.streams)]
    samples = []
    started = time.monotonic()
    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.StreamGuardStub(channel)
        print(f"{'t (s)':>7} {'RSS MiB':>8} {'live':>5} {'KV MiB':>7} {'calls':>7}")
        while time.monotonic() - started < args.minutes * 60:
            await asyncio.sleep(args.sample_s)
            info = await stub.Info(pb.InfoRequest(), timeout=10)
            sample = {"t": round(time.monotonic() - started, 1), "rss_mib": rss_mib(process.pid),
                      "live_sessions": info.live_sessions, "kv_cache_mib": info.kv_cache_bytes / 2**20,
                      "calls": sum(counts.values())}  # fmt: skip
            samples.append(sample)
            print(f"{sample['t']:>7.0f} {sample['rss_mib']:>8.1f} {sample['live_sessions']:>5} "
                  f"{sample['kv_cache_mib']:>7.2f} {sample['calls']:>7}")  # fmt: skip
        stop.set()
        await asyncio.gather(*workers)
        live = -1
        for _ in range(100):
            live = (await stub.Info(pb.InfoRequest(), timeout=10)).live_sessions
            if live == 0:
                break
            await asyncio.sleep(0.1)
    warm = [s for s in samples if s["t"] >= 60] or samples
    growth = warm[-1]["rss_mib"] - warm[0]["rss_mib"] if warm else float("nan")
    return {"samples": samples, "codes": counts, "live_sessions_after": live, "rss_growth_after_warmup_mib": growth}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--minutes", type=float, default=10.0)
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--sample-s", type=float, default=15.0)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    port, health = free_port(), free_port()
    command = guard_command("serve", "--model", "demo", "--judge", "",
         "--address", f"127.0.0.1:{port}", "--health-port", str(health), "--metrics-port", "0",
         "--audit-log", "", "--log-level", "WARNING")  # fmt: skip
    with running(command, "sidecar", quiet=True) as process:
        asyncio.run(wait_serving(f"127.0.0.1:{health}"))
        result = asyncio.run(soak(args, process, f"127.0.0.1:{port}"))
    unexpected = {code: n for code, n in result["codes"].items() if code not in EXPECTED}
    print(f"calls by status: {result['codes']}; live sessions after: {result['live_sessions_after']}; "
          f"RSS growth after the first minute: {result['rss_growth_after_warmup_mib']:+.1f} MiB")  # fmt: skip
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"args": {**vars(args), "json": str(args.json)}, **result}, indent=2) + "\n")
    return 1 if unexpected or result["live_sessions_after"] != 0 else 0


if __name__ == "__main__":
    sys.exit(main())
