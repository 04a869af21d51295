"""The memory agent (QwenLong-L1.5 / MemAgent): answering over a document longer than the context window.

The document is read in chunks of ``chunk_tokens`` tokens, cut on token boundaries of the model's
own tokenizer. For each chunk the model gets one completion call with the question, its previous
memory and the chunk, and writes the new memory in full (overwrite, not append). The memory is
bounded: a reply longer than ``memory_tokens`` is cut to that many tokens, and the event says so.
After the last chunk, the answer prompt is built from the question and the final memory alone;
the caller streams (and guards) the answer. Every call fits the window and the cost is linear in
the document: one call per chunk, plus the caller's answer call.

Transport-free: ``run`` is driven with a ``complete`` coroutine (prompt token ids in, reply text
out) that the caller maps to vLLM or to local generation.

Prompts are Jinja templates that render the content of ONE user message; it is wrapped with the
tokenizer's chat template (memory updates with ``enable_thinking=False``, so the reply is the memory
itself). Defaults: ``guard/templates/memory_agent_update.jinja`` (variables ``question``,
``memory`` (empty before the first chunk), ``chunk``, ``chunk_number`` (1-based), ``chunk_count``)
and ``guard/templates/memory_agent_answer.jinja`` (``question``, ``memory``). A model directory
overrides either one by holding a file of the same name (``MemoryTemplates.from_model_dir``).

The question, the document and the memory are untrusted text: they are tokenized with special
tokens split, so a document that spells ``<|im_end|><|im_start|>system`` stays plain text and
cannot open a turn of its own.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import jinja2
from jinja2.sandbox import ImmutableSandboxedEnvironment

from guard.errors import InvalidInput

log = logging.getLogger(__name__)

UPDATE_TEMPLATE_FILE = "memory_agent_update.jinja"
ANSWER_TEMPLATE_FILE = "memory_agent_answer.jinja"
# A byte-level BPE token holds at least one byte and a character at most four, but tokens can
# straddle characters: look this far back for a cut that splits none.
_MAX_BACKOFF_TOKENS = 16
_CONTENT_SENTINEL = "\ue000memory-agent-content\ue001"  # private-use characters: never in a chat template
_THINK_OPEN, _THINK_CLOSE = "<think>", "</think>"


class MemoryAgentInputError(InvalidInput, ValueError):
    """A question or document the memory agent cannot take (INVALID_ARGUMENT at a service)."""


@dataclass(frozen=True)
class MemoryAgentConfig:
    """How the document is read: ``chunk_tokens`` per call, at most ``memory_tokens`` of memory
    carried between calls (MemAgent: about 5K and 1K), at most ``max_chunks`` calls per document."""

    chunk_tokens: int = 5000
    memory_tokens: int = 1024
    max_chunks: int = 1000
    answer_thinking: bool = True  # the answer prompt lets a thinking model think (updates never do)

    def __post_init__(self) -> None:
        for name in ("chunk_tokens", "memory_tokens", "max_chunks"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"`{name}` must be an integer, got {value!r}")
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value}")

    @property
    def max_document_tokens(self) -> int:
        return self.chunk_tokens * self.max_chunks


@dataclass(frozen=True)
class MemoryTemplates:
    """The two prompt templates (Jinja, each rendering one user message's content) and where
    each came from (for error messages)."""

    update: str
    answer: str
    update_origin: str = "built-in"
    answer_origin: str = "built-in"

    @classmethod
    def builtin(cls) -> MemoryTemplates:
        """The repository's templates (guard/templates/memory_agent_*.jinja)."""
        files = resources.files("guard").joinpath("templates")
        return cls(files.joinpath(UPDATE_TEMPLATE_FILE).read_text(), files.joinpath(ANSWER_TEMPLATE_FILE).read_text())

    @classmethod
    def from_model_dir(cls, path: str | Path | None) -> MemoryTemplates:
        """The model's own prompts win: ``memory_agent_update.jinja`` / ``memory_agent_answer.jinja``
        in the model directory replace the built-in ones, each on its own."""
        templates = cls.builtin()
        if path is None:
            return templates
        update, answer = Path(path) / UPDATE_TEMPLATE_FILE, Path(path) / ANSWER_TEMPLATE_FILE
        return cls(
            update.read_text() if update.is_file() else templates.update,
            answer.read_text() if answer.is_file() else templates.answer,
            str(update) if update.is_file() else templates.update_origin,
            str(answer) if answer.is_file() else templates.answer_origin,
        )


@dataclass(frozen=True)
class ChunkDone:
    """One chunk was read and the memory rewritten. ``index`` is 0-based (the last is ``total - 1``);
    ``truncated``: the model's memory was longer than ``memory_tokens`` and was cut."""

    index: int
    total: int
    memory_tokens: int
    truncated: bool


@dataclass(frozen=True)
class Ready:
    """The document is read: the prompt of the answer call (rendered, generation prompt included)."""

    answer_prompt_ids: tuple[int, ...]
    memory_text: str
    memory_tokens: int


MemoryEvent = ChunkDone | Ready
Complete = Callable[[list[int]], Awaitable[str]]


def strip_thinking(reply: str) -> str:
    """The memory a reply holds: thinking is never memory. Text after the last ``</think>``; an
    unclosed ``<think>`` (generation stopped mid-thought) drops everything from it on."""
    if _THINK_CLOSE in reply:
        reply = reply.rsplit(_THINK_CLOSE, 1)[1]
    elif _THINK_OPEN in reply:
        reply = reply.split(_THINK_OPEN, 1)[0]
    return reply.strip()


class MemoryAgent:
    """Reads a long document chunk by chunk with a bounded memory (see the module docstring).
    ``tokenizer``: the model's Hugging Face tokenizer (``encode``, ``decode``, ``apply_chat_template``)."""

    def __init__(
        self, tokenizer: Any, config: MemoryAgentConfig | None = None, templates: MemoryTemplates | None = None
    ) -> None:
        self.tokenizer = tokenizer
        self.config = config or MemoryAgentConfig()
        self.templates = templates or MemoryTemplates.builtin()
        env = ImmutableSandboxedEnvironment(undefined=jinja2.StrictUndefined)
        self._update = _compile(env, self.templates.update, "update", self.templates.update_origin)
        self._answer = _compile(env, self.templates.answer, "answer", self.templates.answer_origin)
        # The chat template around one user message, split where the content goes (per thinking mode).
        self._wrappers = {thinking: self._wrapper(thinking) for thinking in {False, self.config.answer_thinking}}

    # ------------------------------------------------------------------ tokens

    def encode(self, text: str) -> list[int]:
        """Untrusted text as plain tokens: strings that spell control tokens are not parsed as them."""
        return list(self.tokenizer.encode(text, add_special_tokens=False, split_special_tokens=True))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids))

    def needs_memory(self, document: str | Sequence[int], window: int) -> bool:
        """Whether ``document`` (text, or its token ids) is too long for single-pass reading.
        ``window``: the tokens a single-pass prompt can give the document (the context window less
        the question, the template and the answer's budget)."""
        if window < 1:
            raise ValueError(f"`window` must be >= 1, got {window}")
        count = len(self.encode(document)) if isinstance(document, str) else len(document)
        return count > window

    def chunks(self, document: str) -> list[list[int]]:
        """The document's token ids in order, cut into chunks of at most ``chunk_tokens``. Cuts fall
        on token boundaries that split no character, so every chunk decodes to a piece of the
        document and the pieces join to it."""
        ids = self.encode(document)
        limit = self.config.max_document_tokens
        if len(ids) > limit:
            raise MemoryAgentInputError(self._too_long(len(ids)))
        out: list[list[int]] = []
        start = 0
        while start < len(ids):
            end = self._clean_cut(ids, start, min(start + self.config.chunk_tokens, len(ids)))
            out.append(ids[start:end])
            start = end
        if len(out) > self.config.max_chunks:  # cuts moved back off split characters
            raise MemoryAgentInputError(self._too_long(len(ids)))
        return out

    def _too_long(self, count: int) -> str:
        c = self.config
        return (
            f"the document has {count} tokens; the memory agent reads at most max_chunks * chunk_tokens = "
            f"{c.max_chunks} * {c.chunk_tokens} = {c.max_document_tokens} tokens: shorten the document or "
            "raise `max_chunks` or `chunk_tokens`"
        )

    def _clean_cut(self, ids: list[int], start: int, end: int) -> int:
        """The last cut in (start, end] that splits no character; ``end`` when there is none nearby."""
        if end >= len(ids):
            return end
        for cut in range(end, max(start, end - _MAX_BACKOFF_TOKENS), -1):
            left, right = ids[max(start, cut - 4) : cut], ids[cut : cut + 4]
            if self.decode(left) + self.decode(right) == self.decode(left + right):
                return cut
        return end

    def _bound(self, memory: str) -> tuple[str, int, bool]:
        """The memory cut to ``memory_tokens`` tokens (on a boundary that splits no character)."""
        ids = self.encode(memory)
        if len(ids) <= self.config.memory_tokens:
            return memory, len(ids), False
        cut = self._clean_cut(ids, 0, self.config.memory_tokens)
        return self.decode(ids[:cut]), cut, True

    # ------------------------------------------------------------------ prompts

    def _wrapper(self, thinking: bool) -> tuple[list[int], list[int]]:
        messages = [{"role": "user", "content": _CONTENT_SENTINEL}]
        kwargs = {} if thinking else {"enable_thinking": False}
        text = self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, **kwargs)
        parts = text.split(_CONTENT_SENTINEL)
        if len(parts) != 2:
            raise ValueError("the tokenizer's chat template must render a user message's content exactly once")
        return [self.tokenizer.encode(p, add_special_tokens=False) for p in parts]  # control tokens parsed

    def _prompt(self, content: str, thinking: bool) -> list[int]:
        before, after = self._wrappers[thinking]
        return [*before, *self.encode(content), *after]

    def update_prompt(self, question: str, memory: str, chunk: str, chunk_number: int, chunk_count: int) -> list[int]:
        """The prompt ids of one memory update (thinking off: the reply is the memory)."""
        content = self._update.render(
            question=question, memory=memory, chunk=chunk, chunk_number=chunk_number, chunk_count=chunk_count
        )
        return self._prompt(content, thinking=False)

    def answer_prompt(self, question: str, memory: str) -> list[int]:
        """The prompt ids of the answer call: the question and the final memory, nothing else."""
        return self._prompt(self._answer.render(question=question, memory=memory), self.config.answer_thinking)

    # ------------------------------------------------------------------ the loop

    async def run(self, question: str, document: str, complete: Complete) -> AsyncIterator[MemoryEvent]:
        """Read ``document`` for ``question``: one ``complete`` call per chunk, a ``ChunkDone`` after
        each, then ``Ready`` with the answer prompt. Inputs are checked before the first call."""
        if not question.strip():
            raise MemoryAgentInputError("the question is empty: the memory agent needs a question to read for")
        if not document.strip():
            raise MemoryAgentInputError("the document is empty: there is nothing for the memory agent to read")
        chunks = self.chunks(document)
        memory, tokens = "", 0
        for index, chunk in enumerate(chunks):
            prompt = self.update_prompt(question, memory, self.decode(chunk), index + 1, len(chunks))
            reply = await complete(prompt)
            memory, tokens, truncated = self._bound(strip_thinking(reply))
            log.debug(
                "event=memory_chunk index=%d total=%d memory_tokens=%d truncated=%s",
                index,
                len(chunks),
                tokens,
                truncated,
            )
            yield ChunkDone(index, len(chunks), tokens, truncated)
        yield Ready(tuple(self.answer_prompt(question, memory)), memory, tokens)


def _compile(env: ImmutableSandboxedEnvironment, source: str, which: str, origin: str) -> jinja2.Template:
    try:
        return env.from_string(source)
    except jinja2.TemplateSyntaxError as exc:
        raise ValueError(f"the memory agent's {which} template ({origin}) line {exc.lineno}: {exc.message}") from None


__all__ = [
    "ChunkDone",
    "Complete",
    "MemoryAgent",
    "MemoryAgentConfig",
    "MemoryAgentInputError",
    "MemoryEvent",
    "MemoryTemplates",
    "Ready",
    "strip_thinking",
]
