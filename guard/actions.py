"""The built-in verdict -> action mapping, used until a domain policy supplies its own.

Prompt: Unsafe -> BLOCK, Controversial -> FLAG, Safe -> ALLOW.
Response tokens: non-safe under the rules (Unsafe, or Controversial in strict mode) ->
INTERRUPT once the debounce rule fires, Controversial in loose mode -> FLAG, Safe -> CONTINUE.
"""

from __future__ import annotations

import enum

from guard.labels import RiskLevel
from guard.moderation import ChunkVerdict
from guard.verdict import TokenVerdict, Verdict


class Action(enum.Enum):
    CONTINUE = "continue"
    FLAG = "flag"
    REDACT = "redact"
    INTERRUPT = "interrupt"
    ALLOW = "allow"
    BLOCK = "block"


def prompt_action(verdict: Verdict) -> Action:
    return {RiskLevel.UNSAFE: Action.BLOCK, RiskLevel.CONTROVERSIAL: Action.FLAG}.get(verdict.risk, Action.ALLOW)


def token_action(token: TokenVerdict) -> Action:
    if token.counts_unsafe:
        return Action.INTERRUPT
    return Action.CONTINUE if token.verdict.risk is RiskLevel.SAFE else Action.FLAG


def chunk_action(chunk: ChunkVerdict) -> Action:
    """INTERRUPT once the rule has fired; FLAG when any token was non-safe; else CONTINUE."""
    if chunk.flag_index is not None:
        return Action.INTERRUPT
    if any(t.verdict.risk is not RiskLevel.SAFE for t in chunk.tokens):
        return Action.FLAG
    return Action.CONTINUE
