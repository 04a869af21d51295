"""Labelled conversations for `guard eval`, one JSON object per line.

``messages`` (the conversation; a final assistant turn is the response, streamed token by token),
optional ``prompt_label`` / ``response_label`` (the checkpoint's risk labels: Safe, Controversial,
Unsafe), optional ``unsafe_start`` (character offset in the final assistant turn where unsafe
content begins) and ``id``. Unknown fields are ignored. A malformed line is reported with its
number and skipped, never fatal: a data set with one typo still evaluates.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass

from guard.errors import InvalidInput
from guard.model.labels import RiskLabels, RiskLevel
from guard.text.conversation import Message, parse_messages


@dataclass(frozen=True)
class Example:
    line: int  # 1-based line in the file
    id: str
    messages: tuple[Message, ...]
    prompt_label: RiskLevel | None
    response_label: RiskLevel | None
    unsafe_start: int | None

    @property
    def has_response(self) -> bool:
        return self.messages[-1].role == "assistant"

    @property
    def prompt_messages(self) -> tuple[Message, ...]:
        return self.messages[:-1] if self.has_response else self.messages

    @property
    def response(self) -> str:
        return self.messages[-1].content if self.has_response else ""


@dataclass(frozen=True)
class LineProblem:
    line: int
    error: str


def _level(value: object, field: str, labels: RiskLabels) -> RiskLevel | None:
    if value is None:
        return None
    names = {name.lower(): level for name, level in zip(labels.labels.names, labels.levels, strict=True)}
    if not isinstance(value, str) or value.strip().lower() not in names:
        raise InvalidInput(f"`{field}` must be one of {', '.join(labels.labels.names)}, got {value!r}")
    return names[value.strip().lower()]


def parse_example(text: str, line: int, labels: RiskLabels) -> Example:
    """One line; InvalidInput says what is wrong with it."""
    try:
        raw = json.loads(text)
    except json.JSONDecodeError as exc:
        raise InvalidInput(f"not JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(raw, dict):
        raise InvalidInput("expected a JSON object with `messages`")
    if not isinstance(raw.get("messages"), list):
        raise InvalidInput("`messages` must be a list of {role, content}")
    messages = tuple(parse_messages(raw["messages"]))
    if messages[-1].role not in ("user", "assistant"):
        raise InvalidInput("the conversation must end with a user turn (a prompt) or an assistant turn (a response)")
    if messages[-1].role == "assistant" and len(messages) < 2:
        raise InvalidInput("a response needs the user turn before it")
    prompt_label = _level(raw.get("prompt_label"), "prompt_label", labels)
    response_label = _level(raw.get("response_label"), "response_label", labels)
    has_response = messages[-1].role == "assistant"
    if response_label is not None and not has_response:
        raise InvalidInput("`response_label` given, but the conversation does not end with an assistant turn")
    unsafe_start = raw.get("unsafe_start")
    if unsafe_start is not None:
        length = len(messages[-1].content)
        if isinstance(unsafe_start, bool) or not isinstance(unsafe_start, int) or not 0 <= unsafe_start < length:
            raise InvalidInput(f"`unsafe_start` must be a character offset in the response (0..{length - 1}), "
                               f"got {unsafe_start!r}")  # fmt: skip
        if not has_response or response_label is RiskLevel.SAFE:
            raise InvalidInput("`unsafe_start` needs a response that is not labelled Safe")
    identifier = raw.get("id", f"line-{line}")
    return Example(line, str(identifier), messages, prompt_label, response_label, unsafe_start)


def read_examples(lines: Iterable[str], labels: RiskLabels) -> tuple[list[Example], list[LineProblem]]:
    """The examples of a JSONL text, and the lines skipped with why (blank lines are neither)."""
    examples, problems = [], []
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        try:
            examples.append(parse_example(text, number, labels))
        except InvalidInput as exc:
            problems.append(LineProblem(number, str(exc)))
    return examples, problems
