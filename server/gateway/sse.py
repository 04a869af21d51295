"""Server-sent events, incrementally: body chunks in (split anywhere), whole events out.

A proxy sees an SSE body as arbitrary byte chunks: an event may be split over two chunks (even
inside a multi-byte UTF-8 character), and one chunk may hold several events. :class:`SseDecoder`
keeps the unfinished tail and yields each event once its blank line has arrived, with its exact
bytes (so an event that passes unchanged is forwarded byte for byte). The tail is bounded: an
event longer than ``max_event_bytes`` is an error, never an unbounded buffer.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

# An event ends at a blank line; lines end in CRLF, LF or CR (the SSE specification allows all
# three). A CR followed by LF is one line end, never two.
_EVENT_END = re.compile(rb"(?:\r\n|\n|\r(?!\n))(?:\r\n|\n|\r(?!\n))")
_LINES = re.compile(r"\r\n|\r|\n")
DONE = b"data: [DONE]\n\n"


class SseError(ValueError):
    """An event is not well formed (not UTF-8)."""


@dataclass(frozen=True)
class SseEvent:
    raw: bytes  # the event's bytes as received, its terminating blank line included
    data: str  # the `data:` lines joined with "\n" ("" for a comment-only event)
    event: str = ""  # the `event:` field, when present


class SseDecoder:
    def __init__(self, max_event_bytes: int = 1 << 20) -> None:
        self.max_event_bytes = max_event_bytes
        self._tail = b""
        self.error = ""  # set when the body turned out malformed: the events before it still count

    @property
    def pending(self) -> int:
        """Bytes received that do not end an event yet."""
        return len(self._tail)

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """The events that ``chunk`` completes, in order. A malformed event ends decoding: the
        events before it are returned and ``error`` says what was wrong (later calls give nothing)."""
        if self.error:
            return []
        scanned = max(len(self._tail) - 3, 0)  # no event ended inside the tail (but a CRLF may span chunks)
        buffer = self._tail + chunk
        events = []
        start = 0
        while True:
            end = _EVENT_END.search(buffer, max(start, scanned))
            if end is None or (end.end() == len(buffer) and buffer.endswith(b"\r")):
                break  # (a CR at the very end may be half of a CRLF: wait for the next byte)
            try:
                events.append(_parse(buffer[start : end.end()]))
            except SseError as exc:
                self.error, self._tail = str(exc), b""
                return events
            start = end.end()
        self._tail = buffer[start:]
        if len(self._tail) > self.max_event_bytes:
            self.error, self._tail = f"an event is longer than {self.max_event_bytes} bytes", b""
        return events

    def finish(self) -> list[SseEvent]:
        """The end of the body: an unterminated last event still counts (servers that omit the
        final blank line exist); whitespace alone is nothing."""
        tail, self._tail = self._tail, b""
        if self.error or not tail.strip():
            return []
        try:
            return [_parse(tail)]
        except SseError as exc:
            self.error = str(exc)
            return []


def _parse(raw: bytes) -> SseEvent:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SseError(f"an event is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    data, event = [], ""
    for line in _LINES.split(text):  # CR, LF, CRLF only: str.splitlines would also split on U+2028
        if not line or line.startswith(":"):
            continue
        name, _, value = line.partition(":")
        value = value.removeprefix(" ")
        if name == "data":
            data.append(value)
        elif name == "event":
            event = value
    return SseEvent(raw, "\n".join(data), event)


def encode(data: str) -> bytes:
    """One event carrying ``data`` (one `data:` line per line of it)."""
    return "".join(f"data: {line}\n" for line in data.split("\n")).encode() + b"\n"
