"""The stream engine: sessions with their own KV cache slots, and one scheduler that batches the
pending chunks of many sessions into a single forward pass per step.

Threading model: callers (the gRPC event loop, the CLI, tests) submit work from any thread and
get futures back: ``concurrent.futures.Future`` objects, or futures of the caller's asyncio loop
for a session opened with ``loop=``. One worker thread owns the model and the KV pool, plans
each step under the lock and runs the forward pass outside it. Only the worker touches the pool,
so slots are allocated, grown and freed without races. The worker does model work only: the
step's head outputs (probabilities and their argmaxes, for the whole batch at once) are sliced
per chunk and handed to each event loop in one batch per step (``guard.delivery``); verdicts,
policies and release run on the callers' side.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from enum import Enum

import numpy as np
import torch

from guard.delivery import AnyFuture, Outcome, new_future, settle
from guard.errors import (
    ContextTooLong,
    EngineStopped,
    InvalidInput,
    LimitExceeded,
    ModelFailed,
    SessionClosed,
    SessionExpired,
)
from guard.model.checkpoint import LoadedGuard
from guard.model.kv_cache import CacheFull, StepLayout, StepRow

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class EngineLimits:
    """Memory and scheduling bounds; every default works on a laptop CPU."""

    max_sessions: int = 256
    max_tokens_per_session: int = 8192  # prompt + response, bounds the KV cache of one session
    max_chunk_tokens: int = 1024  # one submitted chunk
    max_queued_chunks: int = 4096  # across all sessions, back-pressure beyond this
    idle_timeout_s: float = 300.0  # a session with no activity for this long is closed
    max_step_tokens: int = 2048  # tokens in one forward pass, all sessions together
    max_row_tokens: int = 512  # tokens of one session in one step (chunked prefill)
    max_kv_cache_bytes: int | None = None  # cap on the pooled KV cache; None = bounded by the limits above
    # Idle, the pool keeps its first allocation so the next session does not allocate on its way in;
    # True gives every byte back instead (a memory-tight CPU host).
    release_idle_kv_cache: bool = False
    # A step waits at most this long for the sessions of the previous step to come back, so they
    # share one forward pass instead of trickling into several (0: start as soon as any is ready).
    max_batch_wait_ms: float = 2.0
    # A forward pass of fewer tokens runs on one intra-op thread. Alone, the engine is fastest on
    # all of torch's threads (0); in the sidecar, splitting a few rows over the pool costs more
    # than it saves (waking workers, workers spinning on the cores the event loop and gRPC need).
    min_parallel_tokens: int = 0

    def __post_init__(self) -> None:
        for name in (
            "max_sessions",
            "max_tokens_per_session",
            "max_chunk_tokens",
            "max_queued_chunks",
            "max_step_tokens",
            "max_row_tokens",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")
        if self.idle_timeout_s <= 0:
            raise ValueError(f"`idle_timeout_s` must be > 0, got {self.idle_timeout_s}")
        if self.min_parallel_tokens < 0:
            raise ValueError(f"`min_parallel_tokens` must be >= 0, got {self.min_parallel_tokens}")
        if not 0 <= self.max_batch_wait_ms <= 1000:
            raise ValueError(f"`max_batch_wait_ms` must be in [0, 1000], got {self.max_batch_wait_ms}")


class WorkKind(Enum):
    PROMPT = "prompt"  # query heads read at its last token
    PREAMBLE = "preamble"  # template tokens between prompt and response: cached, not reported
    RESPONSE = "response"  # response heads read at every token


@dataclass(frozen=True)
class PromptScores:
    """Query-head probabilities at the ``<|im_end|>`` closing the last user turn."""

    risk_probs: np.ndarray  # [num_query_risk]
    category_probs: np.ndarray  # [num_query_category]
    prompt_tokens: int
    compute_s: float


@dataclass(frozen=True)
class ChunkScores:
    """Response-head probabilities for every token of one submitted chunk."""

    token_ids: tuple[int, ...]
    first_index: int  # response index of token_ids[0]
    risk_probs: np.ndarray  # [T, num_risk]
    category_probs: np.ndarray  # [T, num_category]
    risk_index: list[int]  # [T] argmax of risk_probs (computed once per step for the whole batch)
    category_index: list[int]  # [T] argmax of category_probs
    risk_probability: list[float]  # [T] probability of the argmax risk label
    queue_s: float  # submitted -> first scheduled
    compute_s: float  # first scheduled -> last token judged
    step_rows: int  # sessions batched in the step that finished this chunk


@dataclass(frozen=True)
class StepStats:
    """Reported after each forward pass (metrics hook)."""

    rows: int
    tokens: int
    compute_s: float
    kv_bytes: int
    threads: int = 1  # intra-op threads the pass ran on


@dataclass
class _Work:
    kind: WorkKind
    ids: list[int]
    future: AnyFuture
    first_index: int = 0
    scheduled: int = 0
    enqueued_at: float = field(default_factory=time.perf_counter)
    started_at: float | None = None
    parts: list[tuple] = field(default_factory=list)  # per step: probabilities, argmaxes, chosen probability


@dataclass
class EngineSession:
    """One response being moderated. Handles are opaque to callers; use the engine's methods."""

    id: str
    prompt_tokens: int
    slot: int | None = None
    cached: int = 0  # tokens whose K/V are in the slot
    accepted: int = 0  # tokens accepted (cached + queued)
    response_tokens: int = 0  # response tokens accepted
    queue: deque[_Work] = field(default_factory=deque)
    in_ready: bool = False
    closed_reason: str | None = None
    closed_error: type[SessionClosed] = SessionClosed  # what later calls on the closed session raise
    last_active: float = field(default_factory=time.monotonic)
    loop: asyncio.AbstractEventLoop | None = None  # futures of this loop, else thread-safe ones

    @property
    def closed(self) -> bool:
        return self.closed_reason is not None


@dataclass
class _PlannedRow:
    session: EngineSession
    row: StepRow
    pieces: list[tuple[_Work, int, int]]  # (work, offset in work, count), in row order


class StreamEngine:
    """Batched, cached per-token scoring for many concurrent sessions."""

    def __init__(
        self,
        guard: LoadedGuard,
        limits: EngineLimits | None = None,
        *,
        on_step: Callable[[StepStats], None] | None = None,
    ) -> None:
        self.guard = guard
        self.model = guard.model
        self.config = guard.config
        self.limits = limits or EngineLimits()
        self.device = self.model.model.embed_tokens.weight.device
        self.cache = self.model.new_cache(
            max_slots=self.limits.max_sessions,
            max_tokens=self.limits.max_tokens_per_session,
            max_bytes=self.limits.max_kv_cache_bytes,
            keep_idle=not self.limits.release_idle_kv_cache,
        )
        self._on_step = on_step
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self._sessions: dict[str, EngineSession] = {}
        self._ready: deque[EngineSession] = deque()
        self._release: list[int] = []  # slots of closed sessions, freed by the worker
        self._barriers: list[Future] = []
        self._vocab = self.config.vocab_size
        self._queued = 0
        self._last_rows = 0  # sessions in the previous step: how many the next one waits for
        self._wanted = 1  # ready sessions that wake the worker (more while it gathers a batch)
        self._stopping = False
        self.steps = 0
        self.tokens_scored = 0
        self._worker = threading.Thread(target=self._run, name="guard-engine", daemon=True)
        self._worker.start()

    # ----------------------------------------------------------------- public API (any thread)

    @property
    def live_sessions(self) -> int:
        with self._lock:
            return len(self._sessions)

    @property
    def queued_chunks(self) -> int:
        with self._lock:
            return self._queued

    def open_session(
        self,
        prompt_ids: Sequence[int],
        preamble_ids: Sequence[int] = (),
        *,
        session_id: str | None = None,
        loop: asyncio.AbstractEventLoop | None = None,
    ) -> tuple[EngineSession, AnyFuture]:
        """Start a session: its prompt is prefilled once; the future gives the prompt scores.

        With ``loop``, this session's futures are futures of that event loop, settled on it in one
        hand-off per step (the sidecar's path); without, thread-safe futures settled in place."""
        prompt = self._checked_ids(prompt_ids, "prompt")
        preamble = self._checked_ids(preamble_ids, "preamble")
        if not prompt:
            raise InvalidInput("the prompt is empty: a session needs at least the <|im_end|> closing the user turn")
        total = len(prompt) + len(preamble)
        if total > self.limits.max_tokens_per_session:
            raise ContextTooLong(
                f"the prompt has {total} tokens; the limit per session is {self.limits.max_tokens_per_session}"
            )
        future = new_future(loop)
        with self._lock:
            self._check_open()
            if len(self._sessions) >= self.limits.max_sessions:
                raise LimitExceeded(f"{self.limits.max_sessions} sessions are live, the configured maximum")
            sid = session_id or uuid.uuid4().hex
            if sid in self._sessions:
                raise InvalidInput(f"a session with id {sid!r} is already open")
            session = EngineSession(id=sid, prompt_tokens=len(prompt), accepted=total, loop=loop)
            self._sessions[sid] = session
            session.queue.append(_Work(WorkKind.PROMPT, prompt, future))
            if preamble:
                session.queue.append(_Work(WorkKind.PREAMBLE, preamble, Future()))
            self._queued += len(session.queue)
            self._mark_ready(session)
        return session, future

    def submit(self, session: EngineSession, token_ids: Sequence[int]) -> AnyFuture:
        """Queue response tokens; the future resolves to their ChunkScores when all are judged."""
        ids = self._checked_ids(token_ids, "chunk")
        if len(ids) > self.limits.max_chunk_tokens:
            raise InvalidInput(f"the chunk has {len(ids)} tokens; at most {self.limits.max_chunk_tokens} are allowed")
        future = new_future(session.loop)
        with self._lock:
            self._check_live(session)
            session.last_active = time.monotonic()
            if session.accepted + len(ids) > self.limits.max_tokens_per_session:
                raise LimitExceeded(
                    f"session {session.id} would hold {session.accepted + len(ids)} tokens; "
                    f"the limit is {self.limits.max_tokens_per_session} per session"
                )
            if not ids:
                empty = self._empty_scores(session.response_tokens)
            elif self._queued >= self.limits.max_queued_chunks:
                raise LimitExceeded(f"{self._queued} chunks are queued, the configured maximum")
            else:
                work = _Work(WorkKind.RESPONSE, ids, future, first_index=session.response_tokens)
                session.accepted += len(ids)
                session.response_tokens += len(ids)
                session.queue.append(work)
                self._queued += 1
                self._mark_ready(session)
                return future
        settle([(future, empty, None)])  # outside the lock: callbacks may call back into the engine
        return future

    def close(self, session: EngineSession, reason: str = "closed", error: type[SessionClosed] = SessionClosed) -> None:
        """Close a session now: pending work fails with ``error`` and its slot is released."""
        with self._lock:
            failed = self._close_locked(session, reason, error)
        self._fail(failed, error(f"session {session.id} {reason}"))

    def barrier(self) -> Future[None]:
        """Resolves once the worker has released closed sessions' slots and planned the next step."""
        future: Future[None] = Future()
        with self._lock:
            self._barriers.append(future)
            self._wake.notify()
        return future

    @property
    def kv_cache_bytes(self) -> int:
        return self.cache.nbytes()

    def shutdown(self, timeout: float = 10.0) -> None:
        """Stop the worker; pending work fails with SessionClosed."""
        with self._lock:
            self._stopping = True
            failed = []
            for s in list(self._sessions.values()):
                failed += self._close_locked(s, "closed: the engine is shutting down")
            self._wake.notify_all()
        self._fail(failed, EngineStopped("the engine is shutting down"))
        self._worker.join(timeout)

    # ----------------------------------------------------------------- helpers (under the lock)

    def _checked_ids(self, ids: Sequence[int], what: str) -> list[int]:
        out = list(ids)
        vocab = self._vocab
        if not out or (set(map(type, out)) == {int} and min(out) >= 0 and max(out) < vocab):
            return out  # the common case, checked in C: plain ints inside the vocabulary
        for pos, tid in enumerate(out):
            if not isinstance(tid, int | np.integer) or isinstance(tid, bool):
                raise InvalidInput(f"{what} token id at position {pos} must be an integer, got {tid!r}")
            if not 0 <= tid < vocab:
                raise InvalidInput(f"{what} token id {tid} at position {pos} is outside the vocabulary [0, {vocab})")
        return [int(t) for t in out]

    def _check_open(self) -> None:
        if self._stopping:
            raise EngineStopped("the engine is shutting down")

    def _check_live(self, session: EngineSession) -> None:
        self._check_open()
        if session.closed:
            raise session.closed_error(f"session {session.id} is {session.closed_reason}")

    def _mark_ready(self, session: EngineSession) -> None:
        if not session.in_ready:
            session.in_ready = True
            self._ready.append(session)
            if len(self._ready) >= self._wanted:  # a gathering worker is woken once, not per arrival
                self._wake.notify()

    def _close_locked(
        self, session: EngineSession, reason: str, error: type[SessionClosed] = SessionClosed
    ) -> list[AnyFuture]:
        if session.closed:
            return []
        session.closed_reason = reason
        session.closed_error = error
        self._sessions.pop(session.id, None)
        failed = [w.future for w in session.queue]
        self._queued -= len(session.queue)
        session.queue.clear()
        if session.slot is not None:
            self._release.append(session.slot)
            session.slot = None
        self._wake.notify()
        return failed

    @staticmethod
    def _fail(futures: list[AnyFuture], error: Exception) -> None:
        settle([(f, None, error) for f in futures])  # an already resolved one keeps its result

    def _empty_scores(self, first_index: int) -> ChunkScores:
        cfg = self.config
        return ChunkScores(
            (),
            first_index,
            np.zeros((0, len(cfg.response_risk.labels)), np.float32),
            np.zeros((0, len(cfg.response_categories)), np.float32),
            [],
            [],
            [],
            0.0,
            0.0,
            0,
        )

    # ----------------------------------------------------------------- worker thread

    def _run(self) -> None:
        self._pool_threads = self._threads = torch.get_num_threads()  # this thread's; set per step below
        check_every = min(1.0, self.limits.idle_timeout_s / 4)
        next_expiry = time.monotonic() + check_every
        while True:
            with self._lock:
                while not (self._ready or self._stopping or self._release or self._barriers):
                    self._wake.wait(timeout=check_every)
                    if time.monotonic() >= next_expiry:
                        break
                if self._stopping:
                    self._release_slots()
                    for b in self._barriers:
                        b.set_result(None)
                    return
                expired = []
                if time.monotonic() >= next_expiry:
                    expired = self._expire_idle()
                    next_expiry = time.monotonic() + check_every
                self._gather()
                self._release_slots()
                plan, failed = self._plan_step()
                if plan:
                    self._last_rows = len(plan)
                barriers, self._barriers = self._barriers, []
            for futures, error in [*expired, *failed]:
                self._fail(futures, error)
            for b in barriers:
                b.set_result(None)
            if plan:
                try:
                    self._execute(plan)
                except Exception as exc:  # a failed step fails its sessions, never the worker
                    log.exception("event=step_failed rows=%d", len(plan))
                    for p in plan:
                        self.close(p.session, f"failed: the model step raised {type(exc).__name__}", ModelFailed)

    def _gather(self) -> None:
        """Wait (bounded by ``max_batch_wait_ms``) while fewer sessions are ready than the last
        step served. Their callers are turning their results into the next chunk; starting now
        would split them over two forward passes, each paying the fixed cost of a step, and the
        step would compete with those callers for the CPU. One stream never waits (1 >= 1)."""
        wait = self.limits.max_batch_wait_ms / 1000
        if wait <= 0 or len(self._ready) >= self._last_rows:
            return
        deadline = time.monotonic() + wait
        self._wanted = self._last_rows
        try:
            while len(self._ready) < self._last_rows and not (self._stopping or self._barriers):
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    break
                self._wake.wait(remaining)
        finally:
            self._wanted = 1
        if len(self._ready) < self._last_rows:
            self._last_rows = len(self._ready)

    def _expire_idle(self) -> list[tuple[list[Future], Exception]]:
        now = time.monotonic()
        out = []
        for s in list(self._sessions.values()):
            if not s.queue and now - s.last_active > self.limits.idle_timeout_s:
                reason = f"expired after {self.limits.idle_timeout_s:g} s idle"
                log.info("event=session_expired session=%s", s.id)
                out.append((self._close_locked(s, reason, SessionExpired), SessionExpired(f"session {s.id} {reason}")))
        return out

    def _release_slots(self) -> None:
        for slot in self._release:
            self.cache.free(slot)
        self._release.clear()

    def _plan_step(self) -> tuple[list[_PlannedRow], list[tuple[list[Future], Exception]]]:
        budget = self.limits.max_step_tokens
        plan: list[_PlannedRow] = []
        failed = []
        for _ in range(len(self._ready)):
            if budget <= 0:
                break
            session = self._ready.popleft()
            session.in_ready = False
            if session.closed or not session.queue:
                continue
            cap = min(budget, self.limits.max_row_tokens)
            try:
                if session.slot is None:
                    session.slot = self.cache.allocate()
                self.cache.reserve_tokens(session.cached + min(cap, self._unscheduled(session)))
            except CacheFull as exc:
                reason = f"failed: KV cache exhausted ({exc})"
                failed.append((self._close_locked(session, reason), LimitExceeded(str(exc))))
                self._release_slots()  # its slot (if it got one) is free for the next session in this plan
                continue
            pieces = []
            length = 0
            for work in session.queue:
                take = min(len(work.ids) - work.scheduled, cap - length)
                if take <= 0:
                    break
                pieces.append((work, work.scheduled, take))
                length += take
                if work.scheduled + take < len(work.ids):
                    break
            for work, offset, take in pieces:
                work.scheduled = offset + take
            plan.append(_PlannedRow(session, StepRow(session.slot, session.cached, length), pieces))
            session.cached += length
            budget -= length
            if self._unscheduled(session):
                self._mark_ready(session)
        plan.sort(key=lambda p: p.row.slot)  # contiguous slots let attention read views
        return plan, failed

    @staticmethod
    def _unscheduled(session: EngineSession) -> int:
        return sum(len(w.ids) - w.scheduled for w in session.queue)

    @contextlib.contextmanager
    def _threads_for(self, tokens: int) -> Iterator[None]:
        """One intra-op thread for a small forward pass, the whole pool for a large one. torch's
        setting is process-wide, so it is put back at once: other models (the judge) keep theirs."""
        if tokens >= self.limits.min_parallel_tokens or self._pool_threads == 1:
            self._threads = self._pool_threads
            yield
            return
        torch.set_num_threads(1)
        self._threads = 1
        try:
            yield
        finally:
            torch.set_num_threads(self._pool_threads)

    def _execute(self, plan: list[_PlannedRow]) -> None:
        started = time.perf_counter()
        ids: list[int] = []
        response_idx: list[int] = []
        query_idx: list[int] = []
        for p in plan:
            for work, offset, take in p.pieces:
                if work.started_at is None:
                    work.started_at = started
                base = len(ids)
                ids.extend(work.ids[offset : offset + take])
                if work.kind is WorkKind.RESPONSE:
                    response_idx.extend(range(base, base + take))
                elif work.kind is WorkKind.PROMPT and offset + take == len(work.ids):
                    query_idx.append(base + take - 1)
        layout = StepLayout([p.row for p in plan], self.device)
        token_ids = torch.tensor(ids, dtype=torch.long, device=self.device)
        with torch.inference_mode(), self._threads_for(len(ids)):
            hidden = self.model.step(token_ids, layout, self.cache)
            resp = self._head_probs(self.model.response_head, hidden, response_idx)
            query = self._head_probs(self.model.query_head, hidden, query_idx)
        finished = time.perf_counter()
        self.steps += 1
        self.tokens_scored += len(ids)
        done = self._route(plan, resp, query, finished, len(plan))
        settle(done)  # before the metrics hook: the streams wait for these, the metrics do not
        if self._on_step is not None:
            try:
                self._on_step(StepStats(len(plan), len(ids), finished - started, self.cache.nbytes(), self._threads))
            except Exception:  # a metrics hook must never fail the streams
                log.exception("event=on_step_failed")

    def _head_probs(self, head, hidden: torch.Tensor, index: list[int]) -> tuple | None:
        """For the rows ``index`` of the step, all rows at once: the probabilities (arrays), the
        argmax labels and the argmax probability (lists: callers judge a few tokens at a time,
        where list lookups beat numpy calls)."""
        if not index:
            return None
        logits = head(hidden[torch.tensor(index, device=hidden.device)])
        risk = torch.softmax(logits.risk.float(), dim=-1)
        category = torch.softmax(logits.category.float(), dim=-1)
        chosen, risk_index = risk.max(dim=-1)
        return (
            risk.cpu().numpy(),
            category.cpu().numpy(),
            risk_index.tolist(),
            category.argmax(dim=-1).tolist(),
            chosen.tolist(),
        )

    def _route(self, plan, resp, query, finished: float, rows: int) -> list[Outcome]:
        """Hand each work item its rows of the step's outputs; return the futures to resolve."""
        done = []
        r = q = 0
        with self._lock:
            for p in plan:
                session = p.session
                session.last_active = time.monotonic()
                for work, offset, take in p.pieces:
                    if work.kind is WorkKind.RESPONSE:
                        work.parts.append(tuple(a[r : r + take] for a in resp))
                        r += take
                    complete = offset + take == len(work.ids)
                    if work.kind is WorkKind.PROMPT and complete:
                        value = PromptScores(query[0][q], query[1][q], len(work.ids), finished - work.started_at)
                        q += 1
                    elif work.kind is WorkKind.RESPONSE and complete:
                        parts = work.parts[0] if len(work.parts) == 1 else _joined(work.parts)
                        value = ChunkScores(
                            tuple(work.ids),
                            work.first_index,
                            *parts,
                            work.started_at - work.enqueued_at,
                            finished - work.started_at,
                            rows,
                        )
                    elif complete:
                        value = None
                    else:
                        continue
                    if session.closed:
                        continue
                    session.queue.popleft()
                    self._queued -= 1
                    done.append((work.future, value, None))
        return done


def _joined(parts: list[tuple]) -> list:
    """One chunk's outputs from the steps it was split over (chunked prefill), in order."""
    return [
        np.concatenate(a) if isinstance(a[0], np.ndarray) else list(itertools.chain.from_iterable(a))
        for a in zip(*parts, strict=True)
    ]
