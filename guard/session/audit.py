"""Audit records of one response's decisions, transport-free: what the guard decided, for whom,
under which policy version, with which model, and a SHA-256 of the judged text, never the text
itself (unless the operator turns content logging on).

A :class:`ResponseSession` given an :class:`AuditTrail` writes one record per decision that is
not a plain CONTINUE/ALLOW (a blocked or flagged prompt, a FLAG, REDACT or INTERRUPT chunk, a
fail-mode decision) and one when the response ends. Where the records go is the sink's business
(server/audit.py writes JSON lines).
"""

from __future__ import annotations

import hashlib
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from guard.policy.actions import Action
from guard.policy.rules import Policy

log = logging.getLogger(__name__)

AuditSink = Callable[[dict[str, Any]], None]
QUIET = frozenset({Action.CONTINUE, Action.ALLOW})


@dataclass(frozen=True)
class AuditContext:
    """Who and what a response belongs to."""

    request_id: str
    front_end: str  # moderate, generate, ext_proc, openai, reasoner, parscale, judge
    tenant: str = ""
    model: str = ""
    model_digest: str = ""


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8", "surrogatepass")).hexdigest()


class AuditTrail:
    def __init__(self, sink: AuditSink, context: AuditContext, policy: Policy, *, log_content: bool = False,
                 end_record: bool = True, on_error: Callable[[], None] = lambda: None) -> None:  # fmt: skip
        self.sink = sink
        self.context = context
        self.policy = policy
        self.log_content = log_content
        self.ended = not end_record  # e.g. a document window: its decisions only, no end of its own
        self.on_error = on_error

    def _write(self, kind: str, stage: str, fields: dict[str, Any], text: Callable[[], str] | None) -> None:
        """Build and hand over one record; an audit failure is counted, never the stream's."""
        try:
            c = self.context
            now = time.time()
            record: dict[str, Any] = {
                "time": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{int(now % 1 * 1000):03d}Z",
                "kind": kind,
                "request_id": c.request_id,
                "tenant": c.tenant,
                "front_end": c.front_end,
                "stage": stage,
                "domain": self.policy.name,
                "policy_version": self.policy.version,
                "model": c.model,
                "model_digest": c.model_digest,
                **fields,
            }
            if text is not None:
                judged = text()
                record["text_sha256"] = sha256(judged)
                if self.log_content:
                    record["text"] = judged
            self.sink(record)
        except Exception:
            log.exception("event=audit_record_failed kind=%s", kind)
            self.on_error()

    def prompt(self, action: Action, category: str, risk: str, fail_mode: str, text: Callable[[], str]) -> None:
        """The prompt's decision, when it is not a plain ALLOW (or the fail mode made it)."""
        if action in QUIET and not fail_mode:
            return
        fields = {"action": action.name, "category": category, "risk": risk, "fail_mode": fail_mode}
        self._write("decision", "prompt", fields, text)

    def chunk(self, action: Action, category: str, offset: int | None, judged: int, fail_mode: str,
              text: Callable[[], str]) -> None:  # fmt: skip
        """A response chunk's decision, when it is not a plain CONTINUE; ``offset``: the response
        token it concerns; ``text``: the chunk's judged text (its SHA-256 goes in the record)."""
        if action in QUIET and not fail_mode:
            return
        fields = {"action": action.name, "category": category, "offset": offset, "tokens_judged": judged,
                  "fail_mode": fail_mode}  # fmt: skip
        self._write("decision", "response", fields, text)

    def end(self, outcome: str, reason: str, judged: int, released: int, withheld: int, fail_mode: str,
            text: Callable[[], str]) -> None:  # fmt: skip
        """Once per response, however it ended."""
        if self.ended:
            return
        self.ended = True
        fields = {"outcome": outcome, "reason": reason, "tokens_judged": judged, "tokens_released": released,
                  "tokens_withheld": withheld, "fail_mode": fail_mode}  # fmt: skip
        self._write("end", "response", fields, text)

    def judgment(self, stage: str, action: Action, categories: str, risk: str, refusal: bool | None,
                 fail_mode: str, text: Callable[[], str]) -> None:  # fmt: skip
        """A Generative judgment (Judge.Classify), when its action is not a plain ALLOW/CONTINUE or
        the fail mode made it; ``text``: the judged conversation."""
        if action in QUIET and not fail_mode:
            return
        fields = {"action": action.name, "category": categories, "risk": risk, "refusal": refusal,
                  "fail_mode": fail_mode}  # fmt: skip
        self._write("decision", stage, fields, text)

    def failure(self, stage: str, action: Action, fail_mode: str) -> None:
        """The fail mode decided outside a chunk (the upstream failed, an answer the guard cannot read)."""
        self._write("decision", stage, {"action": action.name, "category": "", "fail_mode": fail_mode}, None)
