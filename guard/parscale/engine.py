"""Batched, cached ParScale decoding for many concurrent requests.

A request holds P slots of one pooled KV cache (one per stream, each starting with the stream's
prefix) from its first step to ``close``. Its steps (the prompt once, in chunks of at most
``max_step_tokens``, then one token at a time) go through the shared dynamic batcher
(``guard.batcher``): whatever steps of any requests are queued together run as ONE forward pass,
prefill and decode mixed, and each step's output is computed on the worker for the whole batch at
once: the next token (each request's own sampler), the log-probabilities of given tokens
(scoring), or the top logits.

The worker thread owns the model and the pool; ``close`` from any thread frees the request's
slots under the pool's lock, or leaves them for the worker if a step is running.
"""

from __future__ import annotations

import itertools
import threading
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass

import torch

from guard.batcher import Batched, Batcher
from guard.errors import FailedPrecondition, InvalidInput, LimitExceeded, SessionClosed
from guard.model.kv_cache import CacheFull
from guard.parscale.model import ParScaleLM

Sample = Callable[[torch.Tensor], int]  # float32 logits [vocab] -> the next token id


@dataclass(frozen=True)
class ParScaleLimits:
    max_requests: int = 64  # live requests (each holds P KV slots)
    max_tokens_per_request: int | None = None  # prompt + generated (the prefix on top); None: the model's context
    max_step_tokens: int = 2048  # new tokens in one forward pass, all requests together
    max_queue: int = 1024  # steps waiting for the worker
    max_kv_cache_bytes: int | None = None
    wait_ms: float = 1.0  # a step waits at most this long for others to share its forward pass

    def __post_init__(self) -> None:
        for name in ("max_requests", "max_tokens_per_request", "max_step_tokens", "max_queue"):
            if getattr(self, name) is not None and getattr(self, name) < 1:
                raise ValueError(f"`{name}` must be >= 1, got {getattr(self, name)}")


@dataclass(frozen=True)
class StepOutput:
    next_id: int | None = None  # sampled from the last position (when a sampler was given)
    logprobs: tuple[float, ...] = ()  # of the given targets, one per scored position
    greedy: tuple[bool, ...] = ()  # whether each target was the argmax there
    top: tuple[tuple[int, float], ...] = ()  # the last position's top logits, best first


@dataclass(eq=False)
class ParScaleRequest:
    """One request's place in the engine. ``cached``: real tokens in its slots."""

    engine: ParScaleEngine
    id: int
    slots: list[int] | None = None
    cached: int = 0
    closed: bool = False
    busy: bool = False  # a step is queued or running: the next one must wait for it

    def step(
        self,
        token_ids: Sequence[int],
        *,
        sample: Sample | None = None,
        targets: Sequence[int | None] | None = None,
        top_k: int = 0,
    ) -> Future[Batched[StepOutput]]:
        """Feed ``token_ids`` (at most ``max_step_tokens``) after what is cached. ``sample``: the
        next token from the last position's logits. ``targets[k]``: score this token as the one
        predicted at position k (its log-probability; None: not scored). ``top_k``: the last
        position's top logits."""
        return self.engine.submit(_Step(self, list(token_ids), sample, list(targets) if targets else None, top_k))

    def close(self) -> None:
        self.engine.release(self)


@dataclass
class _Step:
    request: ParScaleRequest
    token_ids: list[int]
    sample: Sample | None
    targets: list[int | None] | None
    top_k: int


@dataclass
class EngineStats:
    steps: int = 0
    rows: int = 0
    tokens: int = 0
    peak_kv_bytes: int = 0


class ParScaleEngine:
    def __init__(
        self,
        model: ParScaleLM,
        limits: ParScaleLimits | None = None,
        on_step: Callable[[int, int, int], None] | None = None,
    ) -> None:
        """``on_step(requests, tokens, kv_bytes)`` after each forward pass (metrics)."""
        self.model = model
        self.limits = limits = limits or ParScaleLimits()
        context = model.config.max_position_embeddings
        if (limits.max_tokens_per_request or 0) > context:
            raise ValueError(
                f"max_tokens_per_request {limits.max_tokens_per_request} exceeds the model's "
                f"max_position_embeddings {context}"
            )
        self.max_tokens = limits.max_tokens_per_request or context  # per request, prompt included
        self.vocab = model.config.shape.vocab_size
        self.pool = model.new_cache(
            max_slots=limits.max_requests * model.streams,
            max_tokens=self.max_tokens,
            max_bytes=limits.max_kv_cache_bytes,
        )
        self.on_step = on_step
        self.stats = EngineStats()
        self._ids = itertools.count()
        self._live = 0
        self._live_lock = threading.Lock()  # the count of open requests (any thread)
        self._pool_lock = threading.Lock()  # the pool: the worker's steps, and frees from any thread
        self._to_free: deque[ParScaleRequest] = deque()  # closed, slots not yet freed
        self.batcher: Batcher[_Step, StepOutput] = Batcher(
            self._run,
            name="parscale",
            max_batch=limits.max_requests,
            wait_ms=limits.wait_ms,
            max_queue=limits.max_queue,
            cost=lambda step: len(step.token_ids),
            max_cost=limits.max_step_tokens,
            # prefill chunks and decode steps run in separate passes: a decode row is never padded
            # to a prefill chunk's length
            group_by=lambda step: len(step.token_ids) == 1,
        )

    # ------------------------------------------------------------------ requests

    def open(self) -> ParScaleRequest:
        with self._live_lock:
            if self._live >= self.limits.max_requests:
                raise LimitExceeded(
                    f"ParScale is serving {self._live} requests (max_requests={self.limits.max_requests}); retry later"
                )
            self._live += 1
        return ParScaleRequest(self, next(self._ids))

    def release(self, request: ParScaleRequest) -> None:
        """Free the request's slots (idempotent, any thread): now, or when the running step ends."""
        with self._live_lock:
            if request.closed:
                return
            request.closed = True
            self._live -= 1
        self._to_free.append(request)
        self._free_pending()

    @property
    def live(self) -> int:
        return self._live

    def submit(self, step: _Step) -> Future[Batched[StepOutput]]:
        request, ids = step.request, step.token_ids
        if request.closed:
            raise SessionClosed("this ParScale request is closed")
        if not ids:
            raise InvalidInput("a step needs at least one token")
        if len(ids) > self.limits.max_step_tokens:
            raise InvalidInput(f"a step of {len(ids)} tokens; at most {self.limits.max_step_tokens} (feed in chunks)")
        if any(not 0 <= t < self.vocab for t in ids):
            raise InvalidInput(f"token ids must be in [0, {self.vocab})")
        if step.targets is not None and len(step.targets) != len(ids):
            raise InvalidInput("`targets` needs one entry per token (None: not scored)")
        if step.targets is not None and any(t is not None and not 0 <= t < self.vocab for t in step.targets):
            raise InvalidInput(f"target ids must be in [0, {self.vocab})")
        with self._live_lock:  # one step at a time: each writes after what the previous one cached
            if request.busy:
                raise FailedPrecondition("this ParScale request has a step in flight; wait for its result")
            if request.cached + len(ids) > self.max_tokens:
                raise LimitExceeded(
                    f"the request would hold {request.cached + len(ids)} tokens; the limit is {self.max_tokens} "
                    "per request"
                )
            request.busy = True
        try:
            future = self.batcher.submit(step)
        except BaseException:
            request.busy = False
            raise
        future.add_done_callback(lambda _: setattr(request, "busy", False))  # done, failed or withdrawn
        return future

    def close(self) -> None:
        self.batcher.close()

    # ------------------------------------------------------------------ worker

    def _free_pending(self) -> None:
        if not self._pool_lock.acquire(blocking=False):
            return  # the worker holds it: it frees what is pending when its step ends
        try:
            self._drain()
        finally:
            self._pool_lock.release()

    def _drain(self) -> None:
        """Free the slots of closed requests (the pool's lock held)."""
        while self._to_free:
            request = self._to_free.popleft()
            for slot in request.slots or ():
                self.pool.free(slot)
            request.slots = None

    def _run(self, steps: list[_Step]) -> list[StepOutput | Exception]:
        try:
            with self._pool_lock:
                self._drain()  # slots closed since the last step are free for this one
                try:
                    return self._forward(steps)
                finally:
                    self._drain()
        finally:
            if self._to_free:  # closed while this step held the lock, after its drain
                self._free_pending()

    def _forward(self, steps: list[_Step]) -> list[StepOutput | Exception]:
        results: list[StepOutput | Exception | None] = [None] * len(steps)
        live: list[int] = []
        for k, step in enumerate(steps):
            error = self._admit(step.request)
            if error is not None:
                results[k] = error
            else:
                live.append(k)
        if live:
            self._compute([steps[k] for k in live], live, results)
        return [r if r is not None else RuntimeError("step produced no result") for r in results]

    def _admit(self, request: ParScaleRequest) -> Exception | None:
        """Slots for a request's first step (its prefix written), and room for its tokens."""
        if request.closed:
            return SessionClosed("this ParScale request was closed")
        if request.slots is None:
            taken: list[int] = []
            try:
                for _ in range(self.model.streams):
                    taken.append(self.pool.allocate())
                self.model.write_prefix(self.pool, taken)
            except BaseException as exc:  # out of slots, of budget or of device memory: nothing kept
                for slot in taken:
                    self.pool.free(slot)
                if isinstance(exc, CacheFull):
                    return LimitExceeded(f"the ParScale KV cache is full ({exc})")
                if isinstance(exc, Exception):
                    return exc
                raise
            request.slots = taken
        return None

    def _compute(self, steps: list[_Step], where: list[int], results: list) -> None:
        model, pool = self.model, self.pool
        steps, where = self._room(steps, where, results)
        if not steps:
            return
        rows = [(s.request.slots, s.request.cached, len(s.token_ids)) for s in steps]
        layout = model.layout(rows)
        ids = torch.tensor([t for s in steps for t in s.token_ids], device=layout.source.device)
        hidden = model.step(ids, layout, pool)  # [N, h]
        for s in steps:
            s.request.cached += len(s.token_ids)
        self.stats.steps += 1
        self.stats.rows += len(steps)
        self.stats.tokens += int(ids.numel())
        self.stats.peak_kv_bytes = max(self.stats.peak_kv_bytes, pool.peak_bytes)
        if self.on_step is not None:
            self.on_step(len(steps), int(ids.numel()), pool.nbytes())
        with torch.inference_mode():
            self._outputs(steps, where, hidden, results)

    def _room(self, steps: list[_Step], where: list[int], results: list) -> tuple[list[_Step], list[int]]:
        """Cache room for the steps (every slot holds the longest): when the budget refuses that,
        the steps that need the most fail and the others run."""
        prefix = self.model.config.prefix_tokens
        while steps:
            needed = prefix + max(s.request.cached + len(s.token_ids) for s in steps)
            try:
                self.pool.reserve_tokens(needed)
                return steps, where
            except CacheFull as exc:
                keep = [k for k, s in enumerate(steps) if prefix + s.request.cached + len(s.token_ids) < needed]
                for k in set(range(len(steps))) - set(keep):
                    results[where[k]] = LimitExceeded(f"the ParScale KV cache is full ({exc})")
                steps, where = [steps[k] for k in keep], [where[k] for k in keep]
        return steps, where

    def _outputs(self, steps: list[_Step], where: list[int], hidden: torch.Tensor, results: list) -> None:
        """Per step: the positions it needs (its last, and the scored ones) through the LM head, in
        one matmul for the whole batch."""
        offsets, picks = [], []
        start = 0
        for s in steps:
            n = len(s.token_ids)
            scored = [start + i for i, t in enumerate(s.targets or ()) if t is not None]
            last = [start + n - 1] if (s.sample is not None or s.top_k) else []
            offsets.append((len(picks), scored, last))
            picks += scored + last
            start += n
        logits = self.model.logits(hidden[torch.tensor(picks, dtype=torch.long)]) if picks else None
        for s, k, (base, scored, last) in zip(steps, where, offsets, strict=True):
            try:
                results[k] = self._output(s, logits, base, len(scored), bool(last))
            except Exception as exc:  # a sampler's failure fails its own request
                results[k] = exc

    @staticmethod
    def _output(step: _Step, logits: torch.Tensor | None, base: int, scored: int, last: bool) -> StepOutput:
        logprobs: tuple[float, ...] = ()
        greedy: tuple[bool, ...] = ()
        if scored:
            rows = logits[base : base + scored]  # [S, vocab]
            targets = torch.tensor([t for t in step.targets if t is not None], dtype=torch.long, device=rows.device)
            picked = torch.log_softmax(rows, dim=-1).gather(1, targets[:, None]).squeeze(1)
            logprobs = tuple(picked.tolist())
            greedy = tuple((rows.argmax(-1) == targets).tolist())
        next_id, top = None, ()
        if last:
            row = logits[base + scored]
            if step.sample is not None:
                next_id = step.sample(row)
            if step.top_k:
                values, ids = row.topk(min(step.top_k, row.numel()))
                top = tuple(zip(ids.tolist(), values.tolist(), strict=True))
        return StepOutput(next_id, logprobs, greedy, top)
