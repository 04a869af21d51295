"""Settling a worker thread's results into the callers' futures, one hand-off per batch.

A worker (the stream engine, the batcher) finishes many futures per step. Plain
``concurrent.futures.Future`` objects are settled in place, on the worker. Futures of an asyncio
event loop must be settled on that loop's thread; doing it one ``call_soon_threadsafe`` per future
(what ``asyncio.wrap_future`` does) wakes the loop once per future and runs callbacks on the
worker. Here a whole batch goes to each loop in ONE ``call_soon_threadsafe``, so the worker does
no per-caller work and the loop wakes once per step.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterable
from concurrent.futures import Future, InvalidStateError
from typing import Any

AnyFuture = Future | asyncio.Future
Outcome = tuple[AnyFuture, Any, BaseException | None]  # (future, result, or the error to raise)


def new_future(loop: asyncio.AbstractEventLoop | None) -> AnyFuture:
    """A future the worker will settle: an asyncio one on ``loop``, else a thread-safe one."""
    return loop.create_future() if loop is not None else Future()


def settle(outcomes: Iterable[Outcome]) -> None:
    """Set every result or error: thread-safe futures now, each loop's futures in one hand-off."""
    by_loop: dict[asyncio.AbstractEventLoop, list[Outcome]] = {}
    for outcome in outcomes:
        future = outcome[0]
        if isinstance(future, asyncio.Future):
            by_loop.setdefault(future.get_loop(), []).append(outcome)
        else:
            _settle_one(outcome)
    for loop, batch in by_loop.items():
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
            loop.call_soon_threadsafe(_settle_batch, batch)


def _settle_batch(batch: list[Outcome]) -> None:
    for outcome in batch:
        _settle_one(outcome)


def _settle_one(outcome: Outcome) -> None:
    future, value, error = outcome
    if future.done():  # cancelled by its waiter (a timeout), or failed by a concurrent close
        return
    with contextlib.suppress(InvalidStateError):  # a thread-safe future settled since the check
        if error is not None:
            future.set_exception(error)
            if isinstance(future, asyncio.Future):
                future.exception()  # a closed session's future nobody awaits any more is not an error to log
        else:
            future.set_result(value)
