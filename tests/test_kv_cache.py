"""One step over rows in arbitrary slots, lengths and positions equals each row run alone; the pool
grows within its byte budget (old and new storage counted together) and a refusal leaks nothing."""

from __future__ import annotations

import weakref

import pytest
import torch

from guard.model.checkpoint import load_stream_guard
from guard.model.kv_cache import CacheFull, KVCachePool, StepLayout, StepRow

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


@pytest.mark.parametrize("keep_idle", [True, False])
def test_pool_grows_and_gives_back_what_grew_when_the_last_slot_closes(keep_idle):
    """Idle, the pool keeps only its first allocation (keep_idle), or nothing; the next session
    then takes slot 0 without allocating (keep_idle)."""
    pool = KVCachePool(
        2, 1, 8, max_slots=64, max_tokens=4096, dtype=torch.float32, device=CPU, initial_slots=2, initial_tokens=16,
        keep_idle=keep_idle,
    )  # fmt: skip
    first = pool.allocate()
    first_storage = pool.k[0]
    pool.free(first)
    assert pool.nbytes() == pool.idle_bytes == (pool.bytes_for(2, 16) if keep_idle else 0)
    slots = [pool.allocate() for _ in range(5)]
    pool.reserve_tokens(100)
    assert pool.slot_capacity >= 5 and pool.token_capacity == 128
    for s in slots:
        pool.free(s)
    assert pool.nbytes() == pool.idle_bytes and pool.live == 0
    if keep_idle:
        assert (pool.slot_capacity, pool.token_capacity) == (2, 16)
        kept = pool.k[0]
        assert pool.allocate() == 0 and pool.k[0] is kept  # no new storage on the way in
        assert pool.nbytes() == pool.idle_bytes
    else:
        assert pool.allocate() == 0 and pool.k[0] is not first_storage


def test_lowest_free_slot_is_reused_first():
    pool = KVCachePool(1, 1, 4, max_slots=8, max_tokens=16, dtype=torch.float32, device=CPU)
    a, b, c = pool.allocate(), pool.allocate(), pool.allocate()
    pool.free(b)
    pool.free(a)
    assert pool.allocate() == a
    assert pool.allocate() == b
    assert c == 2


class TrackedPool(KVCachePool):
    """Measures what is really held: every tensor the pool allocates, alive until its last reference goes."""

    def __init__(self, *args, **kwargs) -> None:
        self.tracked: list[weakref.ref] = []
        self.measured_peak = 0
        super().__init__(*args, **kwargs)

    def live_tensor_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for ref in self.tracked if (t := ref()) is not None)

    def _zeros(self, slots: int, tokens: int) -> torch.Tensor:
        tensor = super()._zeros(slots, tokens)
        self.tracked.append(weakref.ref(tensor))
        self.measured_peak = max(self.measured_peak, self.live_tensor_bytes())
        return tensor


def tracked_pool(max_bytes: int, *, num_layers: int = 2, max_slots: int = 64) -> TrackedPool:
    # 2 layers x 1 kv head x 4 dims x fp32 x (K+V) = 64 bytes per position
    return TrackedPool(
        num_layers,
        1,
        4,
        max_slots=max_slots,
        max_tokens=1024,
        dtype=torch.float32,
        device=CPU,
        max_bytes=max_bytes,
        initial_slots=2,
        initial_tokens=16,
    )


def test_growth_never_holds_more_than_the_budget_old_and_new_together():
    budget = 16 * 2**10
    pool = tracked_pool(budget)
    slots, refused = [], 0
    for step in range(40):
        try:
            slots.append(pool.allocate())
            pool.reserve_tokens(16 * (step + 1))
        except CacheFull:
            refused += 1
        assert pool.nbytes() == pool.live_tensor_bytes()
    assert refused and slots  # it ran into the budget, after serving some sessions
    assert 0 < pool.measured_peak <= budget
    assert pool.peak_bytes == pool.measured_peak  # the pool's own accounting is the truth


def test_growth_near_the_budget_takes_what_fits_instead_of_refusing():
    # 2 slots x 16 positions held (2 KiB); doubling to 4 slots would peak at 4 KiB + one old tensor
    pool = tracked_pool(3 * 2**10 + 512 + 100)
    pool.allocate(), pool.allocate()
    assert pool.allocate() == 2
    assert pool.slot_capacity == 3 and pool.token_capacity == 16
    assert pool.measured_peak <= pool.max_bytes and pool.nbytes() == pool.bytes_for(3, 16)


def test_refused_allocation_leaves_the_slot_free_for_the_next_session():
    pool = tracked_pool(2 * 2**10 + 100, max_slots=3)  # 2 slots x 16 positions fit; a third does not
    first, _ = pool.allocate(), pool.allocate()
    for _ in range(2):  # refused twice for the same reason: the index was not consumed
        with pytest.raises(CacheFull, match="budget is"):
            pool.allocate()
        assert pool.free_slots == 1 and pool.live == 2
    pool.free(first)
    assert pool.free_slots == 2
    assert pool.allocate() == first
    assert pool.nbytes() == pool.live_tensor_bytes() == pool.bytes_for(2, 16)


def test_refused_token_growth_keeps_the_contents_and_the_accounting():
    pool = tracked_pool(4 * 2**10)
    slot = pool.allocate()
    pool.k[1][slot, 0, 3] = 7.0
    with pytest.raises(CacheFull, match="budget is"):
        pool.reserve_tokens(1000)
    assert pool.token_capacity == 16 and pool.free_slots == 63
    assert float(pool.k[1][slot, 0, 3, 0]) == 7.0
    assert pool.nbytes() == pool.live_tensor_bytes()
