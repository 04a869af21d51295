"""The audit log: one JSON line per guard decision and per response end (guard/session/audit.py
makes the records), to stdout or to a file rotated by size.

Records are handed to a writer thread through a bounded queue, so a slow disk never stalls the
event loop (every stream). Nothing is lost silently: a record that cannot be written (the disk
fails, or the queue is full because it is too slow) is counted
(``guard_audit_write_failures_total``) and turns the audit health name (``qwen3guard.audit``)
NOT_SERVING until a write succeeds again."""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import os
import queue
import sys
import threading
import time
from collections.abc import Callable
from typing import Any

from guard.policy.rules import Policy
from guard.session.audit import AuditContext, AuditSink, AuditTrail
from server.metrics import Metrics

HEALTH_NAME = "qwen3guard.audit"
QUEUE_RECORDS = 10_000  # records waiting for the writer (a slow disk; beyond: counted as failed)
WRITE_BATCH = 256  # records written (and flushed) together
GATHER_S = 0.005  # how long the writer lets records gather after the first (a record waits at most this)
_STOP = object()

log = logging.getLogger(__name__)


class AuditLog:
    def __init__(self, target: str, metrics: Metrics, *, max_bytes: int, backups: int, log_content: bool,
                 queue_records: int = QUEUE_RECORDS) -> None:  # fmt: skip
        """``target``: "-" for stdout, or a file path (rotated at ``max_bytes``, ``backups`` kept)."""
        self._file: logging.handlers.RotatingFileHandler | None = None
        if target != "-":  # the rotation logic of the standard library's handler, driven by our thread
            self._file = logging.handlers.RotatingFileHandler(target, maxBytes=max_bytes, backupCount=backups,
                                                              encoding="utf-8")  # fmt: skip
        self._size = self._file.stream.tell() if self._file is not None else 0  # bytes in the current file
        self._rotates = self._file is not None and max_bytes > 0 and os.path.isfile(target)  # never a device
        self.metrics = metrics
        self.log_content = log_content
        self.healthy = True
        self.on_health: Callable[[bool], None] = lambda healthy: None  # called on the writer thread
        self._queue: queue.Queue = queue.Queue(maxsize=queue_records)
        self._lock = threading.Lock()  # the health state, from the loop (a full queue) and the writer
        self._closed = False
        self._writer = threading.Thread(target=self._run, name="guard-audit", daemon=True)
        self._writer.start()

    def write(self, record: dict[str, Any]) -> None:
        """Queue one record (never blocks the caller)."""
        self.metrics.audit_records.labels(record["kind"]).inc()
        if self._closed:
            self._result(False)  # after the drain: counted, not silently dropped
            return
        try:
            self._queue.put_nowait(json.dumps(record, ensure_ascii=False, separators=(",", ":")))
        except queue.Full:
            self._result(False)

    def trail(self, policy: Policy, context: AuditContext, *, end_record: bool = True,
              also: AuditSink | None = None) -> AuditTrail:  # fmt: skip
        """A response's trail into this log (and ``also`` into another sink: the trace span)."""
        sink = self.write
        if also is not None:

            def sink(record: dict) -> None:
                also(record)
                self.write(record)

        return AuditTrail(sink, context, policy, log_content=self.log_content, end_record=end_record,
                          on_error=lambda: self._result(False))  # fmt: skip

    def _run(self) -> None:
        """Write what is queued in batches: one flush per batch, not per record."""
        stop = False
        while not stop:
            lines = [self._queue.get()]
            time.sleep(GATHER_S)  # let a batch gather: a put then wakes no thread (no GIL hand-off per record)
            while len(lines) < WRITE_BATCH:
                try:
                    lines.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            if _STOP in lines:
                stop = True
                lines = lines[: lines.index(_STOP)]
            if lines:
                ok = self._write_lines(lines)
                for _ in lines:
                    self._result(ok)

    def _write_lines(self, lines: list[str]) -> bool:
        try:
            if self._file is None:
                sys.stdout.write("".join(line + "\n" for line in lines))
                sys.stdout.flush()
                return True
            for line in lines:
                data = line + "\n"
                size = len(data.encode())
                if self._rotates and self._size and self._size + size > self._file.maxBytes:
                    self._file.stream.flush()
                    self._file.doRollover()  # the standard library's rotation (renames, backups)
                    self._size = 0
                self._file.stream.write(data)
                self._size += size
            self._file.stream.flush()  # once per batch
            return True
        except Exception:
            return False

    def _result(self, ok: bool) -> None:
        if not ok:
            self.metrics.audit_failures.inc()
        with self._lock:
            changed, self.healthy = ok != self.healthy, ok
        if changed:
            log.log(logging.INFO if ok else logging.ERROR, "event=audit_log_%s", "recovered" if ok else "failing")
            self.on_health(ok)

    def close(self) -> None:
        """Write what is queued, then stop the writer and close the file."""
        self._closed = True
        with contextlib.suppress(queue.Full):  # a writer stuck on a dead disk does not hold the drain
            self._queue.put(_STOP, timeout=10)
        self._writer.join(10)
        if self._file is not None:
            with contextlib.suppress(OSError):  # its last flush failed: each record was already counted failed
                self._file.close()
