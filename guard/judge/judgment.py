"""Generative Qwen3Guard judgments: what the model says, parsed with the official patterns.

Output that does not parse is a ``JudgmentParseError``, handled by the domain's fail mode by
the caller, never a silent Safe.
"""

from __future__ import annotations

import enum
import re
from dataclasses import dataclass, field

from guard.model.labels import RiskLevel
from guard.policy.actions import SEVERITY, Action
from guard.policy.rules import Policy

SAFETY = re.compile(r"Safety: (Safe|Unsafe|Controversial)")
CATEGORY = re.compile(
    r"(Violent|Non-violent Illegal Acts|Sexual Content or Sexual Acts|PII|Suicide & Self-Harm|Unethical Acts|"
    r"Politically Sensitive Topics|Copyright Violation|Jailbreak|None)"
)
REFUSAL = re.compile(r"Refusal: (Yes|No)")
RISK_OF = {"Safe": RiskLevel.SAFE, "Unsafe": RiskLevel.UNSAFE, "Controversial": RiskLevel.CONTROVERSIAL}
# Policy order (reference); Jailbreak is for prompts only.
GEN_CATEGORIES = (
    "Violent",
    "Non-violent Illegal Acts",
    "Sexual Content or Sexual Acts",
    "PII",
    "Suicide & Self-Harm",
    "Unethical Acts",
    "Politically Sensitive Topics",
    "Copyright Violation",
    "Jailbreak",
)


class JudgeMode(enum.Enum):
    PROMPT = "prompt"  # the conversation ends with a user turn
    RESPONSE = "response"  # it ends with an assistant turn: adds refusal detection


class JudgmentParseError(ValueError):
    """The model's output does not follow the official format."""


@dataclass(frozen=True)
class Judgment:
    mode: JudgeMode
    risk: RiskLevel
    categories: tuple[str, ...]  # empty when safe
    refusal: bool | None  # response mode only
    raw_text: str
    risk_probs: dict[str, float] = field(default_factory=dict)  # scored mode: "Safe"/"Unsafe"/"Controversial"
    category_probs: dict[str, float] = field(default_factory=dict)  # scored mode
    queue_s: float = 0.0
    inference_s: float = 0.0


def mode_of(messages: list[dict]) -> JudgeMode:
    return JudgeMode.RESPONSE if messages[-1]["role"] == "assistant" else JudgeMode.PROMPT


def parse_output(text: str, mode: JudgeMode) -> tuple[RiskLevel, tuple[str, ...], bool | None]:
    """Risk, categories and refusal from the model's text; JudgmentParseError when it does not parse."""
    safety = SAFETY.search(text)
    if safety is None:
        raise JudgmentParseError(f"no 'Safety: Safe|Unsafe|Controversial' line in the model output {text[:200]!r}")
    line = re.search(r"Categories:([^\n]*)", text)
    found = CATEGORY.findall(line.group(1) if line else text)
    categories = tuple(dict.fromkeys(c for c in found if c != "None"))
    if mode is JudgeMode.RESPONSE and "Jailbreak" in categories:
        categories = tuple(c for c in categories if c != "Jailbreak")
    refusal = None
    if mode is JudgeMode.RESPONSE:
        match = REFUSAL.search(text)
        if match is None:
            raise JudgmentParseError(f"no 'Refusal: Yes|No' line in the model output {text[:200]!r}")
        refusal = match.group(1) == "Yes"
    return RISK_OF[safety.group(1)], categories, refusal


def lines_complete(text: str, mode: JudgeMode) -> bool:
    """The output holds every line the mode needs (generation may stop)."""
    if mode is JudgeMode.RESPONSE:
        return REFUSAL.search(text) is not None
    return re.search(r"Categories:[^\n]*\n", text) is not None


def judgment_action(policy: Policy, judgment: Judgment) -> tuple[RiskLevel, Action]:
    """The domain's effective level and action for a judgment: each category decided, the strictest kept."""
    stage = "prompt" if judgment.mode is JudgeMode.PROMPT else "response"
    probs = None
    if judgment.risk_probs:
        probs = {RiskLevel[k.upper()]: v for k, v in judgment.risk_probs.items()}
    decisions = [policy.decide(stage, judgment.risk, c, probs) for c in judgment.categories or (None,)]
    return max(decisions, key=lambda d: SEVERITY.index(d[1]))
