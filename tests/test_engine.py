"""The stream engine: cached incremental scores equal a full recompute, batched equals unbatched,
limits are enforced with clear errors, and closing frees memory."""

from __future__ import annotations

import random
import time

import numpy as np
import pytest
import torch

from guard.errors import InvalidInput, LimitExceeded, SessionClosed
from guard.model.checkpoint import load_stream_guard
from guard.model.engine import EngineLimits, StreamEngine
from guard.model.kv_cache import StepLayout, StepRow

TOL = 1e-4


@pytest.fixture(scope="module")
def guard(tiny_checkpoint):
    return load_stream_guard(tiny_checkpoint)


@pytest.fixture()
def engine(guard):
    eng = StreamEngine(
        guard,
        EngineLimits(
            max_sessions=16, max_tokens_per_session=512, max_chunk_tokens=64, max_row_tokens=32, max_step_tokens=256
        ),
    )
    yield eng
    eng.shutdown()


def full_recompute(guard, ids: list[int], response_from: int) -> tuple[np.ndarray, np.ndarray]:
    """Response-head probabilities from one uncached pass over the whole sequence."""
    cache = guard.model.new_cache(max_slots=1, max_tokens=len(ids))
    slot = cache.allocate()
    cache.reserve_tokens(len(ids))
    hidden = guard.model.step(torch.tensor(ids), StepLayout([StepRow(slot, 0, len(ids))], torch.device("cpu")), cache)
    with torch.inference_mode():
        logits = guard.model.response_head(hidden[response_from:])
    return torch.softmax(logits.risk, -1).numpy(), torch.softmax(logits.category, -1).numpy()


def random_ids(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(0, 151_000) for _ in range(n)]


def test_incremental_chunks_equal_a_full_recompute(engine, guard):
    rng = random.Random(0)
    prompt, response = random_ids(rng, 40), random_ids(rng, 60)
    session, _ = engine.open_session(prompt)
    risk, category = [], []
    pos = 0
    for size in [1, 1, 2, 8, 1, 32, 15]:
        scores = engine.submit(session, response[pos : pos + size]).result(timeout=30)
        assert scores.first_index == pos
        risk.append(scores.risk_probs)
        category.append(scores.category_probs)
        pos += size
    ref_risk, ref_cat = full_recompute(guard, prompt + response, len(prompt))
    np.testing.assert_allclose(np.concatenate(risk), ref_risk, atol=TOL)
    np.testing.assert_allclose(np.concatenate(category), ref_cat, atol=TOL)


def test_long_prompt_is_prefilled_in_several_steps_with_the_same_result(engine, guard):
    rng = random.Random(1)
    prompt, response = random_ids(rng, 150), random_ids(rng, 5)  # 150 > max_row_tokens (32)
    session, prompt_future = engine.open_session(prompt)
    assert prompt_future.result(timeout=30).prompt_tokens == 150
    scores = engine.submit(session, response).result(timeout=30)
    np.testing.assert_allclose(scores.risk_probs, full_recompute(guard, prompt + response, 150)[0], atol=TOL)


def test_concurrent_sessions_are_batched_and_match_unbatched_results(guard):
    """Many sessions with different prompt lengths, positions and chunk sizes in shared steps."""
    rows_seen = []
    engine = StreamEngine(
        guard,
        EngineLimits(max_sessions=16, max_row_tokens=16, max_step_tokens=512),
        on_step=lambda s: rows_seen.append(s.rows),
    )
    rng = random.Random(2)
    plans = []
    for _ in range(10):
        prompt = random_ids(rng, rng.randint(3, 40))
        chunks = [random_ids(rng, rng.choice([1, 1, 2, 5, 9])) for _ in range(rng.randint(2, 6))]
        plans.append((prompt, chunks))
    try:
        sessions = [engine.open_session(p)[0] for p, _ in plans]
        futures = [[engine.submit(s, c) for c in chunks] for s, (_, chunks) in zip(sessions, plans, strict=True)]
        for (prompt, chunks), fs in zip(plans, futures, strict=True):
            got = np.concatenate([f.result(timeout=60).risk_probs for f in fs])
            expected = full_recompute(guard, prompt + [t for c in chunks for t in c], len(prompt))[0]
            np.testing.assert_allclose(got, expected, atol=TOL)
    finally:
        engine.shutdown()
    assert max(rows_seen) > 1, "the sessions were never batched together"


def test_fragmented_slots_read_the_right_cache_rows(engine, guard):
    """After a close in the middle, live sessions sit in non-contiguous slots."""
    rng = random.Random(3)
    prompts = [random_ids(rng, n) for n in (10, 11, 12)]
    opened = [engine.open_session(p) for p in prompts]
    for _, f in opened:
        f.result(timeout=30)
    engine.close(opened[1][0])
    engine.barrier().result(timeout=30)
    live = [(opened[0][0], prompts[0]), (opened[2][0], prompts[2])]
    assert live[1][0].slot - live[0][0].slot == 2
    chunks = [random_ids(rng, 4) for _ in live]
    futures = [engine.submit(s, c) for (s, _), c in zip(live, chunks, strict=True)]
    for (_, prompt), chunk, f in zip(live, chunks, futures, strict=True):
        expected = full_recompute(guard, prompt + chunk, len(prompt))[0]
        np.testing.assert_allclose(f.result(timeout=30).risk_probs, expected, atol=TOL)


def test_prompt_scores_are_the_query_heads_at_the_last_prompt_token(engine, guard):
    rng = random.Random(4)
    prompt = random_ids(rng, 20)
    _, future = engine.open_session(prompt)
    scores = future.result(timeout=30)
    cache = guard.model.new_cache(max_slots=1, max_tokens=20)
    slot = cache.allocate()
    cache.reserve_tokens(20)
    hidden = guard.model.step(torch.tensor(prompt), StepLayout([StepRow(slot, 0, 20)], torch.device("cpu")), cache)
    with torch.inference_mode():
        expected = torch.softmax(guard.model.query_head(hidden[-1:]).risk, -1)[0].numpy()
    np.testing.assert_allclose(scores.risk_probs, expected, atol=TOL)


def test_out_of_vocabulary_id_is_invalid_and_the_session_survives(engine, guard):
    session, _ = engine.open_session([1, 2, 3])
    with pytest.raises(InvalidInput, match=r"outside the vocabulary \[0, 151936\)"):
        engine.submit(session, [5, guard.config.vocab_size])
    assert engine.submit(session, [5]).result(timeout=30).risk_probs.shape == (1, 3)


def test_negative_id_and_empty_prompt_are_invalid(engine):
    with pytest.raises(InvalidInput, match="position 1"):
        engine.open_session([1, -1])
    with pytest.raises(InvalidInput, match="prompt is empty"):
        engine.open_session([])


def test_oversized_chunk_is_invalid(engine):
    session, _ = engine.open_session([1])
    with pytest.raises(InvalidInput, match="at most 64"):
        engine.submit(session, list(range(65)))


def test_session_limit_is_resource_exhausted_and_frees_on_close(engine):
    sessions = [engine.open_session([1])[0] for _ in range(16)]
    with pytest.raises(LimitExceeded, match="16 sessions"):
        engine.open_session([1])
    engine.close(sessions[0])
    engine.open_session([1])


def test_token_limit_per_session(engine):
    session, _ = engine.open_session(list(range(500)))
    engine.submit(session, list(range(12))).result(timeout=30)
    with pytest.raises(LimitExceeded, match="limit is 512"):
        engine.submit(session, [1])
    with pytest.raises(LimitExceeded, match="limit per session is 512"):
        engine.open_session(list(range(513)))


def test_queue_limit_is_resource_exhausted(guard):
    engine = StreamEngine(guard, EngineLimits(max_queued_chunks=3))
    try:
        session, _ = engine.open_session(list(range(1, 400)))  # long prefill keeps the queue busy
        with pytest.raises(LimitExceeded, match="chunks are queued"):
            for _ in range(10):
                engine.submit(session, [1])
    finally:
        engine.shutdown()


def test_close_fails_pending_work_and_releases_the_cache(engine):
    session, _ = engine.open_session(list(range(1, 300)))
    pending = engine.submit(session, [1, 2, 3])
    engine.close(session, "cancelled by the client")
    with pytest.raises(SessionClosed, match="cancelled by the client"):
        pending.result(timeout=30)
    with pytest.raises(SessionClosed):
        engine.submit(session, [1])
    engine.barrier().result(timeout=30)
    assert engine.live_sessions == 0
    assert engine.cache.live == 0
    assert engine.kv_cache_bytes == 0


@pytest.mark.parametrize("release_idle", [False, True])
def test_an_idle_engine_keeps_only_its_first_cache_allocation(guard, release_idle):
    """Sessions long enough to grow the pool, all closed: what grew is given back; the first
    allocation stays for the next session (or nothing stays with release_idle_kv_cache)."""
    engine = StreamEngine(guard, EngineLimits(max_tokens_per_session=1024, release_idle_kv_cache=release_idle))
    try:
        rng = random.Random(3)
        sessions = [engine.open_session(random_ids(rng, 300))[0] for _ in range(6)]
        for session in sessions:
            engine.submit(session, random_ids(rng, 8)).result(timeout=60)
        grown = engine.kv_cache_bytes
        for session in sessions:
            engine.close(session, "done")
        engine.barrier().result(timeout=30)
        assert engine.live_sessions == 0 and engine.cache.live == 0
        assert grown > engine.cache.idle_bytes
        assert engine.kv_cache_bytes == engine.cache.idle_bytes
        assert (engine.kv_cache_bytes == 0) is release_idle
    finally:
        engine.shutdown()


def test_idle_sessions_expire(guard):
    engine = StreamEngine(guard, EngineLimits(idle_timeout_s=0.2))
    try:
        session, prompt = engine.open_session([1, 2])
        prompt.result(timeout=30)
        deadline = time.monotonic() + 10
        while engine.live_sessions and time.monotonic() < deadline:
            engine.barrier().result(timeout=10)
        assert engine.live_sessions == 0
        with pytest.raises(SessionClosed, match="expired"):
            engine.submit(session, [1])
    finally:
        engine.shutdown()


def test_shutdown_fails_pending_work(guard):
    engine = StreamEngine(guard)
    session, _ = engine.open_session(list(range(1, 2000)))
    pending = engine.submit(session, [1])
    engine.shutdown()
    with pytest.raises(SessionClosed):
        pending.result(timeout=30)
    with pytest.raises(SessionClosed):
        engine.open_session([1])


def test_empty_chunk_resolves_at_once(engine):
    session, _ = engine.open_session([1])
    scores = engine.submit(session, []).result(timeout=1)
    assert scores.token_ids == () and scores.risk_probs.shape == (0, 3)


def test_a_bad_stream_does_not_disturb_a_good_one(engine, guard):
    rng = random.Random(5)
    prompt, response = random_ids(rng, 12), random_ids(rng, 20)
    good, _ = engine.open_session(prompt)
    results = []
    for i in range(0, 20, 4):
        bad, _ = engine.open_session([1, 2])
        with pytest.raises(InvalidInput):
            engine.submit(bad, [10**9])
        engine.close(bad)
        results.append(engine.submit(good, response[i : i + 4]))
    got = np.concatenate([f.result(timeout=30).risk_probs for f in results])
    np.testing.assert_allclose(got, full_recompute(guard, prompt + response, 12)[0], atol=TOL)


@pytest.mark.parametrize("bad", ["5", 2.0, True, None])
def test_non_integer_ids_are_invalid(engine, bad):
    session, _ = engine.open_session([1])
    with pytest.raises(InvalidInput, match="must be an integer"):
        engine.submit(session, [1, bad])


def test_kv_cache_budget_refuses_the_growing_session_and_keeps_the_others(guard):
    # tiny model: 2 layers x 2 kv heads x 16 dims x fp32 x (K+V) = 512 bytes per position
    engine = StreamEngine(guard, EngineLimits(max_kv_cache_bytes=2**20, max_row_tokens=1024))
    try:
        small, small_prompt = engine.open_session([1, 2, 3])
        small_prompt.result(timeout=30)
        _, big_prompt = engine.open_session(list(range(1, 700)))  # needs 4 slots x 1024 positions = 2 MiB
        with pytest.raises(LimitExceeded, match="budget is 1 MiB"):
            big_prompt.result(timeout=30)
        assert engine.submit(small, [4, 5]).result(timeout=30).risk_probs.shape == (2, 3)
        assert engine.kv_cache_bytes <= 2**20
    finally:
        engine.shutdown()


def test_a_refused_session_gives_its_slot_back_for_the_next_one(guard):
    engine = StreamEngine(guard, EngineLimits(max_sessions=2, max_kv_cache_bytes=2**20, max_row_tokens=1024))
    try:
        small, small_prompt = engine.open_session([1, 2, 3])
        small_prompt.result(timeout=30)
        _, big_prompt = engine.open_session(list(range(1, 1001)))  # its slot is taken, then its tokens refused
        with pytest.raises(LimitExceeded, match="budget is 1 MiB"):
            big_prompt.result(timeout=30)
        engine.barrier().result(timeout=30)
        assert engine.cache.free_slots == 1 and engine.cache.live == 1
        _, next_prompt = engine.open_session([4, 5, 6])  # max_sessions=2: only the refused session's slot is left
        assert next_prompt.result(timeout=30).prompt_tokens == 3
        assert engine.submit(small, [7]).result(timeout=30).risk_probs.shape == (1, 3)
    finally:
        engine.shutdown()


def test_kv_cache_growth_never_holds_more_than_the_budget(guard):
    # tiny model: 512 bytes per position, so 4 initial slots x 256 positions hold 512 KiB; growing
    # to 8 slots would hold 1 MiB new + the old storage being copied, over the 1 MiB budget
    budget = 2**20
    engine = StreamEngine(guard, EngineLimits(max_sessions=16, max_kv_cache_bytes=budget))
    try:
        served, refused = [], 0
        for i in range(12):
            session, prompt = engine.open_session([1, 2, 3 + i])
            try:
                prompt.result(timeout=30)
                served.append(session)
            except LimitExceeded as exc:
                assert "budget is 1 MiB" in str(exc)
                refused += 1
            assert engine.cache.peak_bytes <= budget and engine.kv_cache_bytes <= budget
        assert refused and len(served) > 4  # grown as far as the budget allows, then refused
        for session in served:  # the refusals did not disturb the sessions already served
            assert engine.submit(session, [9, 10]).result(timeout=30).risk_probs.shape == (2, 3)
        assert engine.cache.free_slots == engine.limits.max_sessions - len(served)
    finally:
        engine.shutdown()


def test_a_step_waits_for_the_sessions_of_the_previous_step(guard):
    """The batch window: after a step of 4 sessions, 3 returning sessions wait for the 4th (up
    to max_batch_wait_ms) so all 4 share one forward pass; a window that times out adapts."""
    steps = []
    eng = StreamEngine(
        guard, EngineLimits(max_sessions=8, max_batch_wait_ms=1000), on_step=lambda stats: steps.append(stats.rows)
    )
    try:
        rng = random.Random(3)
        sessions = [eng.open_session(random_ids(rng, 5))[0] for _ in range(4)]
        eng.barrier().result(timeout=30)
        first = [eng.submit(s, random_ids(rng, 3)) for s in sessions]
        for f in first:
            f.result(timeout=30)
        rounds_before = len(steps)
        late = [eng.submit(s, random_ids(rng, 3)) for s in sessions[:3]]
        time.sleep(0.1)  # well inside the 1 s window: nothing ran yet
        assert not any(f.done() for f in late) and len(steps) == rounds_before
        late.append(eng.submit(sessions[3], random_ids(rng, 3)))
        for f in late:
            f.result(timeout=30)
        assert steps[rounds_before:] == [4]  # one forward pass for all four

        eng.close(sessions[3])  # one stream ended: the next window times out once, then adapts
        started = time.monotonic()
        for f in [eng.submit(s, random_ids(rng, 3)) for s in sessions[:3]]:
            f.result(timeout=30)
        assert time.monotonic() - started < 5
        adapted = [eng.submit(s, random_ids(rng, 3)) for s in sessions[:3]]
        for f in adapted:
            f.result(timeout=30)
        assert steps[-1] == 3
    finally:
        eng.shutdown()


def test_one_stream_never_waits_for_the_batch_window(guard):
    steps = []
    eng = StreamEngine(
        guard, EngineLimits(max_sessions=2, max_batch_wait_ms=1000), on_step=lambda stats: steps.append(stats.rows)
    )
    try:
        rng = random.Random(4)
        session, prompt = eng.open_session(random_ids(rng, 5))
        prompt.result(timeout=30)
        started = time.monotonic()
        for _ in range(20):  # 20 waits of the 1 s window would take 20 s
            eng.submit(session, random_ids(rng, 2)).result(timeout=30)
        assert time.monotonic() - started < 10
        assert set(steps) == {1}
    finally:
        eng.shutdown()


def test_batch_window_is_validated():
    with pytest.raises(ValueError, match="max_batch_wait_ms"):
        EngineLimits(max_batch_wait_ms=-1)


def test_small_forward_passes_run_on_one_thread_and_large_ones_on_the_pool(guard):
    """min_parallel_tokens: the worker sets its own intra-op threads per pass; the caller's
    thread count is untouched."""
    before = torch.get_num_threads()
    steps = []
    eng = StreamEngine(guard, EngineLimits(max_sessions=2, min_parallel_tokens=16), on_step=steps.append)
    try:
        rng = random.Random(5)
        ids = random_ids(rng, 40)
        session, prompt = eng.open_session(ids[:5])
        prompt.result(timeout=30)
        eng.submit(session, ids[5:9]).result(timeout=30)
        eng.submit(session, ids[9:40]).result(timeout=30)
    finally:
        eng.shutdown()
    assert [(s.tokens, s.threads) for s in steps] == [(5, 1), (4, 1), (31, eng._pool_threads)]
    assert eng._pool_threads == before  # the worker's pool is the process's setting
    assert torch.get_num_threads() == before
