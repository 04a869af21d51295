"""`guard moderate`: judge one conversation token by token.

``guard moderate --json`` output is a stable, scripted-against format:
``{"model": {...}, "prompt": {risk, probs, category, category_probs}, "tokens": [{id, text, risk,
probs, category, category_probs, counts_unsafe}, ...], "interrupt_index": int|null,
"unsafe_span_start": int|null, "rules": {...}}``. Labels are the checkpoint's own strings.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from guard.errors import EngineError


def _verdict_json(v) -> dict[str, Any]:
    return {"risk": v.risk_label, "probs": v.risk_probs, "category": v.category, "category_probs": v.category_probs}


def _read_input(args) -> tuple[list[Any] | None, dict[str, Any] | None]:
    """Read and shape-check the input file before the model loads: (messages, ids)."""
    from guard.text.conversation import Message, parse_messages

    if args.ids:
        data = json.loads(Path(args.ids).read_text())
        if not isinstance(data, dict) or not isinstance(data.get("prompt"), list):
            raise EngineError(f'{args.ids}: expected a JSON object {{"prompt": [ids...], "response": [ids...]}}')
        if not isinstance(data.get("response", []), list):
            raise EngineError(f"{args.ids}: `response` must be a list of token ids")
        return None, data
    if args.messages:
        raw = json.loads(Path(args.messages).read_text())
        if isinstance(raw, dict):
            raw = raw.get("messages")
        if not isinstance(raw, list):
            raise EngineError(f'{args.messages}: expected a JSON list of messages or {{"messages": [...]}}')
        return parse_messages(raw), None
    return [Message("user", args.prompt), Message("assistant", args.text)], None


def _open_arguments(messages, ids, tokenizer) -> tuple[dict[str, Any], list[int] | None]:
    """-> (open kwargs, response ids or None when only the prompt is judged)."""
    if ids is not None:
        return {"prompt_ids": ids["prompt"]}, list(ids.get("response") or [])
    if messages[-1].role == "user":
        return {"messages": messages}, None
    _, response = tokenizer.split_response(messages)
    return {"messages": messages[:-1]}, response


def _moderation_policy(args):
    """The policy for `guard moderate`: a domain from --policies, or the built-in one; flags adjust it."""
    from dataclasses import replace

    from guard.policy.loader import check_path
    from guard.policy.rules import Policy
    from guard.session.verdict import ControversialMode

    policy = check_path(Path(args.policies))[args.domain] if args.domain else Policy()
    if args.debounce is not None:
        policy = replace(policy, debounce=args.debounce)
    if args.loose:
        policy = replace(policy, controversial=ControversialMode.LOOSE)
    return policy


def cmd_moderate(args) -> int:
    from guard.runtime import load_runtime

    policy = _moderation_policy(args)
    messages, ids = _read_input(args)
    runtime = load_runtime(args.model, device=args.device, dtype=args.dtype)
    try:
        open_kwargs, response = _open_arguments(messages, ids, runtime.tokenizer)
        stream = runtime.moderator.open(policy=policy, **open_kwargs)
        prompt = stream.prompt.result()
        chunk = stream.feed_ids(response).result() if response else None
        stream.close()
    finally:
        runtime.close()
    tokens = chunk.tokens if chunk else ()
    decode = runtime.tokenizer.decode_token
    cfg = runtime.guard.config
    if args.json:
        out = {
            "model": {
                "path": str(runtime.guard.path),
                "demo": cfg.is_demo,
                **({"notice": cfg.demo.get("notice")} if cfg.is_demo else {}),
            },
            "rules": {"debounce": policy.debounce, "controversial": policy.controversial.value, "policy": policy.name},
            "prompt": {**_verdict_json(prompt.verdict), "action": prompt.action.name},
            "tokens": [
                {
                    "id": t.token_id,
                    "text": decode(t.token_id),
                    **_verdict_json(t.verdict),
                    "counts_unsafe": t.counts_unsafe,
                    "action": t.action.name,
                }
                for t in tokens
            ],
            "interrupt_index": chunk.flag_index if chunk else None,
            "unsafe_span_start": chunk.span_start if chunk else None,
        }
        json.dump(out, sys.stdout, ensure_ascii=False, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"model: {runtime.description}")
    pv = prompt.verdict
    print(
        f"prompt: {pv.risk_label} (p={pv.risk_probability:.3f})" + (f" category={pv.category}" if pv.category else "")
    )
    if not tokens:
        return 0
    print(f"{'idx':>4} {'id':>7}  {'text':<16} {'risk':<14} {'p':>6}  category")
    for t in tokens:
        v = t.verdict
        mark = "  <- interrupt" if t.index == chunk.flag_index else ""
        print(
            f"{t.index:>4} {t.token_id:>7}  {json.dumps(decode(t.token_id), ensure_ascii=False)[:16]:<16} "
            f"{v.risk_label:<14} {v.risk_probability:>6.3f}  {v.category or '-'}{mark}"
        )
    if chunk.flag_index is None:
        print("response: no interrupt")
    else:
        print(f"response: interrupted at token {chunk.flag_index} (unsafe run from token {chunk.span_start})")
    return 0


def add_parser(sub) -> None:
    mod = sub.add_parser("moderate", help="judge a conversation token by token")
    mod.add_argument("--model", default="demo", help="checkpoint directory, or 'demo' (default)")
    src = mod.add_mutually_exclusive_group(required=True)
    src.add_argument("--text", help="assistant response text to moderate (after --prompt)")
    src.add_argument("--messages", help="JSON file: list of {role, content}; ends with the assistant turn to judge")
    src.add_argument("--ids", help='JSON file: {"prompt": [...ids ending with <|im_end|>], "response": [...]}')
    mod.add_argument("--prompt", default="Hello", help="user prompt for --text (default 'Hello')")
    mod.add_argument("--json", action="store_true", help="print one JSON object")
    mod.add_argument("--policies", default="policies", help="policy directory for --domain (default ./policies)")
    mod.add_argument("--domain", default=None, help="judge under this domain's policy (default: built-in rules)")
    mod.add_argument(
        "--debounce", type=int, default=None, help="consecutive INTERRUPT tokens that interrupt (default 2)"
    )
    mod.add_argument("--loose", action="store_true", help="Controversial keeps its own action (default: strict)")
    mod.add_argument("--device", default="cpu")
    mod.add_argument("--dtype", default="float32")
    mod.set_defaults(func=cmd_moderate)

