"""`guard judge`: a Generative Qwen3Guard judgment of one conversation."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def cmd_judge(args) -> int:
    """Generative Qwen3Guard on one conversation: local checkpoint, the demo judge, or an endpoint."""
    import asyncio

    from guard.judge.judgment import JudgmentParseError
    from guard.text.conversation import Message, parse_messages

    if args.messages:
        raw = json.loads(Path(args.messages).read_text())
        messages = [m.as_dict() for m in parse_messages(raw.get("messages") if isinstance(raw, dict) else raw)]
    else:
        messages = [Message("user", args.text).as_dict()]
        if args.response is not None:
            messages.append(Message("assistant", args.response).as_dict())
    if args.endpoint:
        from guard.judge.remote import RemoteJudge

        async def remote():
            judge = RemoteJudge(args.endpoint, model=args.endpoint_model)
            try:
                return await judge.classify(messages)
            finally:
                await judge.close()

        description, demo = f"endpoint {args.endpoint}", False
        try:
            judgment = asyncio.run(remote())
        except JudgmentParseError as exc:
            print(f"guard: error: {exc}", file=sys.stderr)
            return 1
    else:
        from guard.judge.local import LocalJudge

        if args.model == "demo":
            from guard.demo.judge_model import demo_judge_dir

            path = demo_judge_dir()
        else:
            path = Path(args.model)
            if not path.is_dir():
                raise FileNotFoundError(f"judge model {args.model!r} is neither 'demo' nor a checkpoint directory")
        judge = LocalJudge(path)
        demo = judge.demo
        description = f"{path.name}" + (f" -- {demo.get('notice')}" if demo else "")
        try:
            judgment = judge.classify(messages, scored=args.scored).result()
        except JudgmentParseError as exc:
            print(f"guard: error: {exc}", file=sys.stderr)
            return 1
        finally:
            judge.close()
    if args.json:
        out = {
            "judge": {"description": description, "demo": bool(demo)},
            "mode": judgment.mode.value,
            "risk": judgment.risk.name.capitalize(),
            "categories": list(judgment.categories),
            "refusal": judgment.refusal,
            "raw_text": judgment.raw_text,
            "risk_probs": judgment.risk_probs,
            "category_probs": judgment.category_probs,
            "inference_ms": round(judgment.inference_s * 1e3, 2),
        }
        json.dump(out, sys.stdout, ensure_ascii=False, indent=2)
        sys.stdout.write("\n")
        return 0
    print(f"judge: {description}")
    print(judgment.raw_text)
    if judgment.risk_probs:
        print("probabilities: " + ", ".join(f"{k}={v:.3f}" for k, v in judgment.risk_probs.items()))
    return 0


def add_parser(sub) -> None:
    judge = sub.add_parser("judge", help="Generative Qwen3Guard judgment of a prompt or response")
    judge_src = judge.add_mutually_exclusive_group(required=True)
    judge_src.add_argument("--text", help="the user prompt to judge")
    judge_src.add_argument("--messages", help="JSON file: list of {role, content}")
    judge.add_argument("--response", default=None, help="with --text: an assistant response to judge instead")
    judge_backend = judge.add_mutually_exclusive_group()
    judge_backend.add_argument("--model", default="demo", help="Qwen3Guard-Gen checkpoint directory or 'demo'")
    judge_backend.add_argument("--endpoint", help="OpenAI-compatible endpoint (e.g. http://vllm:8000)")
    judge.add_argument("--endpoint-model", default=None, help="model name at the endpoint (default: first listed)")
    judge.add_argument("--scored", action="store_true", help="probabilities from the logits (local model only)")
    judge.add_argument("--json", action="store_true")
    judge.set_defaults(func=cmd_judge)

