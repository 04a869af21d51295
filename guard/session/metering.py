"""Charging the tokens a response session judges to whoever asked for it.

The server's tenant limits (server/auth.py) put a meter in the request's context; every
ResponseSession created while handling that request takes it, whichever front end created the
session, so no front end can forget the limit. Tokens are charged after they are submitted (a
text chunk's token count is known only then) and a meter in debt refuses the next chunk: a
token bucket that may go below zero once, never twice.
"""

from __future__ import annotations

from contextvars import ContextVar
from typing import Protocol


class TokenMeter(Protocol):
    def admit(self) -> None:
        """Raise guard.errors.RateLimited when no more tokens may be judged now."""

    def charge(self, tokens: int) -> None:
        """Count ``tokens`` just submitted for judging."""


current_meter: ContextVar[TokenMeter | None] = ContextVar("current_meter", default=None)
