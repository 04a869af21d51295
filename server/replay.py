"""`Policies.Replay`: `guard eval` against a running sidecar, for a policy UI or a CI job without
shell access. Examples arrive one per message (the JSONL lines of `guard eval`), run through the
same evaluation (guard/evaluation) on the sidecar's loaded model, and their outcomes go back in
the examples' order while later ones are still being judged; the summary is `guard eval --json`'s.

Bounded: at most MAX_EXAMPLES per call and MAX_IN_FLIGHT examples judged at once (the request
stream is not read further until one finishes); a caller that goes away cancels what is in
flight, and every session is closed.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections import deque
from collections.abc import AsyncIterator

import grpc

from guard.errors import EngineError, InvalidInput
from guard.evaluation.dataset import parse_example
from guard.evaluation.metrics import action_changes, summarize
from guard.evaluation.runner import ExampleResult, evaluate_example, risk_levels
from guard.policy.loader import PolicyError, PolicyStore, load_policies, read_policy_dir
from guard.policy.rules import Policy
from server.qwen3guard.v1 import guard_pb2 as pb
from server.wire import ACTION

MAX_EXAMPLES = 10_000
MAX_IN_FLIGHT = 32
CANDIDATE_SOURCE = "(candidate)"


def candidate_policy(store: PolicyStore, domain: str, text: str) -> Policy:
    """``text`` compiled as ``domain``'s policy among the store's other files (so it may extend them)."""
    files = dict(read_policy_dir(store.directory)) if store.directory is not None else {}
    files[domain] = (CANDIDATE_SOURCE, text)
    try:
        policies, _ = load_policies(files)
    except PolicyError as exc:
        raise InvalidInput(f"the candidate policy is invalid:\n{exc}") from None
    return policies[domain]


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
    """The Replay exchange (InvalidInput for a caller's mistake: the servicer answers INVALID_ARGUMENT)."""
    first = await anext(requests, None)
    if first is None or first.WhichOneof("kind") != "options":
        raise InvalidInput("the first Replay message must be `options` (the domain, and a candidate policy if any)")
    domain = first.options.domain or store.default_domain
    policy = store.get(domain)
    candidate = None
    if first.options.candidate_yaml:
        candidate = await asyncio.to_thread(candidate_policy, store, domain, first.options.candidate_yaml)
    levels = risk_levels(runtime)
    labels = runtime.guard.config.response_risk
    results: list[ExampleResult] = []
    candidates: list[ExampleResult] = []
    skipped = 0
    pending: deque[tuple[int, asyncio.Task | str]] = deque()
    started = time.perf_counter()

    async def judge(example) -> tuple[ExampleResult, ExampleResult | None] | str:
        try:
            current = await evaluate_example(runtime, example, policy, levels)
            other = await evaluate_example(runtime, example, candidate, levels) if candidate is not None else None
        except EngineError as exc:  # this example only (over the token limit, say): reported, the rest go on
            return f"example {example.line}: the guard refused it: {exc}"
        return current, other

    def finished(index: int, done: asyncio.Task | str) -> pb.ReplayResponse:
        nonlocal skipped
        if isinstance(done, str):
            skipped += 1
            return pb.ReplayResponse(outcome=pb.ReplayOutcome(index=index, error=done))
        judged = done.result()
        if isinstance(judged, str):
            skipped += 1
            return pb.ReplayResponse(outcome=pb.ReplayOutcome(index=index, error=judged))
        current, other = judged
        results.append(current)
        if other is not None:
            candidates.append(other)
        return pb.ReplayResponse(outcome=_outcome(index, current, other))

    try:
        index = 0
        async for request in requests:
            if request.WhichOneof("kind") != "example_json":
                raise InvalidInput("after `options`, every Replay message is an `example_json`")
            index += 1
            if index > MAX_EXAMPLES:
                raise InvalidInput(f"at most {MAX_EXAMPLES} examples per Replay call; split the data set")
            try:
                example = parse_example(request.example_json, index, labels)
                pending.append((index, asyncio.ensure_future(judge(example))))
            except InvalidInput as exc:
                pending.append((index, f"example {index}: {exc}"))
            while pending and (isinstance(pending[0][1], str) or pending[0][1].done()):
                yield finished(*pending.popleft())
            if len(pending) >= MAX_IN_FLIGHT:  # read no further until the oldest is judged
                head = pending[0][1]
                if not isinstance(head, str):
                    await asyncio.wait({head})
                while pending and (isinstance(pending[0][1], str) or pending[0][1].done()):
                    yield finished(*pending.popleft())
        while pending:
            index_done, task = pending.popleft()
            if not isinstance(task, str):
                await asyncio.wait({task})
            yield finished(index_done, task)
    finally:
        tasks = [task for _, task in pending if not isinstance(task, str)]
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task
    seconds = time.perf_counter() - started
    summary = pb.ReplaySummary(examples=len(results), skipped=skipped, policy_version=policy.version,
                               metrics_json=json.dumps(summarize(results, seconds)))  # fmt: skip
    if candidate is not None:
        summary.candidate_policy_version = candidate.version
        summary.candidate_metrics_json = json.dumps(summarize(candidates, seconds))
        summary.changes_json = json.dumps(action_changes(results, candidates))
    yield pb.ReplayResponse(summary=summary)
