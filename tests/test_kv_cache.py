"""One step over rows in arbitrary slots, lengths and positions equals each row run alone."""

from __future__ import annotations

import torch

from guard.checkpoint import load_stream_guard
from guard.kv_cache import KVCachePool, StepLayout, StepRow

CPU = torch.device("cpu")


def test_batched_step_over_non_contiguous_slots_equals_single_rows(tiny_checkpoint):
    model = load_stream_guard(tiny_checkpoint).model
    gen = torch.Generator().manual_seed(0)
    prefixes = {0: 9, 2: 4, 5: 17}  # slot -> tokens already cached
    new = {0: 1, 2: 6, 5: 3}  # slot -> tokens in this step
    seqs = {s: torch.randint(0, 150_000, (prefixes[s] + new[s],), generator=gen) for s in prefixes}

    def run(batched: bool) -> dict[int, torch.Tensor]:
        cache = model.new_cache(max_slots=8, max_tokens=64)
        for _ in range(6):
            cache.allocate()
        cache.reserve_tokens(32)
        for s, n in prefixes.items():
            model.step(seqs[s][:n], StepLayout([StepRow(s, 0, n)], CPU), cache)
        order = [5, 0, 2]  # deliberately not sorted
        if batched:
            rows = [StepRow(s, prefixes[s], new[s]) for s in order]
            ids = torch.cat([seqs[s][prefixes[s] :] for s in order])
            hidden = model.step(ids, StepLayout(rows, CPU), cache)
            return dict(zip(order, hidden.split([new[s] for s in order]), strict=True))
        return {
            s: model.step(seqs[s][prefixes[s] :], StepLayout([StepRow(s, prefixes[s], new[s])], CPU), cache)
            for s in order
        }

    batched, single = run(True), run(False)
    for s in prefixes:
        torch.testing.assert_close(batched[s], single[s], atol=1e-5, rtol=1e-5)


def test_pool_grows_and_is_released_when_the_last_slot_closes():
    pool = KVCachePool(
        2, 1, 8, max_slots=64, max_tokens=4096, dtype=torch.float32, device=CPU, initial_slots=2, initial_tokens=16
    )
    slots = [pool.allocate() for _ in range(5)]
    pool.reserve_tokens(100)
    assert pool.slot_capacity >= 5 and pool.token_capacity == 128
    for s in slots:
        pool.free(s)
    assert pool.nbytes() == 0 and pool.live == 0
    assert pool.allocate() == 0


def test_lowest_free_slot_is_reused_first():
    pool = KVCachePool(1, 1, 4, max_slots=8, max_tokens=16, dtype=torch.float32, device=CPU)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    pool.free(b)
    pool.free(a)
    assert pool.allocate() == a
    assert pool.allocate() == b
    assert c == 2
