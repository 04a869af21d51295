"""`guard embed`: Qwen3-Embedding vectors for texts, images or token ids, without a server."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def read_id_lists(path: str, what: str) -> list[list[int]]:
    """A JSON list of token-id lists (used exactly as given)."""
    data = json.loads(Path(path).read_text())
    if not isinstance(data, list) or not data or not all(isinstance(x, list) for x in data):
        raise ValueError(f"{path}: expected a JSON list of {what} (each a list of token ids)")
    return data


def cmd_embed(args) -> int:
    from guard.retrieval.embedder import Embedder, EmbedInput, finish
    from guard.retrieval.inputs import Truncation
    from guard.runtime import parse_dtype, resolve_retrieval_model

    embedder = Embedder(
        resolve_retrieval_model(args.model, "embedder"), device=args.device, dtype=parse_dtype(args.dtype)
    )
    try:
        if args.ids:
            inputs = [EmbedInput(token_ids=tuple(ids)) for ids in read_id_lists(args.ids, "inputs")]
        else:
            inputs = [EmbedInput(text, query=args.query) for text in args.text or []]
            # each image is one input (a Qwen3-VL-Embedding checkpoint); its bytes go in as sent
            inputs += [EmbedInput(query=args.query, images=(Path(p).read_bytes(),)) for p in args.image or []]
        truncation = Truncation(args.truncate) if args.truncate else Truncation.NONE
        sequences = embedder.sequences(inputs, instruction=args.instruction or "", truncation=truncation)
        dimensions = embedder.check_dimensions(args.dimensions)
        normalize = embedder.layout.normalize if args.normalize is None else args.normalize
        vectors = [finish(f.result().value, dimensions, normalize) for f in embedder.submit(sequences)]
    finally:
        embedder.close()
    demo = embedder.demo
    if args.json:
        out = {
            "model": {"path": str(embedder.path), "demo": bool(demo), "notice": (demo or {}).get("notice")},
            "dimensions": dimensions,
            "normalized": normalize,
            "tokens": [len(s) for s in sequences],
            "embeddings": [v.tolist() for v in vectors],
        }
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
        return 0
    if demo:
        print(f"model: {embedder.path.name} -- {demo.get('notice')}")
    for i, (v, s) in enumerate(zip(vectors, sequences, strict=True)):
        head = ", ".join(f"{x:.4f}" for x in v[:6])
        print(f"[{i}] {len(s)} tokens, {len(v)} dims: [{head}, ...]")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("embed", help="embed texts (or token ids) with Qwen3-Embedding")
    p.add_argument("--model", default="demo", help="embedding checkpoint directory, or 'demo'")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--text", nargs="+", help="texts to embed")
    source.add_argument("--image", nargs="+", help="image files to embed, one input each (Qwen3-VL-Embedding)")
    source.add_argument("--ids", help="a JSON file: a list of token-id lists, embedded exactly as given")
    p.add_argument("--query", action="store_true", help="the texts are queries (they get the instruction)")
    p.add_argument("--instruction", help="the queries' task (default: the model's)")
    p.add_argument("--dimensions", type=int, help="MRL: keep this many dimensions, then normalise")
    p.add_argument("--normalize", action=argparse.BooleanOptionalAction, default=None)
    p.add_argument("--truncate", choices=["right", "left"], help="cut inputs over the limit instead of refusing")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", action="store_true", help='print {"embeddings": [[...], ...], ...}')
    p.set_defaults(func=cmd_embed)
