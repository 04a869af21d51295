"""`guard reason`: one guarded reasoning generation from the command line.

It runs what `guard serve --reasoner ...` runs (the Reasoner and StreamGuard in a sidecar on a
loopback port, only for this command) and calls it over gRPC, so the command line and the service
answer alike: thinking budget, steering, the memory agent and the guard included.

    guard reason --model demo --text "What is 17 + 25?" --budget 12 --json
    guard reason --model demo --text "What is 17 + 25?" --steer backtracking=8@Wait:20
    guard reason --model DIR --document report.txt --question "What changed in 2024?"
"""

from __future__ import annotations

import asyncio
import json
import re
import sys
from pathlib import Path

STEER = re.compile(r"^(?P<target>[^=]+)=(?P<alpha>[-+0-9.eE]+)@(?P<start>[^:]+):(?P<tokens>\d+)$")


def parse_steer(text: str):
    """``TARGET=ALPHA@START:T``: TARGET a strategy, ``feature:N``; START a token offset or a trigger."""
    from server.qwen3guard.reasoning.v1 import reasoning_pb2 as pb

    match = STEER.match(text)
    if match is None:
        raise ValueError(
            f"--steer {text!r}: expected TARGET=ALPHA@START:T, e.g. backtracking=8@Wait:20 or feature:73=4@0:16"
        )
    steer = pb.Steer(alpha=float(match["alpha"]), tokens=int(match["tokens"]))
    target, start = match["target"], match["start"]
    if target.startswith("feature:"):
        steer.feature = int(target.removeprefix("feature:"))
    else:
        steer.strategy = target
    if start.isdigit():
        steer.offset = int(start)
    else:
        steer.trigger = start
    return steer


def build_request(args):
    from server.qwen3guard.reasoning.v1 import reasoning_pb2 as pb
    from server.qwen3guard.v1 import guard_pb2 as gpb

    request = pb.GenerateRequest(
        domain=args.domain or "",
        sampling=gpb.SamplingParams(max_tokens=args.max_tokens, temperature=args.temperature),
        thinking_budget=args.budget or 0,
        steer=[parse_steer(s) for s in args.steer or []],
        enable_thinking=not args.no_think,
    )
    if args.seed is not None:
        request.sampling.seed = args.seed
    if args.document:
        if not args.question:
            raise ValueError("--document needs --question")
        request.document.text = Path(args.document).read_text()
        request.document.question = args.question
    else:
        if not args.text:
            raise ValueError("give --text, or --document with --question")
        request.messages.add(role="user", content=args.text)
    return request


async def _run(args) -> dict:
    import grpc

    from server.app import start_sidecar
    from server.qwen3guard.reasoning.v1 import reasoning_pb2 as pb
    from server.qwen3guard.reasoning.v1 import reasoning_pb2_grpc as pb_grpc
    from server.settings import ServeSettings

    request = build_request(args)
    settings = ServeSettings(
        address="127.0.0.1:0",
        metrics_port=0,
        model=args.guard_model,
        judge="",
        reasoner=args.model,
        reasoner_sae=args.sae or "",
        policies=args.policies or "",
        device=args.device,
        dtype=args.dtype,
        audit_log="",  # stdout is this command's output
    )
    sidecar = await start_sidecar(settings)
    out: dict = {"reasoning": "", "answer": "", "reasoning_ids": [], "answer_ids": [], "progress": []}
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{sidecar.port}") as channel:
            stub = pb_grpc.ReasonerStub(channel)
            info = await stub.Info(pb.InfoRequest())
            out["model"] = {"name": info.model, "backend": info.backend, "demo": info.demo}
            async for response in stub.Generate(request):
                event = response.WhichOneof("event")
                if event in ("reasoning", "answer"):
                    delta = getattr(response, event)
                    out[event] += delta.text
                    out[f"{event}_ids"] += list(delta.token_ids)
                elif event == "progress":
                    p = response.progress
                    out["progress"].append({"chunk": p.chunk, "chunks": p.chunks, "memory_tokens": p.memory_tokens})
                elif event == "start":
                    out["prompt_action"] = response.start.prompt.verdict.action
                else:
                    end = response.end
                    out["end"] = {
                        "finish_reason": end.finish_reason,
                        "stopped": end.stopped,
                        "reason": end.reason,
                        "category": end.category,
                        "thinking_budget_reached": end.thinking_budget_reached,
                        "usage": {
                            "prompt_tokens": end.usage.prompt_tokens,
                            "reasoning_tokens": end.usage.reasoning_tokens,
                            "answer_tokens": end.usage.answer_tokens,
                            "memory_calls": end.usage.memory_calls,
                        },
                        "steered": [
                            {"target": s.target, "alpha": s.alpha, "start": s.start, "tokens": s.tokens}
                            for s in end.steered
                        ],
                    }
    except grpc.aio.AioRpcError as exc:
        raise ValueError(f"{exc.code().name}: {exc.details()}") from None
    finally:
        await sidecar.drain(0)
    return out


def cmd_reason(args) -> int:
    out = asyncio.run(_run(args))
    if args.json:
        json.dump(out, sys.stdout, ensure_ascii=False)
        sys.stdout.write("\n")
        return 0
    if out["model"]["demo"]:
        print(f"model: {out['model']['name']} -- DEMO (not a reasoning model)")
    for p in out["progress"]:
        print(f"[memory] chunk {p['chunk']}/{p['chunks']}, memory {p['memory_tokens']} tokens")
    if out["reasoning"]:
        print(f"reasoning: {out['reasoning']}")
    print(f"answer: {out['answer']}")
    end = out["end"]
    print(f"end: {end['finish_reason']} {end['reason']} usage={end['usage']}")
    for s in end["steered"]:
        print(f"steered: {s}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("reason", help="guarded reasoning: thinking budget, SAE steering, memory agent")
    p.add_argument("--model", default="demo", help="reasoning model directory, or 'demo'")
    p.add_argument("--sae", help="SAE directory (default: MODEL/sae when present)")
    p.add_argument("--guard-model", default="demo", help="the Stream Qwen3Guard checkpoint that guards it")
    p.add_argument("--policies", help="policy directory (default: ./policies if present)")
    p.add_argument("--domain", help="the policy domain")
    p.add_argument("--text", help="the user's message")
    p.add_argument("--document", help="a text file to answer --question from (the memory agent when long)")
    p.add_argument("--question")
    p.add_argument("--no-think", action="store_true", help="thinking off (enable_thinking=false)")
    p.add_argument("--budget", type=int, help="thinking budget in tokens")
    p.add_argument("--steer", action="append", help="TARGET=ALPHA@START:T, e.g. backtracking=8@Wait:20 (repeatable)")
    p.add_argument("--max-tokens", type=int, default=256)
    p.add_argument("--temperature", type=float, default=0.0)
    p.add_argument("--seed", type=int)
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", action="store_true", help='print {"reasoning", "answer", "end", ...}')
    p.set_defaults(func=cmd_reason)
