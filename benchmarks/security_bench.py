"""What transport security and tenants cost a guarded stream: per-chunk latency of the same
Moderate load against three `guard serve` processes (demo model), interleaved in one run:

- plaintext: no TLS, no tenants (the sidecar runs open);
- tls: every listener over TLS (a certificate made here with trustme);
- mtls+auth: mTLS (a client certificate) plus a tenants file; each call carries an API key
  (gRPC call credentials, ``authorization: Bearer``), is authenticated, authorized, holds a
  concurrent-call slot, checks its domain, and charges its tokens to the tenant's bucket.

    .venv/bin/python benchmarks/security_bench.py [--streams 16] [--chunk 4] [--requests 6] [--repeat 3] [--json PATH]

Prints p50 / p99 per chunk (write to verdict, median over the repeats) and each mode's p50 as a
ratio of plaintext's in the same run. The three servers are up together; only one is loaded
at a time.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

import grpc  # noqa: E402
import trustme  # noqa: E402
from load_test import free_port, run_level, wait_serving  # noqa: E402
from processes import guard_command, running  # noqa: E402

from guard.demo.corpus import SHOWCASE  # noqa: E402
from guard.runtime import resolve_model  # noqa: E402
from guard.text.conversation import GuardTokenizer, Message  # noqa: E402
from server.tenants import hash_key  # noqa: E402

MODES = ("plaintext", "tls", "mtls+auth")
KEY = "bench-key-1"


def write_credentials(directory: Path) -> dict:
    """A server certificate, a client CA with one client certificate, and a tenants file."""
    server_ca, client_ca = trustme.CA(), trustme.CA()
    leaf = server_ca.issue_cert("localhost", "127.0.0.1")
    leaf.private_key_pem.write_to_path(str(directory / "tls.key"))
    (directory / "tls.crt").write_bytes(b"".join(b.bytes() for b in leaf.cert_chain_pems))
    client_ca.cert_pem.write_to_path(str(directory / "ca.crt"))
    tenants = {"tenants": {"bench": {"keys": [hash_key(KEY)],
                                     "limits": {"max_streams": 10_000, "tokens_per_second": 1e9}}}}  # fmt: skip
    (directory / "tenants.yaml").write_text(json.dumps(tenants))
    return {"server_ca": server_ca, "client": client_ca.issue_cert("bench-client")}


def start(mode: str, directory: Path, stack: contextlib.ExitStack) -> tuple[str, str]:
    """`guard serve` in ``mode`` for as long as ``stack``: its gRPC and its plaintext health address."""
    port, health = free_port(), free_port()
    args = guard_command("serve", "--model", "demo", "--judge", "",
            "--address", f"127.0.0.1:{port}", "--metrics-port", "0", "--audit-log", "", "--log-level", "WARNING",
            "--health-port", str(health), "--max-sessions", "512")  # fmt: skip
    if mode != "plaintext":
        args += ["--tls-cert", str(directory / "tls.crt"), "--tls-key", str(directory / "tls.key")]
    if mode == "mtls+auth":
        args += ["--tls-client-ca", str(directory / "ca.crt"), "--tenants", str(directory / "tenants.yaml")]
    stack.enter_context(running(args, f"sidecar ({mode})", quiet=True))
    return f"127.0.0.1:{port}", f"127.0.0.1:{health}"


def channel(mode: str, address: str, credentials: dict) -> grpc.aio.Channel:
    if mode == "plaintext":
        return grpc.aio.insecure_channel(address)
    ca = credentials["server_ca"].cert_pem.bytes()
    if mode == "tls":
        return grpc.aio.secure_channel(address, grpc.ssl_channel_credentials(root_certificates=ca))
    client = credentials["client"]
    transport = grpc.ssl_channel_credentials(
        root_certificates=ca,
        private_key=client.private_key_pem.bytes(),
        certificate_chain=b"".join(b.bytes() for b in client.cert_chain_pems),
    )
    return grpc.aio.secure_channel(
        address, grpc.composite_channel_credentials(transport, grpc.access_token_call_credentials(KEY))
    )


async def measure(args, servers: dict, credentials: dict, prompt: str, ids: list[int]) -> dict:
    runs: dict[str, list[dict]] = {mode: [] for mode in MODES}
    for mode in MODES:  # warm-up: connections, the engine's first steps
        async with channel(mode, servers[mode], credentials) as warm:
            await run_level(warm, 2, args.chunk, 1, 60, prompt, ids)
    for _ in range(args.repeat):  # interleaved: the machine's noise hits every mode alike
        for mode in MODES:
            async with channel(mode, servers[mode], credentials) as target:
                runs[mode].append(await run_level(target, args.streams, args.chunk, args.requests, 120, prompt, ids))
    return runs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--streams", type=int, default=16)
    parser.add_argument("--chunk", type=int, default=4, help="tokens per chunk")
    parser.add_argument("--requests", type=int, default=6, help="moderation requests per stream, per repeat")
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args()
    example = SHOWCASE[0]
    tokenizer = GuardTokenizer.from_dir(resolve_model("demo"))
    _, ids = tokenizer.split_response([Message("user", example.prompt), Message("assistant", example.response)])
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        credentials = write_credentials(directory)
        with contextlib.ExitStack() as stack:
            started = {mode: start(mode, directory, stack) for mode in MODES}

            async def run() -> dict:
                await asyncio.gather(*(wait_serving(health) for _, health in started.values()))
                servers = {mode: address for mode, (address, _) in started.items()}
                return await measure(args, servers, credentials, example.prompt, ids)

            runs = asyncio.run(run())
    rows = []
    for mode in MODES:
        p50 = statistics.median(r["p50_ms"] for r in runs[mode])
        p99 = statistics.median(r["p99_ms"] for r in runs[mode])
        errors = sum(r["errors"] for r in runs[mode])
        leaked = max(r["live_sessions_after"] for r in runs[mode])
        rows.append({"mode": mode, "p50_ms": p50, "p99_ms": p99, "errors": errors, "live_sessions_after": leaked,
                     "chunks": sum(r["chunks"] for r in runs[mode])})  # fmt: skip
    base = rows[0]["p50_ms"]
    for row in rows:
        row["p50_vs_plaintext"] = row["p50_ms"] / base
    print(f"{args.streams} streams, {len(ids)}-token responses in {args.chunk}-token chunks, "
          f"{args.requests} requests per stream, median of {args.repeat} interleaved runs")  # fmt: skip
    header = ("mode", "chunks", "p50 ms", "p99 ms", "p50 vs plaintext", "errors", "live after")
    print(f"{header[0]:<10} " + " ".join(f"{h:>{w}}" for h, w in zip(header[1:], (7, 8, 8, 17, 7, 10), strict=True)))
    for r in rows:
        ratio = f"{r['p50_vs_plaintext']:.2f}x"
        print(f"{r['mode']:<10} {r['chunks']:>7} {r['p50_ms']:>8.2f} {r['p99_ms']:>8.2f} {ratio:>17} "
              f"{r['errors']:>7} {r['live_sessions_after']:>10}")  # fmt: skip
    if args.json:
        meta = {"streams": args.streams, "chunk": args.chunk, "requests": args.requests, "repeat": args.repeat,
                "cpu": platform.machine(), "cores": os.cpu_count(),
                "date": time.strftime("%Y-%m-%d %H:%M")}  # fmt: skip
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps({"meta": meta, "modes": rows, "runs": runs}, indent=2) + "\n")
    return 1 if any(r["errors"] or r["live_sessions_after"] for r in rows) else 0


if __name__ == "__main__":
    sys.exit(main())
