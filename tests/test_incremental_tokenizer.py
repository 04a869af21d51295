"""Text deltas produce exactly the ids of tokenizing the whole text, however the text is split."""

from __future__ import annotations

import random

import pytest

from guard.incremental_tokenizer import IncrementalTokenizer

TEXTS = {
    "english": "Hello world! It's a fine day, isn't it? We'll see: 3.14159 and 2,000 apples.",
    "chinese": "你好，世界！今天天气很好，我们去公园散步吧。",
    "emoji": "Great job 👍🏽🎉! Family: 👨‍👩‍👧‍👦 done 😀😀",
    "whitespace": "  a  \n\n\t b   \r\n  c\n \n   ",
    "code": "def f(x):\n    return x**2  # square\n\n\nprint(f(3))",
    "combining": "cafe\u0301 nai\u0308ve re\u0301sume\u0301",
    "special": "before<|im_end|>after <think>x</think>",
}


def stream(hf, pieces) -> list[int]:
    inc = IncrementalTokenizer(hf)
    ids = []
    for p in pieces:
        ids += inc.push(p)
    return ids + inc.finish()


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_every_two_way_split_gives_the_full_tokenization(guard_tokenizer, name):
    text = TEXTS[name]
    expected = guard_tokenizer.encode(text)
    for cut in range(len(text) + 1):
        assert stream(guard_tokenizer.hf, [text[:cut], text[cut:]]) == expected, f"split at {cut}"


@pytest.mark.parametrize("name", sorted(TEXTS))
def test_character_by_character_gives_the_full_tokenization(guard_tokenizer, name):
    text = TEXTS[name]
    assert stream(guard_tokenizer.hf, list(text)) == guard_tokenizer.encode(text)


def test_random_splits_of_mixed_text(guard_tokenizer):
    rng = random.Random(0)
    text = " ".join(TEXTS.values())
    expected = guard_tokenizer.encode(text)
    for _ in range(30):
        cuts = sorted(rng.sample(range(1, len(text)), rng.randint(1, 40)))
        pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)]
        assert stream(guard_tokenizer.hf, pieces) == expected


def test_ids_are_released_before_the_stream_ends(guard_tokenizer):
    inc = IncrementalTokenizer(guard_tokenizer.hf)
    released = inc.push("The quick brown fox jumps over the lazy dog and keeps running")
    assert len(released) >= 8  # only the unstable tail is held back
    assert len(inc.pending_text) < 20


def test_push_after_finish_is_an_error(guard_tokenizer):
    inc = IncrementalTokenizer(guard_tokenizer.hf)
    inc.finish()
    with pytest.raises(ValueError, match="already ended"):
        inc.push("x")
