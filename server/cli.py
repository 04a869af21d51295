"""The ``guard`` command line: moderate a conversation, build or show the demo model.

``guard moderate --json`` output is a stable, scripted-against format:
``{"model": {...}, "prompt": {risk, probs, category, category_probs}, "tokens": [{id, text, risk,
probs, category, category_probs, counts_unsafe}, ...], "interrupt_index": int|null,
"unsafe_span_start": int|null, "rules": {...}}``. Labels are the checkpoint's own strings.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from guard.errors import EngineError
from server.settings import add_serve_arguments

EXIT_USAGE = 2


def _verdict_json(v) -> dict[str, Any]:
    return {"risk": v.risk_label, "probs": v.risk_probs, "category": v.category, "category_probs": v.category_probs}


def _read_input(args) -> tuple[list[Any] | None, dict[str, Any] | None]:
    """Read and shape-check the input file before the model loads: (messages, ids)."""
    from guard.conversation import Message, parse_messages

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

    from guard.policy import Policy
    from guard.policy_loader import check_path
    from guard.verdict import ControversialMode

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


def cmd_demo(args) -> int:
    """Build (if needed) the demo model and moderate the showcase conversations."""
    from guard.conversation import Message
    from guard.demo import demo_checkpoint_dir
    from guard.demo_corpus import SHOWCASE
    from guard.runtime import load_runtime

    path = demo_checkpoint_dir(rebuild=args.rebuild)
    if args.build_only:
        print(path)
        return 0
    runtime = load_runtime(str(path))
    try:
        print(f"model: {runtime.description}\n")
        for ex in SHOWCASE:
            _, response = runtime.tokenizer.split_response(
                [Message("user", ex.prompt), Message("assistant", ex.response)]
            )
            stream = runtime.moderator.open(messages=[Message("user", ex.prompt)])
            prompt = stream.prompt.result().verdict
            chunk = stream.feed_ids(response).result()
            stream.close()
            shown = runtime.tokenizer.hf.decode(
                response[: chunk.flag_index + 1] if chunk.flag_index is not None else response, skip_special_tokens=True
            )
            print(f"user:      {ex.prompt}")
            print(f"  prompt:  {prompt.risk_label}" + (f" ({prompt.category})" if prompt.category else ""))
            if chunk.flag_index is None:
                print(f"  response passed: {shown}\n")
            else:
                category = chunk.tokens[chunk.flag_index].verdict.category
                print(f"  response INTERRUPTED at token {chunk.flag_index} ({category}): {shown} [...]\n")
    finally:
        runtime.close()
    return 0


def cmd_serve(args) -> int:
    """Run the sidecar until SIGTERM; settings from flags, then GUARD_* environment variables."""
    import asyncio

    from server.app import serve
    from server.settings import settings_from

    settings = settings_from(args)
    logging.getLogger().setLevel(settings.log_level.upper())
    logging.getLogger(__name__).info("event=settings %s", settings.describe())
    return asyncio.run(serve(settings))


def cmd_judge(args) -> int:
    """Generative Qwen3Guard on one conversation: local checkpoint, the demo judge, or an endpoint."""
    import asyncio

    from guard.conversation import Message, parse_messages
    from guard.judgment import JudgmentParseError

    if args.messages:
        raw = json.loads(Path(args.messages).read_text())
        messages = [m.as_dict() for m in parse_messages(raw.get("messages") if isinstance(raw, dict) else raw)]
    else:
        messages = [Message("user", args.text).as_dict()]
        if args.response is not None:
            messages.append(Message("assistant", args.response).as_dict())
    if args.endpoint:
        from guard.judge_remote import RemoteJudge

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
        from guard.judge_local import LocalJudge

        if args.model == "demo":
            from guard.demo_judge import demo_judge_dir

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


def cmd_policy_check(args) -> int:
    from guard.policy_loader import PolicyError, check_path

    try:
        policies = check_path(Path(args.path))
    except PolicyError as exc:
        print(f"{len(exc.problems)} problem(s):", file=sys.stderr)
        for problem in exc.problems:
            print(f"  {problem}", file=sys.stderr)
        return 1
    for name, policy in sorted(policies.items()):
        print(f"ok  {name:<22} {policy.version}  {policy.description}")
    return 0


def cmd_policy_explain(args) -> int:
    """The effective table of one domain after inheritance."""
    from guard.labels import RiskLevel
    from guard.policy_loader import PolicyError, check_path

    try:
        policies = check_path(Path(args.policies))
    except PolicyError as exc:
        print(f"guard: error: invalid policies:\n{exc}", file=sys.stderr)
        return 1
    if args.domain not in policies:
        print(f"guard: error: no policy {args.domain!r}; known: {', '.join(sorted(policies))}", file=sys.stderr)
        return 2
    p = policies[args.domain]
    print(f"domain {args.domain}  version {p.version}  ({p.source})")
    if p.description:
        print(f"  {p.description}")
    print(f"\n{'verdict':<16} {'prompt':<10} response")
    for level in RiskLevel:
        print(f"{level.name:<16} {p.prompt_actions[level].name:<10} {p.response_actions[level].name}")
    categories = sorted(set(p.prompt_category_actions) | set(p.response_category_actions))
    for c in categories:
        prompt = p.prompt_category_actions.get(c)
        response = p.response_category_actions.get(c)
        print(f"{'category ' + c:<16} {(prompt.name if prompt else '-'):<10} {response.name if response else '-'}")
    thresholds = f"unsafe >= {p.unsafe_threshold}, controversial >= {p.controversial_threshold}"
    print(f"\nthresholds      {thresholds if p.unsafe_threshold or p.controversial_threshold else 'argmax'}")
    print(f"controversial   {p.controversial.value}")
    print(f"debounce        {p.debounce}")
    print(f"release_mode    {p.release_mode.value}")
    print(f"redact_marker   {p.redact_marker!r}")
    print(f"fail_mode       {p.fail_mode.value} after {p.model_timeout_ms} ms")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="guard", description="Streaming Qwen3Guard safety sidecar")
    parser.add_argument("--log-level", default="WARNING", help="logging level for commands other than serve")
    sub = parser.add_subparsers(dest="command", required=True)

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

    serve = sub.add_parser("serve", help="run the gRPC sidecar (StreamGuard, health, reflection, metrics)")
    add_serve_arguments(serve)
    serve.set_defaults(func=cmd_serve)

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

    policy = sub.add_parser("policy", help="check or explain the per-domain policies")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    check = policy_sub.add_parser("check", help="validate a policy directory or file (file:line: field: error)")
    check.add_argument("path", help="a directory of *.yaml policies, or one file")
    check.set_defaults(func=cmd_policy_check)
    explain = policy_sub.add_parser("explain", help="print a domain's effective policy after inheritance")
    explain.add_argument("domain")
    explain.add_argument("--policies", default="policies", help="policy directory (default ./policies)")
    explain.set_defaults(func=cmd_policy_explain)

    demo = sub.add_parser("demo", help="build the demo model and moderate the showcase conversations")
    demo.add_argument("--rebuild", action="store_true", help="retrain the demo model")
    demo.add_argument("--build-only", action="store_true", help="only build; print the checkpoint path")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=(args.log_level or "WARNING").upper(),
        format="%(asctime)s %(levelname)s %(name)s %(message)s",
        stream=sys.stderr,
    )
    try:
        return args.func(args)
    except (EngineError, ValueError, FileNotFoundError, json.JSONDecodeError) as exc:
        print(f"guard: error: {exc}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
