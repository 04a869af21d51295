"""`Policies.Replay`: `guard eval` against a running sidecar, for a policy UI or a CI job without
shell access. Examples arrive one per message (the JSONL lines of `guard eval`), run through the
same evaluation (guard/evaluation) on the sidecar's loaded model, and their outcomes go back in
the examples' order while later ones are still being judged; the summary is `guard eval --json`'s.

Bounded: at most MAX_EXAMPLES per call and MAX_IN_FLIGHT examples ahead of the last outcome
sent (the request stream is not read further meanwhile); a caller that goes away cancels what
is in flight, and every session is closed. ``ms_per_token`` in the summary is wall time from the
first example's start to the last one's end per judged token (with a candidate, both policies'
judging shares that time).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import AsyncIterator

import grpc

from guard.errors import EngineError, InvalidInput
from guard.evaluation.dataset import parse_example
from guard.evaluation.metrics import action_changes, summarize
from guard.evaluation.runner import ExampleResult, evaluate_example, risk_levels
from guard.policy.loader import PolicyError, PolicyStore
from guard.policy.rules import Policy
from server.qwen3guard.v1 import guard_pb2 as pb
from server.wire import ACTION

MAX_EXAMPLES = 10_000
MAX_IN_FLIGHT = 32
CANDIDATE_SOURCE = "(candidate)"


def candidate_policy(store: PolicyStore, domain: str, text: str) -> Policy:
    """``text`` as ``domain``'s policy against the active set (it may extend a domain the caller may use)."""
    try:
        return store.candidate(domain, text, CANDIDATE_SOURCE)
    except (PolicyError, ValueError) as exc:
        raise InvalidInput(f"the candidate policy is invalid:\n{exc}") from None


def _outcome(index: int, result: ExampleResult, candidate: ExampleResult | None) -> pb.ReplayOutcome:
    out = pb.ReplayOutcome(index=index, id=result.example.id, prompt_action=ACTION[result.prompt_action],
                           released=result.released)  # fmt: skip
    if result.response_action is not None:
        out.response_action = ACTION[result.response_action]
    if result.interrupt_index is not None:
        out.interrupt_index = result.interrupt_index
    if candidate is not None:
        out.candidate_prompt_action = ACTION[candidate.prompt_action]
        if candidate.response_action is not None:
            out.candidate_response_action = ACTION[candidate.response_action]
        if candidate.interrupt_index is not None:
            out.candidate_interrupt_index = candidate.interrupt_index
    return out


async def replay(
    requests: AsyncIterator[pb.ReplayRequest], context: grpc.aio.ServicerContext, store: PolicyStore, runtime
) -> AsyncIterator[pb.ReplayResponse]:
    """The Replay exchange (InvalidInput for a caller's mistake: the servicer answers INVALID_ARGUMENT).

    A reader task takes the examples and starts judging them, at most MAX_IN_FLIGHT ahead (the
    queue's bound stops it reading further); this generator sends each outcome as soon as it and
    those before it are done, whether or not more examples arrive."""
    first = await anext(requests, None)
    if first is None or first.WhichOneof("kind") != "options":
        raise InvalidInput("the first Replay message must be `options` (the domain, and a candidate policy if any)")
    domain = first.options.domain or store.default_domain
    policy = store.get(domain)
    candidate = candidate_policy(store, domain, first.options.candidate_yaml) if first.options.candidate_yaml else None
    levels = risk_levels(runtime)
    labels = runtime.guard.config.response_risk
    results: list[ExampleResult] = []
    candidates: list[ExampleResult] = []
    clock: dict[str, float] = {}  # the first example's start, the last one's end
    refused: list[dict] = []
    skipped = 0
    queue: asyncio.Queue = asyncio.Queue(MAX_IN_FLIGHT)  # (index, task | error text), None at the end
    started_tasks: list[asyncio.Task] = []

    async def judge(example) -> tuple[ExampleResult, ExampleResult | None] | str:
        clock.setdefault("start", time.perf_counter())
        try:
            current = await evaluate_example(runtime, example, policy, levels)
            other = await evaluate_example(runtime, example, candidate, levels) if candidate is not None else None
        except EngineError as exc:  # this example only (over the token limit, say): reported, the rest go on
            refused.append({"line": example.line, "error": f"the guard refused it: {exc}"})
            return f"example {example.line}: the guard refused it: {exc}"
        finally:
            clock["end"] = time.perf_counter()
        return current, other

    async def read() -> None:
        index = 0
        async for request in requests:
            if request.WhichOneof("kind") != "example_json":
                raise InvalidInput("after `options`, every Replay message is an `example_json`")
            index += 1
            if index > MAX_EXAMPLES:
                raise InvalidInput(f"at most {MAX_EXAMPLES} examples per Replay call; split the data set")
            try:
                example = parse_example(request.example_json, index, labels)
            except InvalidInput as exc:
                await queue.put((index, f"example {index}: {exc}"))
                continue
            task = asyncio.ensure_future(judge(example))
            started_tasks.append(task)
            await queue.put((index, task))
        await queue.put(None)

    reader = asyncio.ensure_future(read())
    try:
        while True:
            getting = asyncio.ensure_future(queue.get())
            await asyncio.wait({getting, reader}, return_when=asyncio.FIRST_COMPLETED)
            if not getting.done():  # the reader ended first: with an error, or after its last put
                getting.cancel()
                if reader.exception() is not None:
                    raise reader.exception()
                getting = asyncio.ensure_future(queue.get())
            item = await getting
            if item is None:
                break
            index, judged = item
            if not isinstance(judged, str):
                judged = await judged
            if isinstance(judged, str):
                skipped += 1
                yield pb.ReplayResponse(outcome=pb.ReplayOutcome(index=index, error=judged))
                continue
            current, other = judged
            results.append(current)
            if other is not None:
                candidates.append(other)
            yield pb.ReplayResponse(outcome=_outcome(index, current, other))
    finally:
        for task in (reader, *started_tasks):
            task.cancel()
        for task in (reader, *started_tasks):
            with contextlib.suppress(BaseException):
                await task
    seconds = clock.get("end", 0.0) - clock.get("start", 0.0)
    metrics = {**summarize(results, seconds), "refused": refused}
    summary = pb.ReplaySummary(examples=len(results), skipped=skipped, policy_version=policy.version,
                               metrics_json=json.dumps(metrics))  # fmt: skip
    if candidate is not None:
        summary.candidate_policy_version = candidate.version
        summary.candidate_metrics_json = json.dumps({**summarize(candidates, seconds), "refused": refused})
        summary.changes_json = json.dumps(action_changes(results, candidates))
    yield pb.ReplayResponse(summary=summary)
