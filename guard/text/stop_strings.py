"""Stop strings on a stream of text deltas, with vLLM's semantics: generation ends at the first
occurrence of any stop string, the text ends just before it (the stop string is not shown), and
text that could still turn out to be the start of a stop string is held back until it cannot."""

from __future__ import annotations

from collections.abc import Sequence


class StopStrings:
    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._hold = max((len(s) for s in self.stops), default=1) - 1  # a stop string minus its last char
        self._pending = ""  # received, not yet shown (at most ``_hold`` characters)
        self.stopped = False

    def push(self, delta: str) -> str:
        """The text that can be shown now; after a stop string, nothing (``stopped`` is set)."""
        if self.stopped or not self.stops:
            return "" if self.stopped else delta
        text = self._pending + delta  # a stop string across deltas lies wholly in here
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self._pending = True, ""
            return text[: min(hits)]
        cut = max(len(text) - self._hold, 0)
        self._pending = text[cut:]
        return text[:cut]

    def flush(self) -> str:
        """The end of the stream without a stop string: what was held back."""
        text, self._pending = self._pending, ""
        return text
