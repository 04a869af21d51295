"""`guard rerank`: Qwen3-Reranker scores for a query and documents, without a server."""

from __future__ import annotations

import json
import sys

from server.cli.embed import read_id_lists


def cmd_rerank(args) -> int:
    from guard.retrieval.inputs import Truncation
    from guard.retrieval.reranker import Reranker, RerankPair, probability
    from guard.runtime import parse_dtype, resolve_retrieval_model

    reranker = Reranker(
        resolve_retrieval_model(args.model, "reranker"), device=args.device, dtype=parse_dtype(args.dtype)
    )
    try:
        if args.ids:
            sequences = [
                reranker.sequence(RerankPair(token_ids=tuple(ids)), truncation=Truncation.NONE, what=f"sequences[{i}]")
                for i, ids in enumerate(read_id_lists(args.ids, "rendered sequences"))
            ]
        else:
            if not args.query or not args.doc:
                raise ValueError("give --query and --doc (one or more), or --ids")
            truncation = Truncation(args.truncate) if args.truncate else Truncation.NONE
            sequences = reranker.sequences(
                args.query, args.doc, instruction=args.instruction or "", truncation=truncation
            )
        raw = [f.result().value for f in reranker.submit(sequences)]
    finally:
        reranker.close()
    scores = raw if args.raw_scores else [probability(r) for r in raw]
    demo = reranker.demo
    if args.json:
        out = {
            "model": {
                "path": str(reranker.path),
                "kind": reranker.kind,
                "demo": bool(demo),
                "notice": (demo or {}).get("notice"),
            },
            "raw_scores": args.raw_scores,
            "tokens": [len(s) for s in sequences],
            "scores": scores,
        }
        json.dump(out, sys.stdout)
        sys.stdout.write("\n")
        return 0
    if demo:
        print(f"model: {reranker.path.name} -- {demo.get('notice')}")
    for i in sorted(range(len(scores)), key=lambda i: -scores[i]):
        label = args.doc[i] if args.doc else f"sequence {i}"
        print(f"{scores[i]:.4f}  [{i}] {label}")
    return 0


def add_parser(sub) -> None:
    p = sub.add_parser("rerank", help="score documents against a query with Qwen3-Reranker")
    p.add_argument("--model", default="demo", help="reranker checkpoint directory, or 'demo'")
    p.add_argument("--query")
    p.add_argument("--doc", nargs="+", help="documents to score")
    p.add_argument("--ids", help="a JSON file: a list of fully rendered token-id sequences, scored as given")
    p.add_argument("--instruction", help="the task (default: the model card's web search task)")
    p.add_argument("--raw-scores", action="store_true", help="the logit difference l_yes - l_no, not P(yes)")
    p.add_argument("--truncate", choices=["right", "left"], help="cut pairs over the limit instead of refusing")
    p.add_argument("--device", default="cpu")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--json", action="store_true", help='print {"scores": [...], ...} in input order')
    p.set_defaults(func=cmd_rerank)
