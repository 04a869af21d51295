"""`guard policy check|explain`: validate the policy files, show a domain's effective table."""

from __future__ import annotations

import sys
from pathlib import Path


def cmd_policy_check(args) -> int:
    from guard.policy.loader import PolicyError, check_path

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
    from guard.model.labels import RiskLevel
    from guard.policy.loader import PolicyError, check_path

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
    print(f"reasoning       {'moderated' if p.moderate_reasoning else 'not moderated (the answer only)'}")
    for topic in p.topics:
        rule = f"similarity >= {topic.threshold:g}, {len(topic.examples)} examples"
        print(f"topic {topic.name:<16} {topic.action.name:<5} {rule}")
    return 0


def add_parser(sub) -> None:
    policy = sub.add_parser("policy", help="check or explain the per-domain policies")
    policy_sub = policy.add_subparsers(dest="policy_command", required=True)
    check = policy_sub.add_parser("check", help="validate a policy directory or file (file:line: field: error)")
    check.add_argument("path", help="a directory of *.yaml policies, or one file")
    check.set_defaults(func=cmd_policy_check)
    explain = policy_sub.add_parser("explain", help="print a domain's effective policy after inheritance")
    explain.add_argument("domain")
    explain.add_argument("--policies", default="policies", help="policy directory (default ./policies)")
    explain.set_defaults(func=cmd_policy_explain)

