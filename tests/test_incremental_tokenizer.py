"""Text deltas produce exactly the ids of tokenizing the whole text, however the text is split."""

from __future__ import annotations

import base64
import random
import unicodedata

import pytest

from guard.text.incremental_tokenizer import IncrementalTokenizer

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


def test_prefix_is_committed_as_tokenized_in_context(guard_tokenizer):
    # The pre-tokenizer looks ahead: "  " alone is one piece, before "23" it is two; an unfinished
    # "<|im_" that does not complete must not leave a piece split at its start.
    text = "  23\t\t<think>  1,<|im_<|im_end|>x  <|im_ y"
    expected = guard_tokenizer.encode(text)
    for cut in range(len(text) + 1):
        assert stream(guard_tokenizer.hf, [text[:cut], text[cut:]]) == expected, f"split at {cut}"
    assert stream(guard_tokenizer.hf, list(text)) == expected


def _unbroken_runs() -> dict[str, str]:
    """Text with no pre-tokenizer boundary for thousands of characters (or only tiny pieces)."""
    rng = random.Random(7)
    letters = "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(100_000))
    cjk = "".join(rng.choice("我们今天去公园散步天气很好中国人民历史悠久文化灿烂发展迅速") for _ in range(3000))
    thai = "สวัสดีครับวันนี้อากาศดีมากเราไปเที่ยวกันเถอะ" * 80
    emoji = "".join(rng.choice(["😀", "👍🏽", "👨\u200d👩\u200d👧\u200d👦", "🎉", "🇫🇷", "❤️"]) for _ in range(1500))
    words = ["get", "User", "Account", "Balance", "From", "Remote", "Service", "Handler", "Factory"]
    identifier = "".join(rng.choice(words) for _ in range(800))[:5000]
    blob = base64.b64encode(bytes(rng.randrange(256) for _ in range(6000))).decode()
    return {"latin": letters, "cjk": cjk, "thai": thai, "emoji": emoji, "identifier": identifier, "base64": blob}


UNBROKEN = _unbroken_runs()


@pytest.mark.parametrize("name", sorted(UNBROKEN))
def test_held_back_text_stays_within_the_bounds_for_unbroken_runs(guard_tokenizer, name):
    text = UNBROKEN[name]
    inc = IncrementalTokenizer(guard_tokenizer.hf)
    step = 13 if name == "latin" else 3
    for i in range(0, len(text), step):
        inc.push(text[i : i + step])
        assert len(inc.pending_text) <= inc.max_pending_chars
        if name != "latin" or i < 20_000:  # counting tokens every push is the slow part of the test
            assert len(guard_tokenizer.encode(inc.pending_text)) <= inc.max_pending_tokens


@pytest.mark.parametrize("name", sorted(UNBROKEN))
def test_unbroken_runs_release_ids_before_the_stream_ends(guard_tokenizer, name):
    text = UNBROKEN[name]
    inc = IncrementalTokenizer(guard_tokenizer.hf)
    first = next(i for i, ch in enumerate(text) if inc.push(ch))
    assert first <= inc.max_pending_chars  # a bound's worth of text, not the whole run
    released = []
    for i in range(first + 1, len(text), 50):
        released += inc.push(text[i : i + 50])
    assert len(released) >= len(guard_tokenizer.encode(text)) // 2


@pytest.mark.parametrize("name", sorted(UNBROKEN))
def test_forced_cuts_keep_the_text_and_its_tokenization(guard_tokenizer, name):
    text = UNBROKEN[name][:6000]
    rng = random.Random(name)
    cuts = sorted(rng.sample(range(1, len(text)), 400))
    ids = stream(guard_tokenizer.hf, [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)], strict=True)])
    assert guard_tokenizer.hf.decode(ids) == unicodedata.normalize("NFC", text)
    assert ids == guard_tokenizer.encode(text)  # cuts land where the whole-text BPE has a boundary


def test_a_large_delta_is_committed_within_the_bounds(guard_tokenizer):
    text = UNBROKEN["latin"]
    inc = IncrementalTokenizer(guard_tokenizer.hf)
    ids = inc.push(text)
    assert len(inc.pending_text) <= inc.max_pending_chars
    assert guard_tokenizer.hf.decode(ids) + inc.pending_text == text


def test_over_long_single_tokens_are_cut_between_characters(guard_tokenizer):
    text = " " * 1000 + "x" + "-" * 700 + "\n"  # the vocabulary has tokens of up to 128 spaces
    inc = IncrementalTokenizer(guard_tokenizer.hf)
    ids = []
    for i in range(0, len(text), 5):
        ids += inc.push(text[i : i + 5])
        assert len(inc.pending_text) <= inc.max_pending_chars
    assert guard_tokenizer.hf.decode(ids + inc.finish()) == text


def test_bounds_too_small_for_a_special_token_are_rejected(guard_tokenizer):
    with pytest.raises(ValueError, match="max_pending_chars` must be >= "):
        IncrementalTokenizer(guard_tokenizer.hf, max_pending_chars=10)
    with pytest.raises(ValueError, match="max_pending_tokens` must be >= 16"):
        IncrementalTokenizer(guard_tokenizer.hf, max_pending_tokens=4)
