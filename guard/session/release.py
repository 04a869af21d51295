"""What may be shown to the user, and when: release modes over the verdicts of a stream.

HOLD_BACK releases a token only once it is judged and is not part of a run of non-safe tokens
that could still trigger the interrupt rule; a run that ends without firing is released (the
debounce rule judged it safe). OPTIMISTIC releases everything on arrival and only reports the
interrupt. Released text comes from decoding the released ids, holding back an incomplete
UTF-8 character until its last byte arrives; special tokens are released as ids, never as text.
"""

from __future__ import annotations

import enum
from typing import Any

REPLACEMENT = "\ufffd"


def special_token_ids(hf_tokenizer: Any) -> frozenset[int]:
    """Ids of the tokenizer's special tokens (``<|im_end|>``, ``<|endoftext|>``...): a user never
    sees them, so released text skips them as ``decode(skip_special_tokens=True)`` would."""
    return frozenset(i for i, t in hf_tokenizer.added_tokens_decoder.items() if t.special)


class ReleaseMode(enum.Enum):
    HOLD_BACK = "hold_back"
    OPTIMISTIC = "optimistic"


class IncrementalDetokenizer:
    """Token ids in, text out, exactly as a decode of all ids would give it. Each push decodes a
    short window (the ids of the previous push as context, then the new ones), so tokenizers whose
    pieces depend on their neighbours (SentencePiece word starts) and characters split across ids
    (multi-byte UTF-8) come out right, in constant time per push."""

    def __init__(self, hf_tokenizer: Any) -> None:
        self._hf = hf_tokenizer
        self._backend = getattr(hf_tokenizer, "backend_tokenizer", None)  # a fast tokenizer's Rust core
        self._ids: list[int] = []
        self._prefix = 0  # window start: context ids, already emitted
        self._read = 0  # ids before this are emitted

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        if self._backend is not None:  # the same decode, without the Python wrapper's overhead
            return self._backend.decode(ids, skip_special_tokens=False)
        return self._hf.decode(ids, clean_up_tokenization_spaces=False)

    def push(self, ids: list[int]) -> str:
        self._ids += ids
        context = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        if len(text) <= len(context) or text.endswith(REPLACEMENT):  # a character is not complete yet
            return ""
        self._prefix, self._read = self._read, len(self._ids)
        return text[len(context) :]

    def flush(self) -> str:
        context = self._decode(self._ids[self._prefix : self._read])
        text = self._decode(self._ids[self._prefix :])
        self._prefix = self._read = len(self._ids)
        return text[len(context) :]


class ReleaseTracker:
    """Cumulative released tokens and text of one stream, with REDACT spans replaced by a marker.

    Redaction needs HOLD_BACK: a token is only released once judged, so its REDACT action is
    known. In OPTIMISTIC mode tokens are already out when judged; the spans are still reported.
    """

    def __init__(self, mode: ReleaseMode, hf_tokenizer: Any, redact_marker: str = "[REDACTED]") -> None:
        self.mode = mode
        self._hf = hf_tokenizer
        self._detok = IncrementalDetokenizer(hf_tokenizer)
        self._hidden = special_token_ids(hf_tokenizer)  # control tokens: released as ids, never as text
        self._marker = redact_marker
        self._ids: list[int] = []  # response ids in order (judged or received)
        self._marked = 0  # judged tokens whose redaction is known
        self._redacted: set[int] = set()  # judged tokens replaced with the marker
        self._last_redacted = -1
        self._in_redaction = False  # the last released token was redacted (one marker per span)
        self._span_start: int | None = None
        self.spans: list[tuple[int, int]] = []  # completed redaction spans, drained by the caller
        self.released = 0
        self.released_chars = 0
        self._boundary: int | None = None
        self.boundary_chars: int | None = None  # released characters before the boundary, once crossed

    def set_boundary(self, index: int) -> None:
        """Split releases at response token ``index`` (a reasoning trace's end, where the answer
        starts): ``boundary_chars`` then says how much of the released text comes before it, so a
        caller can tell the two parts apart in text that may hold redaction markers."""
        if self._boundary is not None:
            raise RuntimeError("the release boundary is already set")
        self._boundary = index

    def received_text(self) -> str:
        """The whole response received so far (for operator-enabled content logging only)."""
        return self._hf.decode(self._ids, clean_up_tokenization_spaces=False)

    @property
    def received(self) -> int:
        return len(self._ids)

    def released_ids(self, since: int) -> list[int]:
        """Ids released after the first ``since`` (what a generator hands to its caller)."""
        return self._ids[since : self.released]

    def receive(self, ids: list[int], text: str | None = None) -> str:
        """New response tokens arrived (before judging). OPTIMISTIC releases them now."""
        self._ids += ids
        if self.mode is ReleaseMode.OPTIMISTIC:
            return self._release_to(len(self._ids), text)
        return ""

    def mark_chunk(self, count: int, redacted: list[bool] | None) -> None:
        """The next ``count`` judged tokens; ``redacted[i]`` says whether the policy redacts the
        i-th (None: none is)."""
        if redacted is None and self._span_start is None:
            self._marked += count  # the common chunk: nothing redacted, no span open
            return
        for redact in redacted if redacted is not None else [False] * count:
            self.mark(redact)

    def mark(self, redact: bool) -> None:
        """The next judged token (in order): whether the policy redacts it."""
        index = self._marked
        self._marked += 1
        if redact:
            self._redacted.add(index)
            self._last_redacted = index
        if redact and self._span_start is None:
            self._span_start = index
        elif not redact and self._span_start is not None:
            self.spans.append((self._span_start, index))
            self._span_start = None

    def drain_spans(self) -> list[tuple[int, int]]:
        spans, self.spans = self.spans, []
        return spans

    def judged(self, judged: int, unsafe_run: int, span_start: int | None) -> str:
        """After a verdict: release what HOLD_BACK now allows; return the newly released text."""
        if self.mode is ReleaseMode.OPTIMISTIC:
            return ""
        upto = span_start if span_start is not None else judged - unsafe_run
        return self._release_to(upto, None)

    def release_received(self) -> str:
        """Fail open: everything received so far goes out unjudged."""
        return self._release_to(len(self._ids), None)

    def release_unjudged_text(self, text: str) -> str:
        """Fail open on a text stream: the delta goes out as it came (it was never tokenized)."""
        out = self.release_received() + text
        self.released_chars += len(text)
        return out

    def finish(self, interrupted: bool) -> str:
        """End of stream: without an interrupt, an unfinished non-safe run is released too."""
        if self._span_start is not None:
            self.spans.append((self._span_start, self._marked))
            self._span_start = None
        text = "" if interrupted else self._release_to(len(self._ids), None)
        tail = "" if interrupted and self.mode is ReleaseMode.HOLD_BACK else self._detok.flush()
        self.released_chars += len(tail)
        return text + tail

    def _release_to(self, upto: int, text: str | None) -> str:
        boundary = self._boundary
        if text is None and boundary is not None and self.boundary_chars is None and upto > boundary:
            head = self._release_to(boundary, None)
            self.boundary_chars = self.released_chars
            self._in_redaction = False  # a redaction across the boundary is marked in both parts
            return head + self._release_to(upto, None)
        if text is not None:  # OPTIMISTIC text streams echo their text, even before it has ids
            self.released = max(self.released, upto)
            self.released_chars += len(text)
            return text
        if upto <= self.released:
            return ""
        start, self.released = self.released, upto
        hidden = self._hidden
        if self._last_redacted < start:  # nothing redacted in the range: one decode
            self._in_redaction = False
            shown = [i for i in self._ids[start:upto] if i not in hidden]
            released = self._detok.push(shown) if shown else ""
            self.released_chars += len(released)
            return released
        out = []
        run: list[int] = []
        for index in range(start, upto):
            redacted = index in self._redacted
            if redacted:
                if run:
                    out.append(self._detok.push(run))
                    run = []
                if not self._in_redaction:
                    out.append(self._detok.flush() + self._marker)
                self._in_redaction = True
            else:
                self._in_redaction = False
                if self._ids[index] not in hidden:
                    run.append(self._ids[index])
        if run:
            out.append(self._detok.push(run))
        released = "".join(out)
        self.released_chars += len(released)
        return released
