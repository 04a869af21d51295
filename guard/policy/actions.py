"""What a verdict tells the caller to do. Policies map verdicts to these."""

from __future__ import annotations

import enum
from collections.abc import Iterable


class Action(enum.Enum):
    CONTINUE = "continue"  # response: nothing to do
    ALLOW = "allow"  # prompt: generate; response: treat as safe
    FLAG = "flag"  # continue and record
    REDACT = "redact"  # response: replace the span with a marker and continue
    INTERRUPT = "interrupt"  # response: stop it (and the upstream generation)
    BLOCK = "block"  # prompt: refuse before generation


PROMPT_ACTIONS = (Action.ALLOW, Action.FLAG, Action.BLOCK)
RESPONSE_ACTIONS = (Action.CONTINUE, Action.ALLOW, Action.FLAG, Action.REDACT, Action.INTERRUPT)
# Least to most severe: where several decisions apply (categories, chunks), the strictest wins.
SEVERITY = (Action.CONTINUE, Action.ALLOW, Action.FLAG, Action.REDACT, Action.INTERRUPT, Action.BLOCK)


def strictest(actions: Iterable[Action]) -> Action:
    return max(actions, key=SEVERITY.index)
