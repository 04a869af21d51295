"""Text deltas in, token ids out, equal to tokenizing the whole text at once.

BPE merges never cross pre-tokenizer pieces, but the last pieces of a growing text can still
change (a space joins the next word, ``'`` becomes ``'s``, a combining mark recomposes the
previous character under NFC, ``<|im_`` becomes a special token). So the unstable tail, the
last ``hold_back`` pieces and any unfinished special token, stays buffered until more text
arrives or the stream ends. The buffer is a few pieces long, so each delta costs O(delta).
"""

from __future__ import annotations

from typing import Any


class IncrementalTokenizer:
    def __init__(self, hf_tokenizer: Any, hold_back: int = 2) -> None:
        backend = hf_tokenizer.backend_tokenizer
        self._hf = hf_tokenizer
        self._normalizer = backend.normalizer
        self._pre_tokenizer = backend.pre_tokenizer
        self._specials = sorted({t.content for t in hf_tokenizer.added_tokens_decoder.values()}, key=len)
        self.hold_back = hold_back
        self._buffer = ""  # normalised text not yet turned into ids
        self.finished = False

    @property
    def pending_text(self) -> str:
        return self._buffer

    def _normalize(self, text: str) -> str:
        return self._normalizer.normalize_str(text) if self._normalizer is not None else text

    def _encode(self, text: str) -> list[int]:
        return list(self._hf.encode(text, add_special_tokens=False)) if text else []

    def push(self, delta: str) -> list[int]:
        """Add a text delta; return the ids that are now stable (possibly none)."""
        if self.finished:
            raise ValueError("the text stream has already ended")
        # NFC(NFC(a) + b) == NFC(a + b), so normalising the buffer incrementally is exact.
        self._buffer = self._normalize(self._buffer + delta)
        cut = self._stable_prefix_length()
        if cut <= 0:
            return []
        committed, self._buffer = self._buffer[:cut], self._buffer[cut:]
        return self._encode(committed)

    def finish(self) -> list[int]:
        """End of stream: everything still buffered is final."""
        self.finished = True
        ids, self._buffer = self._encode(self._buffer), ""
        return ids

    def _stable_prefix_length(self) -> int:
        text = self._buffer
        if self._pre_tokenizer is None:
            return 0
        pieces = self._pre_tokenizer.pre_tokenize_str(text)
        if len(pieces) <= self.hold_back:
            return 0
        cut = pieces[-self.hold_back][1][0]
        # Never split a special token, and keep a possible unfinished one at the end.
        for special in self._specials:
            start = text.find(special)
            while start != -1:
                if start < cut < start + len(special):
                    cut = start
                start = text.find(special, start + 1)
            for k in range(min(len(special) - 1, len(text)), 0, -1):
                if text.endswith(special[:k]):
                    cut = min(cut, len(text) - k)
                    break
        return cut
