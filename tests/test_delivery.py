"""Results reach an event loop in one hand-off per batch, on the loop's thread; thread-safe
futures are settled in place; a closed loop or a cancelled waiter harms nothing."""

from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future

import pytest

from guard.delivery import new_future, settle
from guard.model.checkpoint import load_stream_guard
from guard.model.engine import EngineLimits, StreamEngine


async def test_one_hand_off_per_loop_and_callbacks_on_the_loop_thread():
    loop = asyncio.get_running_loop()
    futures = [new_future(loop) for _ in range(10)]
    plain = [new_future(None) for _ in range(2)]
    assert all(isinstance(f, asyncio.Future) for f in futures) and all(isinstance(f, Future) for f in plain)
    handoffs = []
    original = loop.call_soon_threadsafe

    def counting(callback, *args, **kwargs):
        handoffs.append(threading.get_ident())
        return original(callback, *args, **kwargs)

    loop.call_soon_threadsafe = counting
    callback_threads = []
    for f in futures:
        f.add_done_callback(lambda _f: callback_threads.append(threading.get_ident()))
    failed = RuntimeError("closed")
    outcomes = [(f, i, None) for i, f in enumerate(futures[:8])] + [(f, None, failed) for f in futures[8:]]
    outcomes += [(plain[0], "a", None), (plain[1], None, failed)]
    try:
        worker = threading.Thread(target=settle, args=(outcomes,))
        worker.start()
        worker.join()
        assert plain[0].result() == "a" and plain[1].exception() is failed  # settled in place, on the worker
        assert [await f for f in futures[:8]] == list(range(8))
        for f in futures[8:]:
            with pytest.raises(RuntimeError, match="closed"):
                await f
    finally:
        del loop.call_soon_threadsafe
    assert len(handoffs) == 1  # ten futures, one wake-up of the loop
    assert set(callback_threads) == {threading.get_ident()}


async def test_cancelled_waiter_and_closed_loop_are_skipped():
    loop = asyncio.get_running_loop()
    cancelled = new_future(loop)
    cancelled.cancel()
    settle([(cancelled, 1, None)])
    await asyncio.sleep(0)
    assert cancelled.cancelled()

    other = asyncio.new_event_loop()
    orphan = other.create_future()
    other.close()
    settle([(orphan, 1, None)])  # nobody waits on a closed loop: no error
    assert not orphan.done()


async def test_engine_settles_a_loop_sessions_futures_on_the_loop(tiny_checkpoint):
    engine = StreamEngine(load_stream_guard(tiny_checkpoint), EngineLimits(max_sessions=8))
    loop = asyncio.get_running_loop()
    try:
        sessions = [engine.open_session([1, 2, 3], loop=loop) for _ in range(6)]
        prompts = await asyncio.gather(*(prompt for _, prompt in sessions))
        assert all(p.prompt_tokens == 3 for p in prompts)
        where = []
        futures = []
        for session, _ in sessions:
            future = engine.submit(session, [5, 6, 7, 8])
            assert isinstance(future, asyncio.Future)
            future.add_done_callback(lambda _f: where.append(threading.get_ident()))
            futures.append(future)
        chunks = await asyncio.gather(*futures)
        for c in chunks:
            assert c.risk_index == c.risk_probs.argmax(axis=1).tolist()
            assert c.category_index == c.category_probs.argmax(axis=1).tolist()
            assert c.risk_probability == pytest.approx(c.risk_probs.max(axis=1).tolist())
        assert set(where) == {threading.get_ident()}
    finally:
        engine.shutdown()
