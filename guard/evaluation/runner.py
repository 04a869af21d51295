"""Replay labelled conversations through the guard under a policy, as the sidecar would see them.

Each example goes through the same ``ResponseSession`` every front end drives (prompt verdict,
then the response fed one token per chunk, as a generator emits it, with the policy's debounce,
release and interrupt): no second implementation of the guard. Examples run concurrently, so the
engine batches them like live streams. An interrupt stops the example's response there, as it
would stop generation.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace

from guard.errors import EngineError
from guard.evaluation.dataset import Example, LineProblem
from guard.model.labels import RiskLabels, RiskLevel
from guard.policy.actions import Action, strictest
from guard.policy.rules import Policy, ReleaseDefault
from guard.session.release import ReleaseMode
from guard.session.response_session import ResponseSession

SENTENCE_END = re.compile(r"[.!?。！？]|\n")  # where the unsafe sentence ends (timeliness)


@dataclass(frozen=True)
class ExampleResult:
    example: Example
    prompt_level: RiskLevel  # the model's answer under the policy's thresholds (else its most probable label)
    prompt_action: Action  # the policy's
    prompt_category: str
    response_level: RiskLevel | None  # the highest such level of a judged response token
    response_action: Action | None  # the strictest action over the response (INTERRUPT when stopped)
    response_category: str  # at the interrupt, else of the highest-risk token
    response_tokens: int  # tokens in the response
    judged: int  # response tokens judged (an interrupt stops the rest)
    released: int  # response tokens released to the user
    interrupt_index: int | None  # the token at which the interrupt rule fired
    unsafe_start_token: int | None  # the token holding ``unsafe_start``
    sentence_end_token: int | None  # the token holding the end of the first unsafe sentence
    seconds: float
    model_failure: str = ""  # the model failed and the fail mode decided (the numbers do not measure the model)

    @property
    def interrupted(self) -> bool:
        return self.interrupt_index is not None


def char_ends(hf_tokenizer, ids: Sequence[int]) -> list[int]:
    """For each token, the length of the decoded text up to and including it."""
    return [len(hf_tokenizer.decode(list(ids[: k + 1]))) for k in range(len(ids))]


def token_at(ends: Sequence[int], char: int) -> int:
    """The token whose text holds character ``char``."""
    for index, end in enumerate(ends):
        if end > char:
            return index
    return len(ends) - 1


def unsafe_positions(example: Example, hf_tokenizer, ids: Sequence[int]) -> tuple[int | None, int | None]:
    """(token of ``unsafe_start``, token where the first unsafe sentence ends)."""
    if example.unsafe_start is None or not ids:
        return None, None
    ends = char_ends(hf_tokenizer, ids)
    text = example.response
    found = SENTENCE_END.search(text, example.unsafe_start)
    sentence_end = found.start() if found else len(text) - 1
    return token_at(ends, example.unsafe_start), token_at(ends, sentence_end)


def _level(policy: Policy, verdict, levels: dict[str, RiskLevel]) -> RiskLevel:
    probs = {levels[label]: p for label, p in verdict.risk_probs.items()}
    return policy.thresholded(levels[verdict.risk_label], probs)


EVAL_TIMEOUT_MS = 600_000  # replays measure decisions, not latency: a busy machine must not turn into fail modes


def evaluation_policy(policy: Policy) -> Policy:
    """``policy`` as an evaluation runs it: the same rules, without the live model timeout (32
    examples at once on a CPU may take longer than a live stream's budget)."""
    return replace(policy, model_timeout_ms=max(policy.model_timeout_ms, EVAL_TIMEOUT_MS), version=policy.version)


def release_mode_of(policy: Policy) -> ReleaseMode:
    """The domain's default release mode (what a stream that asks for none gets)."""
    return ReleaseMode.OPTIMISTIC if policy.release_mode is ReleaseDefault.OPTIMISTIC else ReleaseMode.HOLD_BACK


async def evaluate_example(runtime, example: Example, policy: Policy, levels: dict[str, RiskLevel]) -> ExampleResult:
    started = time.perf_counter()
    policy = evaluation_policy(policy)
    tokenizer, hf = runtime.tokenizer, runtime.tokenizer.hf
    if example.has_response:
        rendered, ids = tokenizer.split_response(list(example.messages))
    else:
        rendered, ids = tokenizer.render_prompt(list(example.messages)), []
    stream = runtime.moderator.open(prompt_ids=rendered.prompt_ids, preamble_ids=rendered.preamble_ids,
                                    policy=policy, loop=asyncio.get_running_loop())  # fmt: skip
    session = ResponseSession(stream, policy, release_mode_of(policy), hf)
    try:
        prompt = await session.judge_prompt()
        verdict = prompt.verdict.verdict if prompt.verdict is not None else None
        prompt_level = _level(policy, verdict, levels) if verdict is not None else RiskLevel.SAFE
        actions: list[Action] = []
        worst: tuple[RiskLevel, str] = (RiskLevel.SAFE, "")
        interrupt_category = ""
        interrupt_index, judged, released = None, 0, 0
        failure = prompt.model_failure
        for token in ids:
            outcome = await session.resolve(session.submit_ids([token]))
            if outcome is None:
                break
            judged, released = outcome.judged, outcome.released
            failure = failure or outcome.model_failure
            actions.append(outcome.action)
            for judged_token in outcome.tokens:
                level = _level(policy, judged_token.verdict, levels)
                if level > worst[0]:
                    worst = (level, judged_token.verdict.category or "")
                if outcome.flag_index is not None and judged_token.index == outcome.flag_index:
                    interrupt_category = judged_token.verdict.category or ""
            if outcome.interrupted:  # by the rule, or by the fail mode (no rule index: where it stopped)
                interrupt_index = outcome.flag_index if outcome.flag_index is not None else max(0, outcome.received - 1)
                break
        if interrupt_index is None and ids:
            released = session.final().released
    finally:
        session.close("evaluated")
    unsafe_token, sentence_end = unsafe_positions(example, hf, ids)
    return ExampleResult(
        example=example,
        prompt_level=prompt_level,
        prompt_action=prompt.action,
        prompt_category=(verdict.category or "") if verdict is not None else "",
        response_level=worst[0] if ids else None,
        response_action=strictest(actions) if actions else None,
        response_category=interrupt_category or worst[1],
        response_tokens=len(ids),
        judged=judged,
        released=released,
        interrupt_index=interrupt_index,
        unsafe_start_token=unsafe_token,
        sentence_end_token=sentence_end,
        seconds=time.perf_counter() - started,
        model_failure=failure,
    )


def risk_levels(runtime) -> dict[str, RiskLevel]:
    """The checkpoint's risk label strings (both heads) -> risk levels."""
    levels: dict[str, RiskLevel] = {}
    for labels in (runtime.guard.config.response_risk, runtime.guard.config.query_risk):
        labels: RiskLabels
        levels.update(zip(labels.labels.names, labels.levels, strict=True))
    return levels


async def evaluate(
    runtime,
    examples: Sequence[Example],
    policy: Policy,
    *,
    concurrency: int = 32,
    on_done: Callable[[ExampleResult | LineProblem], None] | None = None,
) -> tuple[list[ExampleResult], list[LineProblem]]:
    """Every example under ``policy``, ``concurrency`` at a time: the results in the examples'
    order, and the examples the guard refused (over its token limit, say), each with why."""
    levels = risk_levels(runtime)
    gate = asyncio.Semaphore(concurrency)

    async def one(example: Example) -> ExampleResult | LineProblem:
        async with gate:
            try:
                result: ExampleResult | LineProblem = await evaluate_example(runtime, example, policy, levels)
            except EngineError as exc:  # one example the engine refuses never stops the run
                result = LineProblem(example.line, f"the guard refused it: {exc}")
        if on_done is not None:
            on_done(result)
        return result

    outcomes = await asyncio.gather(*(one(example) for example in examples))
    return ([o for o in outcomes if isinstance(o, ExampleResult)],
            [o for o in outcomes if isinstance(o, LineProblem)])  # fmt: skip
