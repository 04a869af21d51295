"""Token ids in, text out: pushed one id or a few at a time, the text equals a decode of all the
ids, for the byte-level Qwen3 tokenizer and for a SentencePiece-style one (word-start markers,
byte fallback), which decodes differently when its pieces are decoded alone."""

from __future__ import annotations

import random

import pytest
from other_tokenizer import build_other_tokenizer
from test_incremental_tokenizer import TEXTS

from guard.session.release import IncrementalDetokenizer


@pytest.fixture(scope="module")
def other_tokenizer(tmp_path_factory):
    return build_other_tokenizer(tmp_path_factory.mktemp("other-tokenizer"))


def detokenize(hf, ids: list[int], sizes: list[int]) -> str:
    detokenizer = IncrementalDetokenizer(hf)
    out, at = [], 0
    for size in sizes:
        out.append(detokenizer.push(ids[at : at + size]))
        at += size
    out.append(detokenizer.push(ids[at:]))
    return "".join(out) + detokenizer.flush()


@pytest.mark.parametrize("name", sorted(TEXTS))
@pytest.mark.parametrize("which", ["qwen3", "sentencepiece"])
def test_one_id_at_a_time_equals_the_full_decode(guard_tokenizer, other_tokenizer, which, name):
    hf = guard_tokenizer.hf if which == "qwen3" else other_tokenizer
    ids = hf.encode(TEXTS[name], add_special_tokens=False)
    full = hf.decode(ids, clean_up_tokenization_spaces=False)
    assert detokenize(hf, ids, [1] * len(ids)) == full


def test_random_groups_equal_the_full_decode(guard_tokenizer, other_tokenizer):
    rng = random.Random(3)
    text = " ".join(TEXTS.values())
    for hf in (guard_tokenizer.hf, other_tokenizer):
        ids = hf.encode(text, add_special_tokens=False)
        full = hf.decode(ids, clean_up_tokenization_spaces=False)
        for _ in range(20):
            sizes = [rng.randint(0, 4) for _ in range(len(ids) // 2)]
            assert detokenize(hf, ids, sizes) == full


def test_a_split_character_waits_for_its_last_byte(guard_tokenizer):
    hf = guard_tokenizer.hf
    # One code point whose UTF-8 bytes the byte-level vocabulary splits over several ids.
    char = next(c for c in "🦩𝄞龘🫠" if len(hf.encode(c, add_special_tokens=False)) > 1)
    ids = hf.encode(char, add_special_tokens=False)
    detokenizer = IncrementalDetokenizer(hf)
    assert detokenizer.push(ids[:1]) == ""
    assert detokenizer.push(ids[1:]) + detokenizer.flush() == char


def test_sentencepiece_word_starts_keep_their_spaces(other_tokenizer):
    """Decoded alone, '▁the' loses its space (the decoder strips a leading one); in context it must not."""
    ids = other_tokenizer.encode("Mix the flour", add_special_tokens=False)
    alone = "".join(other_tokenizer.decode([i]) for i in ids)
    assert alone != "Mix the flour"  # why the window exists
    assert detokenize(other_tokenizer, ids, [1] * len(ids)) == "Mix the flour"
