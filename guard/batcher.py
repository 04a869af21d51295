"""One dynamic batcher for every model that serves independent requests in batches (the local
judge, the embedder and the reranker; ParScale next).

Callers on any thread ``submit`` an item and get a ``concurrent.futures.Future`` (async callers
``await asyncio.wrap_future(...)``). One worker thread, so the model work stays off the event loop,
takes what is queued once the oldest item has waited ``wait_ms`` or ``max_batch`` items are there
(or, with ``cost``, once the queued items' cost reaches ``max_cost``: e.g. a token budget, which
also bounds each batch), optionally splits the batch into homogeneous groups (``group_by``), and
calls ``run(items)`` once per group. ``run`` returns one result per item, in order; an
``Exception`` in its place fails only that item, and an exception raised by ``run`` fails only
that group.

Guarantees:
- the queue is bounded: ``submit`` raises ``LimitExceeded`` naming ``max_queue`` when it is full
  (and ``max_queued_cost`` when the queued items' cost would pass it: e.g. tokens, which bound the
  memory queued images hold; an item alone in the queue is always taken);
- a future cancelled before its batch starts leaves the queue at once (no place in the queue, a
  batch or the cost budget) and is never computed; once a batch starts,
  its futures are running and can no longer be cancelled (a caller that stops waiting, e.g.
  ``asyncio.wait_for`` timing out, only cancels its own wrapper), so delivering never fails;
- the worker never dies of a request: every failure lands in the futures it concerns;
- ``close`` fails what is still queued with ``EngineStopped``, lets the running batch finish,
  joins the worker, and may be called any number of times.

Each result comes back as ``Batched``: the value with its queue wait and its group's compute time.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable, Hashable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass
from typing import Generic, TypeVar

from guard.errors import EngineStopped, LimitExceeded

log = logging.getLogger(__name__)

T = TypeVar("T")  # an item as submitted
R = TypeVar("R")  # its result
V = TypeVar("V")


@dataclass(frozen=True)
class Batched(Generic[R]):
    """A result and what it cost: submitted -> its group started, and the group's compute time."""

    value: R
    queue_s: float
    compute_s: float
    batch_size: int  # items computed together with this one (its group)


@dataclass(eq=False)  # compared by identity (removal from the queue)
class _Entry(Generic[T, R]):
    item: T
    future: Future[Batched[R]]
    enqueued: float
    cost: int = 0


class Batcher(Generic[T, R]):
    def __init__(
        self,
        run: Callable[[list[T]], Sequence[R | Exception]],
        *,
        name: str,
        max_batch: int = 8,
        wait_ms: float = 5.0,
        max_queue: int = 1024,
        group_by: Callable[[T], Hashable] | None = None,
        cost: Callable[[T], int] | None = None,
        max_cost: int | None = None,
        max_queued_cost: int | None = None,
    ) -> None:
        if max_batch < 1 or max_queue < 1 or wait_ms < 0 or (max_cost is not None and max_cost < 1):
            raise ValueError(
                f"{name} batcher: max_batch, max_queue and max_cost must be >= 1 and wait_ms >= 0, "
                f"got max_batch={max_batch} max_queue={max_queue} max_cost={max_cost} wait_ms={wait_ms}"
            )
        if (cost is None) != (max_cost is None) or (max_queued_cost is not None and cost is None):
            raise ValueError(f"{name} batcher: `cost` and `max_cost` go together (`max_queued_cost` needs them)")
        self.name, self.max_batch, self.wait_s, self.max_queue = name, max_batch, wait_ms / 1000, max_queue
        self.max_cost, self.max_queued_cost = max_cost, max_queued_cost
        self._run, self._group_by, self._cost = run, group_by, cost
        self._queued_cost = 0
        self._pending: deque[_Entry[T, R]] = deque()
        self._cond = threading.Condition()
        self._closed = False
        self._worker = threading.Thread(target=self._loop, name=f"{name}-batcher", daemon=True)
        self._worker.start()

    def submit(self, item: T) -> Future[Batched[R]]:
        """Queue ``item``; cancel the future to withdraw it while it is still queued."""
        future: Future[Batched[R]] = Future()
        with self._cond:
            if self._closed:
                raise EngineStopped(f"the {self.name} batcher is closed (shutting down); no new requests are taken")
            if len(self._pending) >= self.max_queue:
                raise LimitExceeded(
                    f"the {self.name} queue is full: {self.max_queue} requests waiting (max_queue={self.max_queue}); "
                    "retry later or raise the limit"
                )
            entry = _Entry(item, future, time.perf_counter(), self._cost(item) if self._cost else 0)
            over = self.max_queued_cost is not None and self._queued_cost + entry.cost > self.max_queued_cost
            if over and self._pending:
                raise LimitExceeded(
                    f"the {self.name} queue is full: {self._queued_cost} tokens waiting and this request brings "
                    f"{entry.cost} (max_queue_tokens={self.max_queued_cost}); retry later or raise the limit"
                )
            self._pending.append(entry)
            self._queued_cost += entry.cost
            self._cond.notify()
        future.add_done_callback(lambda f: self._withdraw(entry) if f.cancelled() else None)
        return future

    def _withdraw(self, entry: _Entry[T, R]) -> None:
        """A request cancelled while queued leaves the queue at once: it holds no place in the
        queue, in a batch or in the cost budget."""
        with self._cond:
            try:
                self._pending.remove(entry)
            except ValueError:  # already taken by the worker (it skips cancelled entries)
                return
            self._queued_cost -= entry.cost

    def close(self, timeout: float = 10.0) -> None:
        """Fail what is queued, let the running batch finish, join the worker. Idempotent."""
        with self._cond:
            self._closed = True
            dropped = list(self._pending)
            self._pending.clear()
            self._queued_cost = 0
            self._cond.notify_all()
        closed = EngineStopped(f"the {self.name} batcher closed (shutting down) before this request ran")
        for entry in dropped:
            if entry.future.set_running_or_notify_cancel():
                entry.future.set_exception(closed)
        if threading.current_thread() is not self._worker:
            self._worker.join(timeout)
            if self._worker.is_alive():
                log.warning("event=batcher_close_timeout batcher=%s timeout_s=%s", self.name, timeout)

    # ------------------------------------------------------------------ worker

    def _take(self) -> list[_Entry[T, R]] | None:
        """The next batch: wait for a first item, then until it is ``wait_s`` old, the batch is
        full or the queued cost reaches ``max_cost``. None once closed. A batch never exceeds
        ``max_cost`` except for a single item that alone costs more (it runs alone)."""
        with self._cond:
            while True:
                if self._closed:
                    return None
                if not self._pending:
                    self._cond.wait()
                    continue
                left = self._pending[0].enqueued + self.wait_s - time.perf_counter()
                full = self.max_cost is not None and self._queued_cost >= self.max_cost
                if len(self._pending) >= self.max_batch or full or left <= 0:
                    return self._pop_batch()
                self._cond.wait(left)

    def _pop_batch(self) -> list[_Entry[T, R]]:
        batch = [self._pending.popleft()]
        spent = batch[0].cost
        while self._pending and len(batch) < self.max_batch:
            nxt = self._pending[0]
            if self.max_cost is not None and spent + nxt.cost > self.max_cost:
                break
            batch.append(self._pending.popleft())
            spent += nxt.cost
        self._queued_cost -= spent
        return batch

    def _loop(self) -> None:
        while (batch := self._take()) is not None:
            # claim each future: a cancelled one is dropped, a claimed one can no longer be cancelled
            live = [e for e in batch if e.future.set_running_or_notify_cancel()]
            groups: dict[Hashable, list[_Entry[T, R]]] = {}
            for entry in live:
                try:
                    key = self._group_by(entry.item) if self._group_by else None
                except Exception as exc:  # a bad item fails alone
                    entry.future.set_exception(exc)
                    continue
                groups.setdefault(key, []).append(entry)
            for group in groups.values():
                self._compute(group)

    def _compute(self, group: list[_Entry[T, R]]) -> None:
        started = time.perf_counter()
        try:
            results = self._run([e.item for e in group])
            if len(results) != len(group):
                raise RuntimeError(f"{self.name}: run returned {len(results)} results for {len(group)} items")
        except Exception as exc:  # a failed group fails its own requests, never the worker
            log.exception("event=batch_failed batcher=%s size=%d", self.name, len(group))
            for entry in group:
                entry.future.set_exception(exc)
            return
        elapsed = time.perf_counter() - started
        for entry, result in zip(group, results, strict=True):
            if isinstance(result, Exception):
                entry.future.set_exception(result)
            else:
                entry.future.set_result(Batched(result, started - entry.enqueued, elapsed, len(group)))


def then(source: Future[T], fn: Callable[[T], V]) -> Future[V]:
    """A future of ``fn(source's result)`` (or of its exception). Cancelling it cancels ``source``
    (withdrawing a queued request); once it is resolved, or cancelled, a late result is dropped."""
    out: Future[V] = Future()
    out.add_done_callback(lambda f: source.cancel() if f.cancelled() else None)

    def deliver(done: Future[T]) -> None:
        if done.cancelled():
            out.cancel()
        elif out.set_running_or_notify_cancel():  # False: the caller cancelled meanwhile
            if (exc := done.exception()) is not None:
                out.set_exception(exc)
                return
            try:
                out.set_result(fn(done.result()))
            except Exception as error:  # fn failed: the caller gets it
                out.set_exception(error)

    source.add_done_callback(deliver)
    return out
