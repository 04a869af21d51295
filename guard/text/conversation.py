"""Render conversations the way Qwen3Guard-Stream was fed: the checkpoint's chat template,
``enable_thinking=False``, prompt up to and including the ``<|im_end|>`` closing the last user turn.

Token ids of ``<|im_end|>`` and the assistant preamble are read from the tokenizer and the
template, never hard-coded.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from guard.errors import InvalidInput

ROLES = ("system", "user", "assistant", "tool")
IM_END = "<|im_end|>"


@dataclass(frozen=True)
class Message:
    role: str
    content: str

    def as_dict(self) -> dict[str, str]:
        return {"role": self.role, "content": self.content}


@dataclass(frozen=True)
class RenderedPrompt:
    prompt_ids: tuple[int, ...]  # ends with the <|im_end|> closing the last user turn
    preamble_ids: tuple[int, ...]  # assistant header the generator was prompted with (not judged)


def parse_messages(raw: Sequence[Mapping[str, Any] | Message]) -> list[Message]:
    """Validate a conversation; errors name the message and the field."""
    if not raw:
        raise InvalidInput("the conversation is empty: give at least one user message")
    out = []
    for i, m in enumerate(raw):
        if isinstance(m, Message):
            role, content = m.role, m.content
        elif isinstance(m, Mapping):
            role, content = m.get("role"), m.get("content")
        else:
            raise InvalidInput(f"messages[{i}] must be an object with `role` and `content`")
        if role not in ROLES:
            raise InvalidInput(f"messages[{i}].role is {role!r}; expected one of {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise InvalidInput(f"messages[{i}].content must be a string")
        out.append(Message(role, content))
    return out


class GuardTokenizer:
    """The checkpoint's tokenizer plus what the stream needs from it."""

    def __init__(self, hf_tokenizer: Any) -> None:
        self.hf = hf_tokenizer
        self.im_end_id = self._special_id(IM_END)
        if not getattr(hf_tokenizer, "chat_template", None):
            raise InvalidInput(
                "the tokenizer has no chat template; the checkpoint's tokenizer_config.json must carry one"
            )
        self.vocab_size = len(hf_tokenizer)

    @classmethod
    def from_dir(cls, path: str | Path) -> GuardTokenizer:
        from transformers import AutoTokenizer

        return cls(AutoTokenizer.from_pretrained(str(path)))

    def _special_id(self, token: str) -> int:
        tid = self.hf.convert_tokens_to_ids(token)
        if tid is None or tid == getattr(self.hf, "unk_token_id", None):
            raise InvalidInput(f"the tokenizer has no {token} token")
        return int(tid)

    def encode(self, text: str) -> list[int]:
        return list(self.hf.encode(text, add_special_tokens=False))

    def decode_token(self, token_id: int) -> str:
        return self.hf.decode([token_id], clean_up_tokenization_spaces=False)

    def render_ids(self, messages: Sequence[Message]) -> list[int]:
        text = self.hf.apply_chat_template(
            [m.as_dict() for m in messages], tokenize=False, add_generation_prompt=False, enable_thinking=False
        )
        return self.encode(text)

    def render_prompt(self, messages: Sequence[Message]) -> RenderedPrompt:
        """Prompt ids of a conversation ending with a user turn, and the assistant preamble."""
        if messages[-1].role != "user":
            raise InvalidInput(
                f"the conversation must end with a user turn to open a stream; the last is {messages[-1].role!r}"
            )
        ids = self.render_ids(messages)
        prompt = self._through_last_im_end(ids)
        with_reply = self.render_ids([*messages, Message("assistant", "")])
        if with_reply[: len(prompt)] != prompt:
            raise InvalidInput("the chat template renders the prompt differently once an assistant turn follows")
        closing = self._last_index(with_reply, self.im_end_id)
        return RenderedPrompt(tuple(prompt), tuple(with_reply[len(prompt) : closing]))

    def split_response(self, messages: Sequence[Message]) -> tuple[RenderedPrompt, list[int]]:
        """For a conversation ending with an assistant turn: the prompt and the response ids
        (content plus the closing ``<|im_end|>``, what a generator emits)."""
        if len(messages) < 2 or messages[-1].role != "assistant":
            raise InvalidInput("a response conversation must end with an assistant turn after a user turn")
        rendered = self.render_prompt(messages[:-1])
        ids = self.render_ids(messages)
        head = len(rendered.prompt_ids) + len(rendered.preamble_ids)
        if tuple(ids[:head]) != rendered.prompt_ids + rendered.preamble_ids:
            raise InvalidInput("the chat template does not render the assistant turn after the expected preamble")
        closing = self._last_index(ids, self.im_end_id)
        return rendered, ids[head : closing + 1]

    def _through_last_im_end(self, ids: list[int]) -> list[int]:
        return ids[: self._last_index(ids, self.im_end_id) + 1]

    @staticmethod
    def _last_index(ids: list[int], token: int) -> int:
        for i in range(len(ids) - 1, -1, -1):
            if ids[i] == token:
                return i
        raise InvalidInput("the rendered conversation has no <|im_end|>")
