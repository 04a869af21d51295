"""The Generative judge's side of an evaluation: each example's prompt judged alone, and its
response judged with the conversation, whole (the judge does not stream), then scored like the
stream guard: strict and loose F1, and what the domain's policy would do with each judgment."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any

from guard.evaluation.dataset import Example
from guard.evaluation.metrics import classification, rate
from guard.judge.judgment import Judgment, judgment_action
from guard.model.labels import RiskLevel
from guard.policy.actions import Action
from guard.policy.rules import Policy

Classify = Callable[[list[dict]], Awaitable[Judgment]]


@dataclass(frozen=True)
class JudgedExample:
    example: Example
    prompt: Judgment | None  # None when the judge failed (``error``)
    response: Judgment | None  # None without a response, or when the judge failed
    error: str = ""


async def judge_examples(classify: Classify, examples: Sequence[Example], *, concurrency: int = 16,
                         on_done: Callable[[JudgedExample], None] | None = None) -> list[JudgedExample]:  # fmt: skip
    """Every example's prompt (and response) judged, ``concurrency`` examples at a time."""
    gate = asyncio.Semaphore(concurrency)

    async def one(example: Example) -> JudgedExample:
        async with gate:
            messages = [m.as_dict() for m in example.messages]
            try:
                prompt = await classify([m.as_dict() for m in example.prompt_messages])
                response = await classify(messages) if example.has_response else None
                judged = JudgedExample(example, prompt, response)
            except Exception as exc:  # a judge failure is counted, never a crash of the whole run
                judged = JudgedExample(example, None, None, f"{type(exc).__name__}: {exc}")
        if on_done is not None:
            on_done(judged)
        return judged

    return list(await asyncio.gather(*(one(example) for example in examples)))


def judge_summary(judged: Sequence[JudgedExample], policy: Policy, seconds: float) -> dict[str, Any]:
    """Strict/loose classification, prompts blocked and responses stopped under ``policy``."""
    ok = [j for j in judged if not j.error]
    prompts = [j for j in ok if j.example.prompt_label is not None]
    responses = [j for j in ok if j.example.response_label is not None and j.response is not None]

    def action(judgment: Judgment) -> Action:
        return judgment_action(policy, judgment)[1]

    unsafe = [j for j in responses if j.example.response_label is RiskLevel.UNSAFE]
    safe = [j for j in responses if j.example.response_label is RiskLevel.SAFE]
    return {
        "examples": len(judged),
        "failed": len(judged) - len(ok),
        "prompt": {
            **classification([(j.example.prompt_label, j.prompt.risk) for j in prompts]),
            "blocked": sum(1 for j in ok if action(j.prompt) is Action.BLOCK),
        },
        "response": {
            **classification([(j.example.response_label, j.response.risk) for j in responses]),
            "stop_rate": rate(sum(1 for j in unsafe if action(j.response) is Action.INTERRUPT), len(unsafe)),
            "false_interrupt_rate": rate(sum(1 for j in safe if action(j.response) is Action.INTERRUPT), len(safe)),
        },
        "ms_per_example": seconds * 1e3 / len(judged) if judged else None,
    }
