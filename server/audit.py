"""The audit log: one JSON line per guard decision and per response end (guard/session/audit.py
makes the records), to stdout or to a file rotated by size. Writing never loses a decision
silently: a failed write is counted (``guard_audit_write_failures_total``) and turns the audit
health name (``qwen3guard.audit``) NOT_SERVING until a write succeeds again."""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import sys
from collections.abc import Callable
from typing import Any

from guard.policy.rules import Policy
from guard.session.audit import AuditContext, AuditTrail
from server.metrics import Metrics

HEALTH_NAME = "qwen3guard.audit"


class _Handler(logging.Handler):
    """Reports the outcome of every write (logging handlers swallow errors by default)."""

    def __init__(self, inner: logging.Handler, on_result: Callable[[bool], None]) -> None:
        super().__init__()
        self.inner, self.on_result = inner, on_result
        self.inner.handleError = lambda record: None  # we report it below, not as a stderr traceback

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.inner.acquire()
            try:
                if isinstance(self.inner, logging.handlers.RotatingFileHandler) and self.inner.shouldRollover(record):
                    self.inner.doRollover()
                stream = self.inner.stream
                stream.write(record.getMessage() + "\n")
                stream.flush()
            finally:
                self.inner.release()
        except Exception:
            self.on_result(False)
        else:
            self.on_result(True)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # its last flush failed: each record was already reported failed
            self.inner.close()
        super().close()


class AuditLog:
    def __init__(self, target: str, metrics: Metrics, *, max_bytes: int, backups: int, log_content: bool) -> None:
        """``target``: "-" for stdout, or a file path (rotated at ``max_bytes``, ``backups`` kept)."""
        if target == "-":
            inner: logging.Handler = logging.StreamHandler(sys.stdout)
        else:
            inner = logging.handlers.RotatingFileHandler(target, maxBytes=max_bytes, backupCount=backups,
                                                         encoding="utf-8", delay=False)  # fmt: skip
        self.metrics = metrics
        self.log_content = log_content
        self.healthy = True
        self.on_health: Callable[[bool], None] = lambda healthy: None
        self._handler = _Handler(inner, self._written)
        self._logger = logging.Logger("qwen3guard.audit")  # not in the logging tree: never mixed with logs
        self._logger.addHandler(self._handler)

    def _written(self, ok: bool) -> None:
        if not ok:
            self.metrics.audit_failures.inc()
        if ok != self.healthy:
            self.healthy = ok
            self.on_health(ok)

    def write(self, record: dict[str, Any]) -> None:
        self.metrics.audit_records.labels(record["kind"]).inc()
        self._logger.info("%s", json.dumps(record, ensure_ascii=False, separators=(",", ":")))

    def trail(self, policy: Policy, context: AuditContext) -> AuditTrail:
        return AuditTrail(self.write, context, policy, log_content=self.log_content)

    def close(self) -> None:
        self._handler.close()
