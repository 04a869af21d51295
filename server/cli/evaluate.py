"""`guard eval`: replay a labelled data set through the guard under a domain's policy and measure it.

``guard eval --json`` prints one stable object:
``{"model": {path, demo}, "data": str, "skipped": [{line, error}], "domain": str,
"current": {"policy": {name, version, source}, "metrics": M}, "candidate": {...} | null,
"changes": [{id, line, prompt_label, response_label, prompt_action: [before, after],
response_action: [before, after], interrupt_index: [before, after]}], "sweep": [{"param", "value",
"metrics": M}]}`` where M is guard.evaluation.metrics.summarize's object: ``examples``,
``prompt`` and ``response`` (``strict`` / ``loose`` with n, tp, fp, fn, tn, precision, recall,
f1; ``blocked``, ``blocked_unsafe_rate``, ``blocked_safe_rate``; ``interrupted``, ``stop_rate``,
``false_interrupt_rate``), ``timeliness`` (n, interrupted, at_first_sentence,
within_128_tokens, released_past_unsafe_start {mean, max, zero}, interrupt_offsets),
``actions_by_category`` ({stage: {category: {action: count}}}), ``tokens_judged``,
``ms_per_token``, ``model_failures`` (examples where the model failed and the fail mode
decided), ``refused`` ([{line, error}]: examples the guard refused, e.g. over its
token limit). With ``--judge`` / ``--endpoint``, ``"judge": {"backend": str, "metrics":
{examples, failed, prompt: {strict, loose, blocked}, response: {strict, loose, stop_rate,
false_interrupt_rate}, ms_per_example}}`` (else null): the Generative judge on the same examples,
prompts judged alone and responses whole. Rates and scores are null where undefined.
"""

from __future__ import annotations

import asyncio
import json
import math
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

SWEEPABLE = {"threshold": "unsafe_threshold", "controversial_threshold": "controversial_threshold",
             "debounce": "debounce"}  # fmt: skip


def parse_sweep(text: str) -> tuple[str, list[float]]:
    """``threshold=0.3:0.9:0.1`` -> ("threshold", [0.3, 0.4, ..., 0.9]) (the end included)."""
    name, _, spec = text.partition("=")
    if name not in SWEEPABLE:
        raise ValueError(f"--sweep: cannot sweep {name!r}; one of {', '.join(SWEEPABLE)}")
    try:
        start, stop, step = (float(x) for x in spec.split(":"))
    except ValueError:
        raise ValueError(f"--sweep {text!r}: expected {name}=START:STOP:STEP, e.g. threshold=0.3:0.9:0.1") from None
    if step <= 0 or stop < start:
        raise ValueError(f"--sweep {text!r}: STEP must be > 0 and STOP >= START")
    count = math.floor((stop - start) / step + 1e-9) + 1  # STOP included when on the grid, never passed
    if count > 100:
        raise ValueError(f"--sweep {text!r}: {count} values; at most 100")
    values = [round(start + i * step, 10) for i in range(count)]
    if name == "debounce":
        if any(v != int(v) or v < 1 for v in values):
            raise ValueError("--sweep debounce: whole numbers >= 1")
        return name, [int(v) for v in values]
    if values[0] < 0 or values[-1] > 1:
        raise ValueError(f"--sweep {name}: probabilities between 0 and 1")
    return name, values


def _policy(directory: str, domain: str):
    from guard.policy.loader import check_path

    policies = check_path(Path(directory))
    if domain not in policies:
        raise ValueError(f"{directory}: no policy {domain!r} (known: {', '.join(sorted(policies))})")
    return policies[domain]


class _Progress:
    """A progress bar on a terminal (tqdm), silence otherwise."""

    def __init__(self, total: int, label: str) -> None:
        self.bar = None
        if sys.stderr.isatty():
            from tqdm import tqdm

            self.bar = tqdm(total=total, desc=label, unit="example", file=sys.stderr, leave=False)

    def __call__(self, _result) -> None:
        if self.bar is not None:
            self.bar.update(1)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def _run(runtime, examples, policy, concurrency: int, label: str) -> tuple[list, dict[str, Any]]:
    from guard.evaluation.metrics import summarize
    from guard.evaluation.runner import evaluate

    progress = _Progress(len(examples), label)
    started = time.perf_counter()
    try:
        results, refused = asyncio.run(evaluate(runtime, examples, policy, concurrency=concurrency, on_done=progress))
    finally:
        progress.close()
    metrics = summarize(results, time.perf_counter() - started)
    metrics["refused"] = [{"line": p.line, "error": p.error} for p in refused]
    for problem in refused:
        print(f"guard eval: line {problem.line} ({label}): {problem.error}", file=sys.stderr)
    return results, metrics


def _judge(args, examples, policy) -> dict[str, Any]:
    """The Generative judge (a checkpoint, the demo, or an endpoint) on the same examples."""
    from guard.evaluation.judging import judge_examples, judge_summary
    from server.judge_factory import load_judge
    from server.settings import ServeSettings

    settings = ServeSettings(judge=args.judge or "", judge_endpoint=args.endpoint or "", device=args.device,
                             dtype=args.dtype)  # fmt: skip
    backend = load_judge(settings)

    async def run() -> list:
        try:
            return await judge_examples(lambda messages: backend.classify(messages, scored=False), examples,
                                        concurrency=args.concurrency, on_done=progress)  # fmt: skip
        finally:
            await backend.close()

    progress = _Progress(len(examples), "judge")
    started = time.perf_counter()
    try:
        judged = asyncio.run(run())
    finally:
        progress.close()
    for failure in (j for j in judged if j.error):
        print(f"guard eval: {args.data}:{failure.example.line}: the judge failed: {failure.error}", file=sys.stderr)
    return {
        "backend": args.endpoint or args.judge,
        "metrics": judge_summary(judged, policy, time.perf_counter() - started),
    }


def _policy_json(policy) -> dict[str, str]:
    return {"name": policy.name, "version": policy.version, "source": policy.source}


def cmd_eval(args) -> int:
    from guard.evaluation.dataset import read_examples
    from guard.evaluation.metrics import action_changes
    from guard.runtime import load_runtime

    sweep = parse_sweep(args.sweep) if args.sweep else None
    current = _policy(args.policies, args.domain)
    candidate = _policy(args.against, args.domain) if args.against else None
    runtime = load_runtime(args.model, device=args.device, dtype=args.dtype)
    try:
        with open(args.data, encoding="utf-8") as lines:
            examples, skipped = read_examples(lines, runtime.guard.config.response_risk)
        for problem in skipped:
            print(f"guard eval: {args.data}:{problem.line}: skipped: {problem.error}", file=sys.stderr)
        if not examples:
            print(f"guard eval: error: {args.data} has no usable example", file=sys.stderr)
            return 1
        results, metrics = _run(runtime, examples, current, args.concurrency, args.domain)
        out: dict[str, Any] = {
            "model": {"path": str(runtime.guard.path), "demo": runtime.is_demo},
            "data": str(args.data),
            "skipped": [{"line": p.line, "error": p.error} for p in skipped],
            "domain": args.domain,
            "current": {"policy": _policy_json(current), "metrics": metrics},
            "candidate": None,
            "changes": [],
            "sweep": [],
            "judge": None,
        }
        if candidate is not None:
            candidate_results, candidate_metrics = _run(runtime, examples, candidate, args.concurrency, "candidate")
            out["candidate"] = {"policy": _policy_json(candidate), "metrics": candidate_metrics}
            out["changes"] = action_changes(results, candidate_results)
        if args.judge or args.endpoint:
            out["judge"] = _judge(args, examples, current)
        if sweep is not None:
            name, values = sweep
            for value in values:
                swept = replace(current, **{SWEEPABLE[name]: value}, version=f"{current.version}+{name}={value}")
                _, swept_metrics = _run(runtime, examples, swept, args.concurrency, f"{name}={value}")
                out["sweep"].append({"param": name, "value": value, "metrics": swept_metrics})
    finally:
        runtime.close()
    if args.report:
        from guard.evaluation.report import write_report

        print(f"guard eval: report written to {write_report(out, Path(args.report))}", file=sys.stderr)
    if args.json:
        json.dump(out, sys.stdout, ensure_ascii=False, indent=2)
        sys.stdout.write("\n")
    else:
        _print(out)
    return 0


def _f(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value * 100:.1f}%" if percent else f"{value:.3f}"


def _scores(block: dict) -> str:
    return " / ".join(_f(block[k]) for k in ("precision", "recall", "f1"))


def _print_metrics(m: dict) -> None:
    print(f"  {'':<9} {'strict P / R / F1':<24} {'loose P / R / F1':<24} n")
    for stage in ("prompt", "response"):
        print(f"  {stage:<9} {_scores(m[stage]['strict']):<24} {_scores(m[stage]['loose']):<24} "
              f"{m[stage]['strict']['n']}")  # fmt: skip
    p, r, t = m["prompt"], m["response"], m["timeliness"]
    print(f"  prompts blocked: {p['blocked']} (Unsafe {_f(p['blocked_unsafe_rate'], True)}, "
          f"Safe {_f(p['blocked_safe_rate'], True)})")  # fmt: skip
    print(f"  responses interrupted: {r['interrupted']} (stop rate on Unsafe {_f(r['stop_rate'], True)}, "
          f"false interrupts on Safe {_f(r['false_interrupt_rate'], True)})")  # fmt: skip
    past = t["released_past_unsafe_start"]
    print(f"  timeliness ({t['n']} Unsafe with unsafe_start): at the first sentence "
          f"{_f(t['at_first_sentence'], True)}, "
          f"within 128 tokens {_f(t['within_128_tokens'], True)}, tokens released past the start: mean "
          f"{_f(past['mean'])}, max {past['max'] if past['max'] is not None else '-'}")  # fmt: skip
    for stage, categories in m["actions_by_category"].items():
        for category, actions in categories.items():
            counts = ", ".join(f"{a} {n}" for a, n in sorted(actions.items()))
            print(f"  {stage} {category}: {counts}")
    print(f"  {m['tokens_judged']} response tokens judged, {_f(m['ms_per_token'])} ms per token")


def _print(out: dict) -> None:
    model = out["model"]
    print(f"model: {model['path']}{' (DEMO)' if model['demo'] else ''}  data: {out['data']}  "
          f"examples: {out['current']['metrics']['examples']}  skipped: {len(out['skipped'])}")  # fmt: skip
    policy = out["current"]["policy"]
    print(f"\ncurrent: {out['domain']} {policy['version']} ({policy['source']})")
    _print_metrics(out["current"]["metrics"])
    if out["candidate"] is not None:
        policy = out["candidate"]["policy"]
        print(f"\ncandidate: {out['domain']} {policy['version']} ({policy['source']})")
        _print_metrics(out["candidate"]["metrics"])
        print(f"\n{len(out['changes'])} example(s) change:")
        for change in out["changes"]:
            before, after = change["response_action"]
            labels = f"{change['prompt_label']}/{change['response_label']}"
            print(f"  {change['id']} (line {change['line']}, labels {labels}): "
                  f"prompt {' -> '.join(change['prompt_action'])}, response {before} -> {after}, "
                  f"interrupt at {change['interrupt_index'][0]} -> {change['interrupt_index'][1]}")  # fmt: skip
    if out["judge"] is not None:
        m = out["judge"]["metrics"]
        print(f"\njudge: {out['judge']['backend']} ({m['failed']} failed)")
        print(f"  {'':<9} {'strict P / R / F1':<24} {'loose P / R / F1':<24} n")
        for stage in ("prompt", "response"):
            print(f"  {stage:<9} {_scores(m[stage]['strict']):<24} {_scores(m[stage]['loose']):<24} "
                  f"{m[stage]['strict']['n']}")  # fmt: skip
        print(f"  prompts blocked: {m['prompt']['blocked']}; responses stopped on Unsafe "
              f"{_f(m['response']['stop_rate'], True)}, false interrupts on Safe "
              f"{_f(m['response']['false_interrupt_rate'], True)}; "
              f"{_f(m['ms_per_example'])} ms per example")  # fmt: skip
    if out["sweep"]:
        print(f"\nsweep of {out['sweep'][0]['param']}:")
        print(f"  {'value':>6} {'prompt F1':>10} {'response F1':>12} {'stop rate':>10} {'false int.':>10} "
              f"{'first sent.':>11}")  # fmt: skip
        for row in out["sweep"]:
            m = row["metrics"]
            print(f"  {row['value']:>6} {_f(m['prompt']['strict']['f1']):>10} {_f(m['response']['strict']['f1']):>12} "
                  f"{_f(m['response']['stop_rate'], True):>10} {_f(m['response']['false_interrupt_rate'], True):>10} "
                  f"{_f(m['timeliness']['at_first_sentence'], True):>11}")  # fmt: skip


def add_parser(sub) -> None:
    ev = sub.add_parser("eval", help="replay a labelled JSONL data set under a domain's policy and measure it")
    ev.add_argument(
        "--data", required=True, help="JSONL: {messages, prompt_label?, response_label?, unsafe_start?, id?}"
    )
    ev.add_argument("--model", default="demo", help="stream guard checkpoint directory, or 'demo' (default)")
    ev.add_argument("--domain", default="default", help="the policy to evaluate (default: default)")
    ev.add_argument("--policies", default="policies", help="policy directory (default ./policies)")
    ev.add_argument(
        "--against", default=None, help="a candidate policy directory: its metrics and every changed action"
    )
    ev.add_argument("--sweep", default=None, help="e.g. threshold=0.3:0.9:0.1 or debounce=1:4:1: metrics per value")
    judge = ev.add_mutually_exclusive_group()
    judge.add_argument("--judge", default=None, help="also score a Generative judge: a checkpoint directory or 'demo'")
    judge.add_argument("--endpoint", default=None, help="... or an OpenAI-compatible endpoint serving one")
    ev.add_argument("--json", action="store_true", help="print one JSON object (see the module doc)")
    ev.add_argument("--report", default=None, help="write an HTML report with plots (index.html) into this directory")
    ev.add_argument("--concurrency", type=int, default=32, help="examples in flight (the engine batches them)")
    ev.add_argument("--device", default="cpu")
    ev.add_argument("--dtype", default="float32")
    ev.set_defaults(func=cmd_eval)
