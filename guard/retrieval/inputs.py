"""Turning retrieval requests into token sequences: length limits, truncation, vocabulary checks.

Shared by the Embedder and the Reranker so both name a bad input the same way."""

from __future__ import annotations

from collections.abc import Sequence
from enum import Enum

from guard.errors import InvalidInput


class Truncation(Enum):
    NONE = "none"  # an input over the limit is INVALID_ARGUMENT
    RIGHT = "right"  # keep the beginning
    LEFT = "left"  # keep the end


def fit(ids: list[int], limit: int, truncation: Truncation, what: str) -> list[int]:
    """``ids`` within ``limit`` tokens: cut as ``truncation`` says, or refuse naming the limit."""
    if len(ids) <= limit:
        return ids
    if truncation is Truncation.NONE:
        raise InvalidInput(
            f"{what} has {len(ids)} tokens; the limit is {limit} (ask for truncation to cut it, or shorten it)"
        )
    return ids[:limit] if truncation is Truncation.RIGHT else ids[len(ids) - limit :]


def checked_ids(ids: Sequence[int], vocab_size: int, what: str) -> list[int]:
    """Caller-supplied token ids, each an int inside the vocabulary."""
    out = list(ids)
    if not out:
        raise InvalidInput(f"{what} is empty")
    for pos, tid in enumerate(out):
        if isinstance(tid, bool) or not isinstance(tid, int) or not 0 <= tid < vocab_size:
            raise InvalidInput(
                f"{what}: token id {tid!r} at position {pos} is outside the vocabulary [0, {vocab_size})"
            )
    return out


def check_batch(count: int, limit: int, field: str) -> None:
    if count == 0:
        raise InvalidInput(f"`{field}` is empty: send at least one")
    if count > limit:
        raise InvalidInput(f"`{field}` has {count} entries; at most {limit} are allowed per request (max_client_batch)")
