"""`guard parscale`: a ParScale checkpoint from the command line, without a server: greedy tokens
after a prompt, or the top logits at its last position.

    guard parscale --model demo --text "The capital of France is" --greedy 8 --json
    guard parscale --model DIR --ids prompt.json --topk 5 --json
"""

from __future__ import annotations

import asyncio
import json
import sys
from pathlib import Path


def read_ids(path: str) -> list[int]:
    """A JSON list of token ids, used exactly as given."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list) or not data or not all(isinstance(x, int) and not isinstance(x, bool) for x in data):
        raise ValueError(f"{path}: expected a non-empty JSON list of token ids")
    return data


def cmd_parscale(args) -> int:
    from guard.parscale.engine import ParScaleEngine, ParScaleLimits
    from guard.parscale.loading import load_parscale
    from guard.runtime import parse_dtype

    model, tokenizer, path = load_parscale(args.model, device=args.device, dtype=parse_dtype(args.dtype))
    if (args.greedy is not None and args.greedy < 1) or (args.topk is not None and args.topk < 1):
        raise ValueError("--greedy N and --topk K must be at least 1")
    ids = read_ids(args.ids) if args.ids else list(tokenizer.encode(args.text, add_special_tokens=False))
    if not ids:
        raise ValueError("the prompt is empty")
    engine = ParScaleEngine(model, ParScaleLimits(max_requests=1))
    if len(ids) + (args.greedy or 0) > engine.max_tokens:
        engine.close()
        raise ValueError(
            f"{len(ids)} prompt tokens + {args.greedy or 0} to generate exceed the model's {engine.max_tokens}"
        )
    try:
        out = asyncio.run(_run(engine, ids, args.greedy, args.topk))
    finally:
        engine.close()
    demo = model.config.demo
    if args.json:
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
        return 0
    if demo:
        print(f"model: {path.name} -- {demo.get('notice')}")
    if "token_ids" in out:
        print(f"{len(ids)} prompt tokens, P={model.streams}: {tokenizer.decode(out['token_ids'])!r}")
        print(f"token ids: {out['token_ids']}")
    else:
        for token, logit in out["topk"]:
            print(f"{token:>8}  {logit:10.4f}  {tokenizer.decode([token])!r}")
    return 0


async def _run(engine, ids: list[int], greedy: int | None, topk: int | None) -> dict:
    request = engine.open()
    argmax = lambda logits: int(logits.argmax())  # noqa: E731
    try:
        size, out = engine.limits.max_step_tokens, None
        for start in range(0, len(ids), size):
            last = start + size >= len(ids)
            step = request.step(ids[start : start + size], sample=argmax if last and greedy else None,
                                top_k=(topk or 0) if last else 0)  # fmt: skip
            out = (await asyncio.wrap_future(step)).value
        if topk:
            return {"topk": [[token, logit] for token, logit in out.top]}
        tokens = [out.next_id]
        while len(tokens) < greedy:
            out = (await asyncio.wrap_future(request.step([tokens[-1]], sample=argmax))).value
            tokens.append(out.next_id)
        return {"token_ids": tokens}
    finally:
        request.close()


def add_parser(sub) -> None:
    p = sub.add_parser("parscale", help="greedy tokens or top logits from a ParScale checkpoint")
    p.add_argument("--model", default="demo", help="ParScale checkpoint directory (qwen2_parscale), or 'demo'")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", help="the prompt as text (tokenized with the model's tokenizer)")
    source.add_argument("--ids", help="a JSON file: the prompt as a list of token ids, used exactly as given")
    what = p.add_mutually_exclusive_group(required=True)
    what.add_argument("--greedy", type=int, metavar="N", help="generate N tokens greedily")
    what.add_argument("--topk", type=int, metavar="K", help="the last position's top K logits")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", action="store_true", help='print {"token_ids": [...]} or {"topk": [[id, logit], ...]}')
    p.set_defaults(func=cmd_parscale)
