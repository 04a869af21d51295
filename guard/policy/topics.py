"""Matching a prompt against a policy's topics with the Embedder.

Prompt and examples are embedded the same way (as queries with ``TOPIC_INSTRUCTION``, the
Qwen3-Embedding task for semantic similarity) and compared by cosine similarity. A topic
matches when the best similarity to any of its examples reaches its threshold; when several
match, BLOCK wins over FLAG, then the higher similarity. Example embeddings are computed once and
kept (bounded, least recently used first out), so a prompt costs one embedding.
"""

from __future__ import annotations

import asyncio
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass

import numpy as np

from guard.policy.actions import Action
from guard.policy.rules import Policy, Topic

TOPIC_INSTRUCTION = "Retrieve semantically similar text"
EmbedTexts = Callable[[Sequence[str]], Awaitable[list[np.ndarray]]]  # L2-normalised vectors


@dataclass(frozen=True)
class TopicMatch:
    topic: Topic
    similarity: float

    @property
    def action(self) -> Action:
        return self.topic.action


class TopicMatcher:
    def __init__(self, embed: EmbedTexts, *, max_cached_examples: int = 8192) -> None:
        self.embed = embed
        self.max_cached = max_cached_examples
        self._examples: OrderedDict[str, np.ndarray] = OrderedDict()
        self._embedding: dict[tuple[str, ...], asyncio.Task[None]] = {}  # example sets being embedded

    async def match(self, policy: Policy, text: str) -> TopicMatch | None:
        """The topic ``text`` falls under, or None (also when the policy has no topics)."""
        if not policy.topics or not text.strip():
            return None
        examples, (prompt,) = await asyncio.gather(  # both into the same batch, usually
            self._example_vectors([e for t in policy.topics for e in t.examples]), self.embed([text])
        )
        best: TopicMatch | None = None
        for topic in policy.topics:
            similarity = max(float(prompt @ examples[e]) for e in topic.examples)
            if similarity < topic.threshold:
                continue
            candidate = TopicMatch(topic, similarity)
            if best is None or _rank(candidate) > _rank(best):
                best = candidate
        return best

    async def _example_vectors(self, examples: list[str]) -> dict[str, np.ndarray]:
        """The examples' vectors. Missing ones are embedded by a task of their own, shielded from
        the prompt that asked: a prompt that times out (the policy's fail mode) still leaves them
        cached for the next one, and concurrent prompts share one embedding of a new policy."""
        missing = tuple(dict.fromkeys(e for e in examples if e not in self._examples))
        if missing:
            task = self._embedding.get(missing)
            if task is None:
                task = self._embedding[missing] = asyncio.ensure_future(self._embed_examples(missing))
                task.add_done_callback(lambda t, key=missing: self._forget(key, t))
            await asyncio.shield(task)
        out = {}
        for e in examples:
            self._examples.move_to_end(e)
            out[e] = self._examples[e]
        while len(self._examples) > max(self.max_cached, len(out)):
            self._examples.popitem(last=False)
        return out


    async def _embed_examples(self, texts: tuple[str, ...]) -> None:
        for text, vector in zip(texts, await self.embed(list(texts)), strict=True):
            self._examples[text] = vector

    def _forget(self, key: tuple[str, ...], task: asyncio.Task[None]) -> None:
        self._embedding.pop(key, None)
        if not task.cancelled():
            task.exception()  # retrieved: a failure is reported to the prompts that awaited it


def _rank(match: TopicMatch) -> tuple[int, float]:
    return (match.action is Action.BLOCK, match.similarity)
