"""How retrieval requests are batched: the shared ``guard.batcher.Batcher`` with a token budget.

Every sequence (an input to embed, a query-document pair to score) is one item whose cost is its
length; a batch closes when it would exceed ``max_batch_tokens`` or ``max_batch`` sequences, or
when its oldest item has waited ``wait_ms``. Inside a batch, ``backbone.plan_groups`` sorts by
length so padding stays small.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, fields
from typing import Any, Generic, TypeVar

from guard.batcher import Batched, Batcher
from guard.errors import InvalidInput

R = TypeVar("R")


@dataclass(frozen=True)
class BatchLimits:
    max_batch_tokens: int = 16384  # padded tokens in one forward pass
    max_batch: int = 64  # sequences in one forward pass
    wait_ms: float = 2.0  # how long a batch waits to fill
    max_queue: int = 4096  # sequences waiting (RESOURCE_EXHAUSTED beyond)
    max_client_batch: int = 256  # inputs (or documents) in one request
    max_queue_tokens: int = 262144  # tokens waiting: bounds what the queue holds (images included)

    def __post_init__(self) -> None:
        for f in fields(self):
            value = getattr(self, f.name)
            if value < (0 if f.name == "wait_ms" else 1):
                raise ValueError(f"`{f.name}` must be {'>= 0' if f.name == 'wait_ms' else '>= 1'}, got {value}")


def token_budget_batcher(name: str, run: Callable[[list[list[int]]], Sequence], limits: BatchLimits) -> Batcher:
    return Batcher(
        run,
        name=name,
        max_batch=limits.max_batch,
        wait_ms=limits.wait_ms,
        max_queue=limits.max_queue,
        cost=len,
        max_cost=limits.max_batch_tokens,
        max_queued_cost=limits.max_queue_tokens,
    )


class BatchedSequences(Generic[R]):
    """What the Embedder and the Reranker share: their sequences go through one token-budget
    batcher to ``_run`` (a local forward or the vLLM backend), a request is admitted whole or
    not at all, and ``close`` stops the batcher and the backend's client."""

    remote: Any = None  # the vLLM backend's client, when the model runs there

    def _start_batching(self, name: str, limits: BatchLimits) -> None:
        self._batcher = token_budget_batcher(name, self._run, limits)

    def _run(self, sequences: list[list[int]]) -> Sequence[R]:
        raise NotImplementedError

    def submit(self, sequences: list[list[int]]) -> list[Future[Batched[R]]]:
        """One future per sequence, in order. A request that could never fit the queue's token
        bound is INVALID_ARGUMENT (split it), not a retryable RESOURCE_EXHAUSTED."""
        total = sum(len(s) for s in sequences)
        bound = self._batcher.max_queued_cost
        if bound is not None and len(sequences) > 1 and total > bound:
            raise InvalidInput(
                f"the request has {total} tokens in {len(sequences)} sequences; at most {bound} can wait at once "
                "(max_queue_tokens): split it"
            )
        futures: list[Future[Batched[R]]] = []
        try:
            for seq in sequences:
                futures.append(self._batcher.submit(seq))
        except Exception:
            for f in futures:  # a full queue midway: withdraw what was queued
                f.cancel()
            raise
        return futures

    def close(self) -> None:
        self._batcher.close()
        if self.remote is not None:
            self.remote.close()
