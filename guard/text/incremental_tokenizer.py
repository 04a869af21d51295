"""Text deltas in, token ids out, equal to tokenizing the whole text at once where that is decidable.

BPE merges never cross pre-tokenizer pieces, but the last pieces of a growing text can still
change (a space joins the next word, ``'`` becomes ``'s``, a combining mark recomposes the
previous character under NFC, ``<|im_`` becomes a special token). So the unstable tail, the
last ``hold_back`` pieces and any unfinished special token, stays buffered until more text
arrives or the stream ends. What is committed are the ids of the buffer tokenized as a whole,
cut at a piece boundary: tokenizing the committed prefix alone could differ, because the
pre-tokenizer looks ahead ("  " alone is one piece, but two pieces before "23").

A piece has no length limit, though: 100k letters, a Chinese or Thai paragraph without
punctuation, an emoji run or a base64 blob is one piece that would never be released, so no
interrupt could fire until the stream ended. The held-back tail is therefore bounded by
``max_pending_chars`` characters and ``max_pending_tokens`` tokens. When it grows past either
bound, a *forced cut* commits a prefix of it:

- the cut is a token boundary of the tokenization of a window of the tail (at most
  ``max_pending_chars`` characters) that keeps as much of the window to its right as context
  as half of each bound allows, and it is accepted only if tokenizing the two sides separately gives exactly the
  window's ids (so the pre-tokenizer and BPE agree on it as far as the text is known), it is
  not inside a special token or an unfinished one, and it falls between two characters that
  NFC cannot join and that are not one grapheme (not before a combining mark, a ZWJ, a
  variation selector or skin-tone modifier, not after a ZWJ, not between two regional
  indicators). The committed ids are the window's own ids for that prefix.
- only if no token boundary in the window qualifies (a single token longer than half the
  window, e.g. a run of hundreds of spaces or dashes, or a long run of combining marks) the
  cut falls between characters, at a grapheme/NFC boundary when one exists.

When the result can differ from a whole-text tokenization: only at a forced cut, i.e. only
inside a run of text whose last ``hold_back`` pieces together exceed the bounds. The whole-text
BPE of that over-long piece could, in principle, merge across the cut because of text that had
not arrived yet (BPE merges inside one piece can depend on more right context than half a
window; rare, seen in fuzzing only in long periodic runs such as "abab..."), and a cut between
characters splits a token that a whole-text pass would have kept (runs of spaces or dashes
longer than the window, whose vocabulary has tokens of up to 128 characters). Why that is
safe: the committed ids always decode to exactly the committed text (cuts are between code
points, never inside a UTF-8 sequence, a special token or, when avoidable, a grapheme), so the
classifier judges the same text with a slightly different but valid segmentation of one
over-long piece; every other piece is tokenized exactly.
In a run of combining marks with no safe point the text stays canonically equivalent, not
byte-identical, if later marks would have reordered across the cut.

Cost: every push normalises and tokenizes only the bounded buffer plus the delta, and a forced
cut tokenizes a bounded window a few times, so a push costs O(delta), however long the stream
is (the event loop never re-reads the stream).
"""

from __future__ import annotations

import unicodedata
from typing import Any

_ZWJ = "\u200d"
_MAX_CUT_TRIES = 4  # split checks per forced cut before falling back to a character cut


def _is_regional_indicator(ch: str) -> bool:
    return "\U0001f1e6" <= ch <= "\U0001f1ff"


def _extends_previous(ch: str) -> bool:
    """True if ``ch`` belongs to the grapheme before it (marks, ZWJ, selectors, modifiers, tags)."""
    return (
        ch == _ZWJ
        or unicodedata.category(ch) in ("Mn", "Mc", "Me")
        or "\U0001f3fb" <= ch <= "\U0001f3ff"
        or "\U000e0020" <= ch <= "\U000e007f"
    )


def _safe_boundary(prev: str, ch: str) -> bool:
    """A cut between ``prev`` and ``ch`` splits no grapheme and survives NFC of either side."""
    if unicodedata.combining(ch) or _extends_previous(ch) or prev == _ZWJ:
        return False
    if _is_regional_indicator(prev) and _is_regional_indicator(ch):
        return False
    return unicodedata.normalize("NFC", prev + ch) == prev + ch


class IncrementalTokenizer:
    """Feeds a text stream to a fast HF tokenizer in deltas; see the module docstring for exactness."""

    def __init__(
        self,
        hf_tokenizer: Any,
        hold_back: int = 2,
        max_pending_chars: int = 128,  # the longest Qwen token (128 spaces) still fits in the tail
        max_pending_tokens: int = 32,
    ) -> None:
        backend = hf_tokenizer.backend_tokenizer
        self._backend = backend
        self._normalizer = backend.normalizer
        specials = sorted({t.content for t in hf_tokenizer.added_tokens_decoder.values()}, key=len)
        self._specials = specials
        self._special_starts = {s[0] for s in specials if s}
        self._special_prefixes = {s[:k] for s in specials for k in range(1, len(s))}
        self._longest_special = max((len(s) for s in specials), default=0)
        if hold_back < 1:
            raise ValueError(f"`hold_back` must be >= 1 piece, got {hold_back}")
        min_chars = max(16, 2 * self._longest_special)
        if max_pending_chars < min_chars:
            raise ValueError(
                f"`max_pending_chars` must be >= {min_chars} (twice the longest special token, so an "
                f"unfinished one fits in half of it), got {max_pending_chars}"
            )
        if max_pending_tokens < 16:
            raise ValueError(f"`max_pending_tokens` must be >= 16, got {max_pending_tokens}")
        self.hold_back = hold_back
        self.max_pending_chars = max_pending_chars
        self.max_pending_tokens = max_pending_tokens
        self._buffer = ""  # normalised text not yet turned into ids, within both bounds between calls
        self.finished = False

    @property
    def pending_text(self) -> str:
        return self._buffer

    def push(self, delta: str) -> list[int]:
        """Add a text delta; return the ids that are now stable (possibly none)."""
        if self.finished:
            raise ValueError("the text stream has already ended")
        if not delta:
            return []
        # NFC(NFC(a) + b) == NFC(a + b), and the buffer starts where NFC cannot reach across, so
        # normalising only the bounded buffer plus the delta is exact.
        text = self._normalize(self._buffer + delta)
        enc = self._backend.encode(text, add_special_tokens=False)
        ids, offsets = enc.ids, enc.offsets
        cut = self._piece_cut(text, enc.word_ids, offsets)
        k = next((i for i, (start, _) in enumerate(offsets) if start >= cut), len(ids))
        forced, self._buffer = self._bound(text[cut:], len(ids) - k)
        return ids[:k] + forced

    def finish(self) -> list[int]:
        """End of stream: everything still buffered is final."""
        self.finished = True
        ids, self._buffer = self._encode(self._buffer), ""
        return ids

    # ------------------------------------------------------------------ stable pieces

    def _normalize(self, text: str) -> str:
        return self._normalizer.normalize_str(text) if self._normalizer is not None else text

    def _encode(self, text: str) -> list[int]:
        return self._backend.encode(text, add_special_tokens=False).ids if text else []

    @staticmethod
    def _piece_starts(word_ids: list[int | None], offsets: list[tuple[int, int]]) -> list[int]:
        """Where the tokenizer's pieces start (pre-tokenizer pieces and special tokens, in context)."""
        return [offsets[i][0] for i, w in enumerate(word_ids) if i == 0 or w is None or w != word_ids[i - 1]]

    def _piece_cut(self, text: str, word_ids: list[int | None], offsets: list[tuple[int, int]]) -> int:
        """Start of the last ``hold_back`` pieces, or earlier so that an unfinished special token
        at the end cannot change what is committed whether it completes or not.

        The committed ids are the in-context ids of the whole buffer before the cut, never a
        re-tokenization of the prefix alone: the pre-tokenizer looks ahead (``\\s+(?!\\S)``), so
        "  " alone is one piece but two before "23".
        """
        starts = self._piece_starts(word_ids, offsets)
        if len(starts) <= self.hold_back:
            return 0
        cut = starts[-self.hold_back]
        unfinished = self._unfinished_special(text)
        if unfinished:
            # If it completes, the text before it becomes a segment of its own: commit only the
            # pieces that tokenizing that segment alone gives too.
            end = len(text) - unfinished
            enc = self._backend.encode(text[:end], add_special_tokens=False)
            alone = [*self._piece_starts(enc.word_ids, enc.offsets), end]
            common = 0
            while common + 1 < len(alone) and common + 1 < len(starts) and alone[common + 1] == starts[common + 1]:
                common += 1  # pieces [alone[i], alone[i + 1]) agree for i < common
            cut = min(cut, starts[common] if common < len(starts) else cut)
        return cut

    def _unfinished_special(self, text: str) -> int:
        """Length of the longest suffix of ``text`` that is a proper prefix of a special token."""
        tail = text[-(self._longest_special - 1) :] if self._longest_special > 1 else ""
        if not any(c in tail for c in self._special_starts):
            return 0
        for k in range(len(tail), 0, -1):
            if tail[-k:] in self._special_prefixes:
                return k
        return 0

    def _inside_special(self, text: str, cut: int) -> bool:
        """True if ``cut`` falls strictly inside an occurrence of a special token."""
        for special in self._specials:
            n = len(special)
            start = text.find(special, max(0, cut - n + 1), cut + n - 1)
            if start != -1 and start < cut:
                return True
        return False

    # ------------------------------------------------------------------ forced cuts

    def _bound(self, rest: str, rest_tokens: int) -> tuple[list[int], str]:
        """Commit prefixes of ``rest`` (``rest_tokens`` tokens) by forced cuts until it is within
        both bounds; returns the committed ids and what stays held back."""
        out: list[int] = []
        pos = 0
        count: int | None = rest_tokens  # tokens of rest[pos:], None when not known
        limit = len(rest) - self._unfinished_special(rest)  # never cut into an unfinished special
        while True:
            if len(rest) - pos <= self.max_pending_chars:
                if count is None:
                    count = len(self._encode(rest[pos:]))
                if count <= self.max_pending_tokens:
                    return out, rest[pos:]
            window = rest[pos : pos + self.max_pending_chars]
            ids, step, right_tokens = self._forced_cut(rest, pos, window, limit - pos)
            out += ids
            count = right_tokens if pos + len(window) == len(rest) else None
            pos += step

    def _forced_cut(self, rest: str, pos: int, window: str, limit: int) -> tuple[list[int], int, int]:
        """Ids and length (> 0 chars) of a committed prefix of ``window`` (``rest[pos:]``, capped),
        and the token count of the window's right side."""
        enc = self._backend.encode(window, add_special_tokens=False)
        ids, offsets = enc.ids, enc.offsets
        n, size = len(ids), len(window)
        keep_chars, keep_tokens = self.max_pending_chars // 2, self.max_pending_tokens // 2
        preferred: list[tuple[int, int]] = []  # right side within half the bounds: most context first
        fallback: list[tuple[int, int]] = []  # right side within the bounds
        for k in range(1, n):
            b = offsets[k][0]
            if offsets[k - 1][1] > b or not 0 < b <= limit:
                continue  # a token split inside a character, or past an unfinished special
            if size - b <= keep_chars and n - k <= keep_tokens:
                preferred.append((k, b))
            elif size - b <= self.max_pending_chars and n - k <= self.max_pending_tokens:
                fallback.append((k, b))
        tries = 0
        for k, b in preferred + fallback[::-1]:
            if not _safe_boundary(window[b - 1], window[b]) or self._inside_special(rest, pos + b):
                continue
            tries += 1
            if self._encode(window[:b]) == ids[:k] and self._encode(window[b:]) == ids[k:]:
                return ids[:k], b, n - k
            if tries >= _MAX_CUT_TRIES:
                break
        cut = self._char_cut(rest, pos, window, offsets, limit)
        return self._encode(window[:cut]), cut, len(self._encode(window[cut:]))

    def _char_cut(self, rest: str, pos: int, window: str, offsets: list[tuple[int, int]], limit: int) -> int:
        """A cut between characters that leaves the right side within half the bounds, moved to a
        grapheme/NFC-safe point outside special tokens when there is one."""
        size, keep_tokens = len(window), self.max_pending_tokens // 2
        target = size - self.max_pending_chars // 2
        if len(offsets) > keep_tokens:
            target = max(target, offsets[len(offsets) - keep_tokens][0])
        hi = max(1, min(size - 1, limit))
        target = min(max(1, target), hi)
        for cut in (*range(target, 0, -1), *range(target + 1, hi + 1)):
            if _safe_boundary(window[cut - 1], window[cut]) and not self._inside_special(rest, pos + cut):
                return cut
        return target
