"""Prompt rendering: up to the <|im_end|> closing the last user turn; the preamble from the template."""

from __future__ import annotations

import pytest

from guard.errors import InvalidInput
from guard.text.conversation import Message, parse_messages


def test_prompt_ends_with_im_end_and_preamble_is_the_assistant_header(guard_tokenizer):
    rendered = guard_tokenizer.render_prompt([Message("system", "Be brief"), Message("user", "Hi")])
    assert rendered.prompt_ids[-1] == guard_tokenizer.im_end_id
    assert guard_tokenizer.hf.decode(list(rendered.prompt_ids)) == (
        "<|im_start|>system\nBe brief<|im_end|>\n<|im_start|>user\nHi<|im_end|>"
    )
    assert guard_tokenizer.hf.decode(list(rendered.preamble_ids)) == "\n<|im_start|>assistant\n<think>\n\n</think>\n\n"


def test_prompt_plus_preamble_plus_response_is_the_full_rendering(guard_tokenizer):
    messages = [Message("user", "Hi"), Message("assistant", "Hello there, 你好!")]
    rendered, response = guard_tokenizer.split_response(messages)
    full = guard_tokenizer.render_ids(messages)
    assert [*rendered.prompt_ids, *rendered.preamble_ids, *response] == full[:-1]  # minus the trailing "\n"
    assert response[-1] == guard_tokenizer.im_end_id
    assert guard_tokenizer.hf.decode(response[:-1]) == "Hello there, 你好!"


def test_multi_turn_prompt_ends_at_the_last_user_turn(guard_tokenizer):
    messages = [Message("user", "a"), Message("assistant", "b"), Message("user", "c")]
    rendered = guard_tokenizer.render_prompt(messages)
    assert guard_tokenizer.hf.decode(list(rendered.prompt_ids)).endswith("<|im_start|>user\nc<|im_end|>")


@pytest.mark.parametrize(
    "raw,match",
    [
        ([], "empty"),
        ([{"role": "robot", "content": "x"}], r"messages\[0\].role"),
        ([{"role": "user", "content": 3}], r"messages\[0\].content"),
        (["hello"], r"messages\[0\] must be an object"),
    ],
)
def test_malformed_messages_are_named(raw, match):
    with pytest.raises(InvalidInput, match=match):
        parse_messages(raw)


def test_stream_cannot_open_on_an_assistant_turn(guard_tokenizer):
    with pytest.raises(InvalidInput, match="end with a user turn"):
        guard_tokenizer.render_prompt([Message("user", "a"), Message("assistant", "b")])
