"""The shared dynamic batcher: batch formation (window, max size, groups), the bounded queue,
cancellation before and during a batch, failure isolation, and close."""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Iterator

import pytest

from guard.batcher import Batcher, then
from guard.errors import EngineStopped, LimitExceeded

GATE = "gate"  # an item whose batch holds the worker until the test releases it


class Model:
    """A real ``run`` function: upper-cases strings, records every group it computes, holds
    the worker on GATE, fails items named "bad-item" and whole groups containing "boom"."""

    def __init__(self) -> None:
        self.groups: list[list[str]] = []
        self.started = threading.Event()  # a GATE batch is computing
        self.release = threading.Event()

    def __call__(self, items: list[str]) -> list[str | Exception]:
        self.groups.append(list(items))
        if GATE in items:
            self.started.set()
            assert self.release.wait(30), "the test never released the gate"
        if any(i.startswith("boom") for i in items):
            raise RuntimeError("the model failed on this batch")
        return [ValueError(f"cannot compute {i}") if i == "bad-item" else i.upper() for i in items]

    def computed(self) -> list[str]:
        return [i for g in self.groups for i in g]


@pytest.fixture()
def model() -> Iterator[Model]:
    m = Model()
    yield m
    m.release.set()  # never leave a worker blocked


def make(model: Model, **kwargs) -> Batcher[str, str]:
    kwargs.setdefault("max_batch", 8)
    kwargs.setdefault("wait_ms", 0.0)
    return Batcher(model, name="test", **kwargs)


def hold(batcher: Batcher, model: Model):
    """Occupy the worker with a GATE batch; what is submitted meanwhile queues up."""
    gate = batcher.submit(GATE)
    assert model.started.wait(30)
    return gate


def test_requests_within_the_window_share_one_batch(model):
    batcher = make(model, wait_ms=300)
    try:
        futures = [batcher.submit(x) for x in ("a", "b", "c")]
        results = [f.result(30) for f in futures]
        assert [r.value for r in results] == ["A", "B", "C"]
        assert model.groups == [["a", "b", "c"]] and {r.batch_size for r in results} == {3}
        assert results[0].queue_s >= 0.3  # a batch that is not full waits the window out
    finally:
        batcher.close()


def test_batches_fill_up_to_max_batch(model):
    batcher = make(model, max_batch=4, wait_ms=50)
    try:
        gate = hold(batcher, model)
        futures = [batcher.submit(str(i)) for i in range(10)]
        model.release.set()
        assert [f.result(30).value for f in futures] == [str(i) for i in range(10)]
        assert gate.result(30).value == "GATE"
        assert [len(g) for g in model.groups] == [1, 4, 4, 2]
    finally:
        batcher.close()


def test_grouping_computes_each_key_separately(model):
    batcher = make(model, group_by=lambda item: item[0])
    try:
        gate = hold(batcher, model)
        futures = [batcher.submit(x) for x in ("a1", "b1", "a2", "b2")]
        model.release.set()
        assert [f.result(30).value for f in futures] == ["A1", "B1", "A2", "B2"]
        gate.result(30)
        assert model.groups[1:] == [["a1", "a2"], ["b1", "b2"]]
    finally:
        batcher.close()


def test_full_queue_raises_limit_exceeded_naming_the_limit(model):
    batcher = make(model, max_queue=2)
    try:
        hold(batcher, model)
        queued = [batcher.submit("a"), batcher.submit("b")]
        with pytest.raises(LimitExceeded, match=r"test queue is full: 2 requests waiting \(max_queue=2\)"):
            batcher.submit("c")
        queued[0].cancel()  # a withdrawn request frees its place
        late = batcher.submit("d")
        model.release.set()
        assert late.result(30).value == "D" and queued[1].result(30).value == "B"
    finally:
        batcher.close()


def test_request_cancelled_before_its_batch_is_never_computed(model):
    batcher = make(model)
    try:
        hold(batcher, model)
        dropped, kept = batcher.submit("dropped"), batcher.submit("kept")
        assert dropped.cancel()
        model.release.set()
        assert kept.result(30).value == "KEPT"
        assert "dropped" not in model.computed()
    finally:
        batcher.close()


async def test_caller_timeout_during_a_batch_leaves_the_worker_serving(model):
    batcher = make(model)
    try:
        running = batcher.submit(GATE)
        assert await asyncio.to_thread(model.started.wait, 30)
        with pytest.raises(TimeoutError):  # the caller gives up while its batch computes
            await asyncio.wait_for(asyncio.wrap_future(running), 0.01)
        model.release.set()
        assert (await asyncio.wait_for(asyncio.wrap_future(running), 30)).value == "GATE"  # delivered
        assert (await asyncio.wait_for(asyncio.wrap_future(batcher.submit("next")), 30)).value == "NEXT"
    finally:
        await asyncio.to_thread(batcher.close)


async def test_result_for_a_caller_cancelled_meanwhile_is_discarded(model, caplog):
    batcher = make(model)
    try:
        source = batcher.submit(GATE)
        mapped = then(source, lambda done: done.value.lower())
        assert await asyncio.to_thread(model.started.wait, 30)
        assert mapped.cancel()  # the caller's own future can still be cancelled mid-batch
        model.release.set()
        assert (await asyncio.wait_for(asyncio.wrap_future(source), 30)).value == "GATE"
        assert mapped.cancelled()
        assert then(batcher.submit("next"), lambda d: d.value).result(30) == "NEXT"
    finally:
        await asyncio.to_thread(batcher.close)
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


def test_cancelling_the_mapped_future_withdraws_the_queued_request(model):
    batcher = make(model)
    try:
        hold(batcher, model)
        withdrawn = then(batcher.submit("withdrawn"), lambda done: done.value)
        assert withdrawn.cancel()
        kept = batcher.submit("kept")
        model.release.set()
        assert kept.result(30).value == "KEPT" and "withdrawn" not in model.computed()
    finally:
        batcher.close()


def test_a_raising_batch_fails_only_its_own_futures(model):
    batcher = make(model, group_by=lambda item: item.startswith("boom"))
    try:
        hold(batcher, model)
        failing, fine = batcher.submit("boom"), batcher.submit("fine")
        model.release.set()
        with pytest.raises(RuntimeError, match="failed on this batch"):
            failing.result(30)
        assert fine.result(30).value == "FINE"
        assert batcher.submit("after").result(30).value == "AFTER"
    finally:
        batcher.close()


def test_an_exception_result_fails_only_its_item(model):
    batcher = make(model)
    try:
        hold(batcher, model)
        bad, good = batcher.submit("bad-item"), batcher.submit("good")
        model.release.set()
        with pytest.raises(ValueError, match="cannot compute bad-item"):
            bad.result(30)
        assert good.result(30).value == "GOOD"
    finally:
        batcher.close()


def test_close_fails_queued_requests_finishes_the_running_batch_and_is_idempotent(model):
    batcher = make(model)
    gate = hold(batcher, model)
    queued = batcher.submit("queued")
    closing = threading.Thread(target=batcher.close)
    closing.start()
    with pytest.raises(EngineStopped, match=r"closed \(shutting down\) before this request ran"):
        queued.result(30)
    model.release.set()
    closing.join(30)
    assert not closing.is_alive() and gate.result(0).value == "GATE"
    batcher.close()  # again: nothing to do, returns at once
    with pytest.raises(EngineStopped, match="test batcher is closed"):
        batcher.submit("late")
    assert "queued" not in model.computed()


def test_a_cost_budget_bounds_each_batch_and_an_oversized_item_runs_alone(model):
    batcher = make(model, max_batch=100, cost=len, max_cost=6)
    try:
        gate = hold(batcher, model)
        items = ["aa", "bbb", "c", "dddd", "e" * 10, "f"]
        futures = [batcher.submit(x) for x in items]
        model.release.set()
        assert [f.result(30).value for f in futures] == [x.upper() for x in items]
        gate.result(30)
        assert model.groups[1:] == [["aa", "bbb", "c"], ["dddd"], ["e" * 10], ["f"]]
    finally:
        batcher.close()


def test_a_full_cost_budget_starts_the_batch_without_waiting_out_the_window(model):
    batcher = make(model, wait_ms=60_000, cost=len, max_cost=4)
    try:
        assert batcher.submit("abcd").result(30).value == "ABCD"  # would wait a minute by the window
    finally:
        batcher.close()


def test_cost_and_max_cost_go_together(model):
    with pytest.raises(ValueError, match="go together"):
        make(model, cost=len)
    with pytest.raises(ValueError, match="go together"):
        make(model, max_queued_cost=10)


def test_the_queued_cost_is_bounded_but_a_lone_item_is_always_taken(model):
    """``max_queued_cost`` bounds what waits (e.g. tokens of queued images); an item bigger than
    the bound still runs when it is alone."""
    batcher = make(model, wait_ms=60_000, max_batch=100, cost=len, max_cost=1000, max_queued_cost=6)
    try:
        first = batcher.submit("abcd")
        with pytest.raises(LimitExceeded, match="4 tokens waiting and this request brings 3"):
            batcher.submit("xyz")
        second = batcher.submit("xy")  # 6: within the bound
        first.cancel()  # withdrawn: its cost leaves the bound
        third = batcher.submit("pqrs")
        assert not second.done() and not third.done()
    finally:
        batcher.close()
    lone = make(model, wait_ms=0, cost=len, max_cost=1000, max_queued_cost=2)
    try:
        assert lone.submit("abcdef").result(30).value == "ABCDEF"
    finally:
        lone.close()


def test_a_withdrawn_request_holds_no_place_in_the_next_batch(model):
    batcher = make(model, max_batch=2, wait_ms=60_000)  # a batch starts only when two are queued
    try:
        withdrawn = batcher.submit("a")
        assert withdrawn.cancel()
        pair = [batcher.submit("b"), batcher.submit("c")]
        assert [f.result(30).value for f in pair] == ["B", "C"]
        assert model.groups == [["b", "c"]] and {f.result().batch_size for f in pair} == {2}
    finally:
        batcher.close()
