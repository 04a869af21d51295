"""What a verdict tells the caller to do. Policies map verdicts to these."""

from __future__ import annotations

import enum


class Action(enum.Enum):
    CONTINUE = "continue"  # response: nothing to do
    ALLOW = "allow"  # prompt: generate; response: treat as safe
    FLAG = "flag"  # continue and record
    REDACT = "redact"  # response: replace the span with a marker and continue
    INTERRUPT = "interrupt"  # response: stop it (and the upstream generation)
    BLOCK = "block"  # prompt: refuse before generation


PROMPT_ACTIONS = (Action.ALLOW, Action.FLAG, Action.BLOCK)
RESPONSE_ACTIONS = (Action.CONTINUE, Action.ALLOW, Action.FLAG, Action.REDACT, Action.INTERRUPT)
