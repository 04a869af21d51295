"""Where the sidecar's time goes: the stream engine alone, a model-free gRPC server (the transport
floor, benchmarks/transport_floor.py) and the whole sidecar, side by side in one run, for N
concurrent streams and chunks of C tokens.

1. **engine**: the in-process StreamEngine with the sidecar's engine limits; N threads, each
   submits its next chunk when the previous one is judged (``submit(...).result()``).
2. **floor**: transport_floor.py in its own process; it answers every message without a model.
3. **sidecar**: ``guard serve`` in its own process, with a policy domain that never interrupts,
   so every stream runs to its end and every token is judged.

(2) and (3) get the same load: a grpc.aio client in this process, one channel per level, N
streams; each stream opens (one user turn), sends ``--tokens-per-stream`` token ids in chunks
of C, each awaited (write one chunk, read its verdict; that round trip is the chunk latency),
then closes. All three are up for the whole run and, level by level, run back to back (each
repetition of a level: engine, floor, sidecar), so a ratio's three numbers are measured seconds
apart on a machine whose speed drifts over minutes. Requests are built before the clock starts.
tokens/s counts the tokens judged between the moment all N streams are open and the last
verdict (open and close are not timed; the engine levels are timed the same way). The engine
runs with the sidecar's limits twice, its thread setting (small passes on one torch thread) and
all torch threads for every pass, and the faster is its figure: the engine at its best. ``--repeat``
runs each level that many times and reports the median run. ``serial bound`` = 1 / (1/engine + 1/floor) is what
a sidecar reaches if its transport and model work add up with no overlap; ``sidecar / bound``
shows how far the real thing is from that. Any gRPC error, interrupt, unjudged token or session
left open fails the run (exit 1).

``--profile DIR`` records the sidecar process with py-spy during one level (``--profile-level``,
repeated for ``--profile-seconds``) and writes the raw collapsed stacks and a summary: share of
samples per thread, top functions by self and by inclusive time.

    python benchmarks/service_bench.py --streams 1,16,64 --chunks 1,8,32 --json out.json
    python benchmarks/service_bench.py --only floor,sidecar --streams 16 --chunks 8 --profile /tmp/prof
    python benchmarks/service_bench.py --only sidecar --address-sidecar 127.0.0.1:50051 --policies-domain bench

The machine is shared and the load generator runs on the same cores as the servers: compare
columns within one run, not across runs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import grpc
from load_test import free_port, percentile, wait_serving
from processes import guard_command, running

from guard.demo.corpus import SHOWCASE
from guard.runtime import load_runtime, resolve_model
from guard.text.conversation import GuardTokenizer, Message, RenderedPrompt
from server.qwen3guard.v1 import guard_pb2 as pb
from server.qwen3guard.v1 import guard_pb2_grpc as pb_grpc
from server.settings import ServeSettings

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
KINDS = ("engine", "floor", "sidecar")
BENCH_DOMAIN = "bench_never_interrupt"
# Every non-safe verdict only flags; a slow model is waited for, never failed closed: the streams
# always run to their end, so every level judges the same tokens.
NEVER_INTERRUPT_POLICY = """\
description: service_bench.py - never interrupts, so every stream runs to its end and every token is judged.
prompt:
  safe: ALLOW
  controversial: ALLOW
  unsafe: FLAG
response:
  controversial: FLAG
  unsafe: FLAG
controversial: loose
release_mode: hold_back
fail_mode: closed
model_timeout_ms: 600000
"""
WARMUP = (4, 8, 64)  # streams, chunk, tokens per stream of the warm-up before each server's levels


@dataclass(frozen=True)
class Workload:
    """What every stream sends: one user turn and ``tokens`` response ids."""

    prompt: str
    rendered: RenderedPrompt
    response_ids: list[int]

    def chunks(self, chunk: int, tokens: int | None = None) -> list[list[int]]:
        ids = self.response_ids[: tokens or len(self.response_ids)]
        return [ids[i : i + chunk] for i in range(0, len(ids), chunk)]


def workload(model: str, tokens: int) -> Workload:
    """The showcase conversation, its response ids (without the closing <|im_end|>) repeated."""
    example = SHOWCASE[0]
    tokenizer = GuardTokenizer.from_dir(resolve_model(model))
    rendered, ids = tokenizer.split_response([Message("user", example.prompt), Message("assistant", example.response)])
    content = ids[:-1] or ids
    repeated = (content * (tokens // len(content) + 1))[:tokens]
    return Workload(example.prompt, rendered, repeated)


def summary(kind: str, streams: int, chunk: int, tokens: int, seconds: float, latency: list[float]) -> dict:
    return {
        "kind": kind,
        "streams": streams,
        "chunk": chunk,
        "tokens": tokens,
        "chunks": len(latency),
        "seconds": seconds,
        "tokens_per_s": tokens / seconds if seconds > 0 else float("nan"),
        "p50_ms": percentile(latency, 0.5) * 1e3,
        "p99_ms": percentile(latency, 0.99) * 1e3,
    }


# ---------------------------------------------------------------------------------- engine alone


def engine_level(engine, work: Workload, streams: int, chunk: int, tokens: int | None = None) -> dict:
    """N threads, each with its own session, submit chunk after chunk; timed from all open."""
    chunks = work.chunks(chunk, tokens)
    opened = [engine.open_session(work.rendered.prompt_ids, work.rendered.preamble_ids) for _ in range(streams)]
    latency: list[float] = []
    ends: list[float] = []
    errors: list[str] = []
    judged = 0
    lock = threading.Lock()
    start = threading.Barrier(streams + 1)

    def run(session) -> None:
        nonlocal judged
        mine, tokens = [], 0
        try:
            start.wait()
            for ids in chunks:
                t = time.perf_counter()
                tokens += len(engine.submit(session, ids).result().token_ids)
                mine.append(time.perf_counter() - t)
        except Exception as exc:  # reported with the level, fails the run
            with lock:
                errors.append(f"{type(exc).__name__}: {exc}")
        with lock:
            latency.extend(mine)
            judged += tokens
            ends.append(time.perf_counter())

    steps, scored = engine.steps, engine.tokens_scored
    try:
        for _, prompt in opened:
            prompt.result()
        threads = [threading.Thread(target=run, args=(s,), name=f"bench-stream-{i}") for i, (s, _) in enumerate(opened)]
        for t in threads:
            t.start()
        start.wait()
        started = time.perf_counter()
        for t in threads:
            t.join()
    finally:
        for session, _ in opened:
            engine.close(session)
    row = summary("engine", streams, chunk, judged, max(ends) - started, latency)
    row.update(errors=len(errors), error_codes=sorted(set(errors)), interrupts=0, unjudged=0)
    row["tokens_per_step"] = (engine.tokens_scored - scored) / max(1, engine.steps - steps)  # prompts included
    return row


def engine_runtime(args):
    """A runtime built like the sidecar's (same engine limits); ``best_engine_level`` also runs it
    with every pass on all torch threads and keeps the faster run."""
    limits = ServeSettings(max_sessions=max_sessions(args)).engine_limits()
    return load_runtime(args.model, device=args.device, dtype=args.dtype, limits=limits)


def best_engine_level(engine, work: Workload, streams: int, chunk: int) -> dict:
    """The engine at its best: the sidecar's thread setting (small passes on one torch thread)
    and all torch threads for every pass, back to back; the faster run is the engine's figure,
    so the bound is never lowered by a setting that suits the sidecar but not the engine alone."""
    served = engine.limits
    runs = {}
    try:
        for name, min_parallel in (("served", served.min_parallel_tokens), ("all-threads", 0)):
            engine.limits = replace(served, min_parallel_tokens=min_parallel)
            runs[name] = engine_level(engine, work, streams, chunk)
    finally:
        engine.limits = served
    name, best = max(runs.items(), key=lambda kv: kv[1]["tokens_per_s"])
    best["threads_setting"] = name
    best["other_setting_tokens_per_s"] = next(r["tokens_per_s"] for n, r in runs.items() if n != name)
    return best


# ---------------------------------------------------------------------------------- over gRPC


def requests(work: Workload, chunk: int, domain: str, tokens: int | None = None) -> list[pb.ModerateRequest]:
    """open, the chunks, close: built once per level, shared by its streams."""
    opened = pb.ModerateRequest(
        open=pb.OpenRequest(domain=domain, messages=[pb.ChatMessage(role="user", content=work.prompt)])
    )
    chunks = [pb.ModerateRequest(chunk=pb.ChunkRequest(token_ids=ids)) for ids in work.chunks(chunk, tokens)]
    return [opened, *chunks, pb.ModerateRequest(close=pb.CloseRequest())]


async def grpc_level(
    kind: str, address: str, work: Workload, streams: int, chunk: int, domain: str, tokens: int | None = None
) -> dict:
    """N Moderate streams on one channel; each chunk is a write and the read of its verdict."""
    messages = requests(work, chunk, domain, tokens)
    opening, chunks, closing = messages[0], messages[1:-1], messages[-1]
    latency: list[float] = []
    engine: list[float] = []
    ends: list[float] = []
    errors: list[str] = []
    counts = Counter()
    arrived = 0
    all_open = asyncio.Event()
    started = 0.0

    def arrive() -> None:
        nonlocal arrived, started
        arrived += 1
        if arrived == streams:
            started = time.perf_counter()
            all_open.set()

    async def expect(call, kind_: str) -> pb.ModerateResponse:
        response = await call.read()
        if response is grpc.aio.EOF or response.WhichOneof("kind") != kind_:
            got = "end of stream" if response is grpc.aio.EOF else response.WhichOneof("kind")
            raise RuntimeError(f"expected `{kind_}`, got {got}")
        return response

    async def one(stub: pb_grpc.StreamGuardStub) -> None:
        call = stub.Moderate(timeout=600)
        judged = 0
        try:
            try:
                await call.write(opening)
                await expect(call, "prompt")
            finally:
                arrive()
            await all_open.wait()
            for request in chunks:
                t = time.perf_counter()
                await call.write(request)
                response = await expect(call, "chunk")
                latency.append(time.perf_counter() - t)
                verdict = response.chunk
                engine.append((verdict.timing.queue_ms + verdict.timing.compute_ms) / 1e3)
                if verdict.unjudged:
                    counts["unjudged"] += len(request.chunk.token_ids)
                else:  # the cumulative counter: right whatever token verdicts the message carries
                    counts["tokens"] += verdict.judged - judged
                judged = verdict.judged
                if verdict.action == pb.INTERRUPT:
                    counts["interrupts"] += 1
                    raise RuntimeError("interrupted: the domain must never interrupt")
            ends.append(time.perf_counter())
            await call.write(closing)
            await expect(call, "final")
            await call.done_writing()
            if await call.read() is not grpc.aio.EOF:
                raise RuntimeError("a message after `final`")
            if (code := await call.code()) != grpc.StatusCode.OK:
                errors.append(code.name)
        except grpc.aio.AioRpcError as exc:
            errors.append(exc.code().name)
        except Exception as exc:  # reported with the level, fails the run
            errors.append(f"{type(exc).__name__}: {exc}")
            call.cancel()

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.StreamGuardStub(channel)
        await asyncio.gather(*(one(stub) for _ in range(streams)))
        live = await live_sessions(stub)
    row = summary(kind, streams, chunk, counts["tokens"], (max(ends) - started) if ends else float("nan"), latency)
    row.update(
        errors=len(errors),
        error_codes=sorted(set(errors)),
        interrupts=counts["interrupts"],
        unjudged=counts["unjudged"],
        live_sessions_after=live,
    )
    if kind == "sidecar":
        row["engine_p50_ms"] = percentile(engine, 0.5) * 1e3
    return row


async def live_sessions(stub: pb_grpc.StreamGuardStub) -> int:
    """Sessions still open after a level (closed in the handlers' finally: give them a moment)."""
    live = -1
    for _ in range(100):
        live = (await stub.Info(pb.InfoRequest(), timeout=10)).live_sessions
        if live == 0:
            break
        await asyncio.sleep(0.05)
    return live


async def wait_up(address: str, process: subprocess.Popen | None) -> None:
    """SERVING, or fail at once when the server we started has exited (not after the timeout)."""
    waiting = asyncio.ensure_future(wait_serving(address))
    while not waiting.done():
        if process is not None and process.poll() is not None:
            waiting.cancel()
            raise RuntimeError(f"the server at {address} exited with {process.returncode} before serving")
        await asyncio.sleep(0.2)
    waiting.result()


@dataclass
class Target:
    """One thing measured: the in-process engine, or a server over gRPC."""

    kind: str
    engine: object | None = None  # the in-process engine (kind "engine")
    address: str = ""
    metrics_port: int | None = None  # the sidecar's Prometheus port: tokens per forward pass

    async def warm_up(self, work: Workload, domain: str) -> None:
        if self.engine is not None:
            engine_level(self.engine, work, *WARMUP[:2], WARMUP[2])
            return
        warm = await grpc_level(self.kind, self.address, work, *WARMUP[:2], domain, WARMUP[2])
        if warm["errors"] or not warm["tokens"]:
            raise RuntimeError(f"{self.kind} warm-up failed: {warm['errors']} errors {warm['error_codes']}")

    async def level(self, work: Workload, streams: int, chunk: int, domain: str) -> dict:
        if self.engine is not None:
            return best_engine_level(self.engine, work, streams, chunk)
        before = step_counts(self.metrics_port)
        run = await grpc_level(self.kind, self.address, work, streams, chunk, domain)
        if before is not None:
            after = step_counts(self.metrics_port)
            run["tokens_per_step"] = (after[0] - before[0]) / max(1.0, after[1] - before[1])
        return run


async def run_levels(args, work: Workload, targets: list[Target]) -> dict[str, dict]:
    """Every level, the targets back to back within each repetition: this machine's speed drifts
    over minutes, so the three numbers a ratio is made of are measured seconds apart."""
    for target in targets:
        await target.warm_up(work, args.policies_domain)
    results: dict[str, dict] = {t.kind: {} for t in targets}
    for chunk in args.chunks:
        for n in args.streams:
            runs: dict[str, list[dict]] = {t.kind: [] for t in targets}
            for _ in range(args.repeat):
                for target in targets:
                    runs[target.kind].append(await target.level(work, n, chunk, args.policies_domain))
            for target in targets:
                results[target.kind][(n, chunk)] = row = median_run(runs[target.kind])
                progress(row)
    return results


def median_run(runs: list[dict]) -> dict:
    """The run with the median tokens/s (each of its numbers comes from one real run); all the
    runs' tokens/s are kept. Errors of any run count."""
    ordered = sorted(runs, key=lambda r: r["tokens_per_s"])
    row = dict(ordered[len(ordered) // 2])
    row["runs_tokens_per_s"] = [r["tokens_per_s"] for r in runs]
    row["errors"] = sum(r["errors"] for r in runs)
    row["error_codes"] = sorted({c for r in runs for c in r["error_codes"]})
    for key in ("interrupts", "unjudged"):
        if key in row:
            row[key] = sum(r.get(key, 0) for r in runs)
    if "live_sessions_after" in row:
        row["live_sessions_after"] = max(r["live_sessions_after"] for r in runs)
    return row


def step_counts(metrics_port: int | None) -> tuple[float, float] | None:
    """(tokens, steps) the sidecar's engine ran so far, from its Prometheus endpoint."""
    if not metrics_port:
        return None
    text = urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=10).read().decode()
    values = {}
    for line in text.splitlines():
        if line.startswith(("guard_batch_tokens_sum ", "guard_batch_tokens_count ")):
            name, value = line.split()
            values[name] = float(value)
    return values["guard_batch_tokens_sum"], values["guard_batch_tokens_count"]


def max_sessions(args) -> int:
    return max(max(args.streams), WARMUP[0], args.profile_streams) * 2


def sidecar_command(args, address: str, policies: Path, metrics_port: int) -> list[str]:
    return guard_command(
        "serve", "--model", args.model, "--device", args.device, "--dtype", args.dtype,
        "--address", address, "--metrics-port", str(metrics_port),
        "--log-level", "WARNING", "--audit-log", "",
        "--max-sessions", str(max_sessions(args)), "--policies", str(policies),
    )  # fmt: skip


def write_policies(directory: Path, domain: str) -> Path:
    """A policy directory: the required default domain and the never-interrupt domain."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "default.yaml").write_text("description: service_bench.py default (unused)\n")
    (directory / f"{domain}.yaml").write_text(NEVER_INTERRUPT_POLICY)
    return directory


# ---------------------------------------------------------------------------------- profile


def py_spy() -> str | None:
    found = Path(sys.executable).with_name("py-spy")
    return str(found) if found.exists() else shutil.which("py-spy")


async def profile_sidecar(args, pid: int, address: str, work: Workload, domain: str) -> dict:
    """Record the sidecar with py-spy while one level runs again and again, then summarize."""
    out = Path(args.profile)
    out.mkdir(parents=True, exist_ok=True)
    raw = out / f"sidecar-{args.profile_level}.txt"
    command = [
        py_spy(), "record", "--pid", str(pid), "--rate", str(args.profile_rate),
        "--duration", str(args.profile_seconds), "--format", "raw", "--threads", "--function", "--nonblocking",
        "-o", str(raw),
    ]  # fmt: skip
    n, chunk = args.profile_streams, args.profile_chunk
    print(f"# profiling the sidecar (pid {pid}) at {n}x{chunk} for {args.profile_seconds} s: {' '.join(command)}")
    levels = []
    with running(command, "py-spy") as spy:
        await asyncio.sleep(1.0)  # let it attach before the load starts
        while spy.poll() is None:
            levels.append(await grpc_level("sidecar", address, work, n, chunk, domain))
    if spy.returncode != 0 or not raw.exists():
        raise RuntimeError(f"py-spy failed (exit {spy.returncode}); see the output above")
    text = summarize_profile(raw, args.profile_rate, args.profile_level)
    summary_path = out / f"sidecar-{args.profile_level}-summary.txt"
    summary_path.write_text(text)
    print(text)
    print(f"wrote {raw} and {summary_path}")
    tokens = sum(r["tokens"] for r in levels)
    rate = tokens / sum(r["seconds"] for r in levels) if levels else float("nan")
    print(f"# while profiled: {len(levels)} runs of the level, {rate:.0f} tok/s (py-spy and other load included)")
    return {
        "level": args.profile_level,
        "raw": str(raw),
        "summary": str(summary_path),
        "levels_run": len(levels),
        "tokens_per_s_while_profiled": rate,
        "errors": sum(r["errors"] for r in levels),
        "error_codes": sorted({c for r in levels for c in r["error_codes"]}),
    }


def summarize_profile(raw: Path, rate: int, level: str, top: int = 30) -> str:
    """Share of samples per thread, top functions by self and inclusive time.

    py-spy's raw format is one line per distinct stack, ``thread (TID): NAME;frame;...;frame
    COUNT``, the root first, each frame ``function (file:line)`` (with --function the line is the
    function's first line). Recorded without --idle, so samples of threads that were waiting
    (epoll, a lock, a condition) are not in the file: the shares are of the time Python threads
    were runnable (running, waiting for a core or for the GIL). --nonblocking because pausing the
    process for each sample wakes its sleeping threads, which then count as busy (a sleeping
    thread showed up in 10% of the samples). Native threads (torch's intra-op pool, gRPC core)
    are not sampled."""
    threads: Counter[str] = Counter()
    own: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        root, *frames = stack.split(";")
        threads[root.split(": ", 1)[1] if ": " in root else root] += count
        own[frames[-1] if frames else "(no Python frame)"] += count
        for frame in set(frames):
            inclusive[frame] += count
        total += count
    if not total:
        return f"# {raw}: no samples\n"

    def table(title: str, counts: Counter[str], limit: int) -> list[str]:
        rows = [f"\n## {title}", f"{'%':>6}  {'samples':>8}  what"]
        rows += [f"{100 * c / total:>6.1f}  {c:>8}  {name}" for name, c in counts.most_common(limit)]
        return rows

    lines = [
        f"# sidecar profile at {level} (streams x chunk): {total} samples at {rate} Hz "
        f"(~{total / rate:.1f} s of running Python threads)",
        "# idle samples excluded (py-spy --nonblocking without --idle): percentages are of the samples in which "
        "a Python thread was runnable (running, or waiting for a core or the GIL); native threads (torch intra-op, "
        "gRPC core) are not sampled",
    ]
    lines += table("Threads (by name)", threads, 50)
    lines += table(f"Top {top} functions by self time", own, top)
    lines += table(f"Top {top} functions by inclusive time", inclusive, top)
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------- report


def progress(row: dict) -> None:
    print(
        f"  {row['kind']:<8} {row['streams']:>3}x{row['chunk']:<3} {row['tokens_per_s']:>9.0f} tok/s "
        f"p50 {row['p50_ms']:.2f} ms p99 {row['p99_ms']:.2f} ms errors {row['errors']}",
        file=sys.stderr,
    )


def combine(args, results: dict[str, dict]) -> list[dict]:
    """One row per (streams, chunk) with the three kinds side by side and the serial bound."""
    rows = []
    for chunk in args.chunks:
        for n in args.streams:
            row: dict = {"streams": n, "chunk": chunk}
            for kind in KINDS:
                if (level := results.get(kind, {}).get((n, chunk))) is not None:
                    row[kind] = level
            engine, floor = row.get("engine"), row.get("floor")
            if engine and floor:
                row["serial_bound_tokens_per_s"] = 1 / (1 / engine["tokens_per_s"] + 1 / floor["tokens_per_s"])
                if "sidecar" in row:
                    row["sidecar_vs_bound"] = row["sidecar"]["tokens_per_s"] / row["serial_bound_tokens_per_s"]
            rows.append(row)
    return rows


def print_tables(args, rows: list[dict]) -> None:
    def num(value: float | None, fmt: str) -> str:
        return "-" if value is None else format(value, fmt)

    head = (
        f"{'streams':>7} {'engine':>8} {'floor':>8} {'sidecar':>8} {'bound':>8} {'sc/bnd':>7} "
        f"{'eng p50':>8} {'eng p99':>8} {'flr p50':>8} {'flr p99':>8} {'sc p50':>8} {'sc p99':>8} {'sc eng50':>8} "
        f"{'eng t/st':>8} {'sc t/st':>8}"
    )
    for chunk in args.chunks:
        print(f"\n## chunk {chunk} tokens, {args.tokens_per_stream} tokens per stream (tok/s; latency ms per chunk)")
        print(head)
        for row in (r for r in rows if r["chunk"] == chunk):
            e, f, s = (row.get(k) or {} for k in KINDS)
            ratio = row.get("sidecar_vs_bound")
            print(
                f"{row['streams']:>7} {num(e.get('tokens_per_s'), '.0f'):>8} {num(f.get('tokens_per_s'), '.0f'):>8} "
                f"{num(s.get('tokens_per_s'), '.0f'):>8} {num(row.get('serial_bound_tokens_per_s'), '.0f'):>8} "
                f"{num(ratio and 100 * ratio, '.0f') + ('%' if ratio else ''):>7} "
                f"{num(e.get('p50_ms'), '.2f'):>8} {num(e.get('p99_ms'), '.2f'):>8} "
                f"{num(f.get('p50_ms'), '.2f'):>8} {num(f.get('p99_ms'), '.2f'):>8} "
                f"{num(s.get('p50_ms'), '.2f'):>8} {num(s.get('p99_ms'), '.2f'):>8} "
                f"{num(s.get('engine_p50_ms'), '.2f'):>8} "
                f"{num(e.get('tokens_per_step'), '.1f'):>8} {num(s.get('tokens_per_step'), '.1f'):>8}"
            )
    print(
        "\nbound = 1/(1/engine + 1/floor): transport and model work added with no overlap; "
        "sc eng50 = the sidecar's own queue+compute p50 per chunk (responses' timing); "
        "t/st = tokens per forward pass (batching)"
    )


def meta(args) -> dict:
    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    def git(*command: str) -> str:
        done = subprocess.run(["git", *command], cwd=REPO, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next(
            (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
             if line.startswith("model name")),
            cpu,
        )  # fmt: skip
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cores": os.cpu_count(),
        "cpu": cpu,
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "torch": version("torch"),
        "grpcio": version("grpcio"),
        "git_commit": git("rev-parse", "HEAD"),
        "git_dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
        "model": args.model,
        "tokens_per_stream": args.tokens_per_stream,
        "streams": args.streams,
        "chunks": args.chunks,
        "only": sorted(args.only),
        "domain": args.policies_domain,
        "address_sidecar": args.address_sidecar,
    }


def failures(results: dict[str, dict], profile: dict | None) -> list[str]:
    bad = []
    for kind, levels in results.items():
        for (n, chunk), row in levels.items():
            problems = [
                f"{row['errors']} errors {row['error_codes']}" if row["errors"] else "",
                f"{row['interrupts']} interrupts" if row["interrupts"] else "",
                f"{row['unjudged']} unjudged tokens" if row["unjudged"] else "",
                f"{row['live_sessions_after']} sessions left open" if row.get("live_sessions_after", 0) else "",
                "no tokens judged" if not row["tokens"] else "",
            ]
            if any(problems):
                bad.append(f"{kind} {n}x{chunk}: {', '.join(p for p in problems if p)}")
    if profile and profile["errors"]:
        bad.append(f"profile level: {profile['errors']} errors {profile['error_codes']}")
    return bad


async def main_async(args, work: Workload) -> tuple[dict[str, dict], dict | None]:
    """Start what --only asks for (the engine in process, the floor and the sidecar as processes),
    then measure them level by level, interleaved; profile the sidecar last."""
    targets: list[Target] = []
    profile = None
    with contextlib.ExitStack() as stack:
        if "engine" in args.only:
            print("# engine alone (in process)", file=sys.stderr)
            runtime = engine_runtime(args)
            stack.callback(runtime.close)
            targets.append(Target("engine", engine=runtime.engine))
        if "floor" in args.only:
            address = f"127.0.0.1:{free_port()}"
            command = [sys.executable, str(HERE / "transport_floor.py"), "--address", address]
            process = stack.enter_context(running(command, "transport floor"))
            await wait_up(address, process)
            targets.append(Target("floor", address=address))
        sidecar = None
        if args.address_sidecar and "sidecar" in args.only:
            targets.append(Target("sidecar", address=args.address_sidecar))
        elif "sidecar" in args.only or args.profile:
            address, metrics_port = f"127.0.0.1:{free_port()}", free_port()
            policies = write_policies(
                Path(stack.enter_context(tempfile.TemporaryDirectory())) / "policies", args.policies_domain
            )
            sidecar = stack.enter_context(running(sidecar_command(args, address, policies, metrics_port), "sidecar"))
            await wait_up(address, sidecar)
            if "sidecar" in args.only:
                targets.append(Target("sidecar", address=address, metrics_port=metrics_port))
        results = await run_levels(args, work, targets) if targets else {}
        if args.profile and sidecar is not None:
            profile = await profile_sidecar(args, sidecar.pid, address, work, args.policies_domain)
    return results, profile


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=parse_ints, default=[1, 16, 64])
    p.add_argument("--chunks", type=parse_ints, default=[1, 8, 32], help="tokens per chunk")
    p.add_argument("--tokens-per-stream", type=int, default=256)
    p.add_argument("--model", default="demo", help="for the engine and the sidecar started here")
    p.add_argument("--device", default="cpu", help="for the engine and the sidecar started here")
    p.add_argument("--dtype", default="float32", help="for the engine and the sidecar started here")
    p.add_argument("--only", default=",".join(KINDS), help="a subset of engine,floor,sidecar")
    p.add_argument("--repeat", type=int, default=1, help="runs of each level; the median run is reported")
    p.add_argument("--address-sidecar", default=None, help="use this running sidecar instead of starting one")
    p.add_argument("--policies-domain", default=BENCH_DOMAIN, help="domain sent in `open` (must never interrupt)")
    p.add_argument("--json", default=None, help="write everything here")
    p.add_argument("--profile", default=None, metavar="DIR", help="py-spy the sidecar during --profile-level")
    p.add_argument("--profile-level", default="16x8", help="STREAMSxCHUNK")
    p.add_argument("--profile-seconds", type=int, default=20)
    p.add_argument("--profile-rate", type=int, default=200, help="samples per second")
    args = p.parse_args(argv)
    args.only = {k.strip() for k in args.only.split(",") if k.strip()}
    if unknown := args.only - set(KINDS):
        p.error(f"--only: unknown {sorted(unknown)}; choose from {', '.join(KINDS)}")
    try:
        args.profile_streams, args.profile_chunk = (int(x) for x in args.profile_level.lower().split("x"))
    except ValueError:
        p.error(f"--profile-level must be STREAMSxCHUNK, e.g. 16x8, got {args.profile_level!r}")
    if args.profile:
        if args.address_sidecar:
            p.error("--profile needs the sidecar this script starts (its pid); drop --address-sidecar")
        if py_spy() is None:
            print(
                f"error: --profile needs py-spy, which is not installed: {Path(sys.executable).parent / 'pip'} "
                "install py-spy",
                file=sys.stderr,
            )
            return 2
    work = workload(args.model, args.tokens_per_stream)
    info = meta(args)
    print(
        f"# {info['date']}, {info['cores']} cores {info['cpu']}, python {info['python']}, torch {info['torch']}, "
        f"commit {info['git_commit'][:10]}{' (dirty)' if info['git_dirty'] else ''}; model {args.model}, "
        f"prompt {len(work.rendered.prompt_ids)} tokens, {args.tokens_per_stream} response tokens per stream"
    )
    results, profile = asyncio.run(main_async(args, work))
    rows = combine(args, results)
    if results:
        print_tables(args, rows)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"meta": info, "levels": rows, "profile": profile}, indent=2) + "\n")
        print(f"wrote {args.json}")
    if bad := failures(results, profile):
        print("FAILED:\n  " + "\n  ".join(bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
