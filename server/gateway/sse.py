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


class SseError(ValueError):
    """The body is not a well-formed event stream (an event too long, or not UTF-8)."""


@dataclass(frozen=True)
class SseEvent:
    raw: bytes  # the event's bytes as received, its terminating blank line included
    data: str  # the `data:` lines joined with "\n" ("" for a comment-only event)
    event: str = ""  # the `event:` field, when present


class SseDecoder:
    def __init__(self, max_event_bytes: int = 1 << 20) -> None:
        self.max_event_bytes = max_event_bytes
        self._tail = b""

    @property
    def pending(self) -> int:
        """Bytes received that do not end an event yet."""
        return len(self._tail)

    def feed(self, chunk: bytes) -> list[SseEvent]:
        """The events that ``chunk`` completes, in order."""
        buffer = self._tail + chunk
        events = []
        start = 0
        while True:
            end = _EVENT_END.search(buffer, start)
            if end is None or (end.end() == len(buffer) and buffer.endswith(b"\r")):
                break  # (a CR at the very end may be half of a CRLF: wait for the next byte)
            events.append(_parse(buffer[start : end.end()]))
            start = end.end()
        self._tail = buffer[start:]
        if len(self._tail) > self.max_event_bytes:
            raise SseError(f"an event is longer than {self.max_event_bytes} bytes")
        return events

    def finish(self) -> list[SseEvent]:
        """The end of the body: an unterminated last event still counts (as browsers do not, but
        servers that omit the final blank line exist); whitespace alone is nothing."""
        tail, self._tail = self._tail, b""
        return [_parse(tail)] if tail.strip() else []


def _parse(raw: bytes) -> SseEvent:
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise SseError(f"an event is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    data, event = [], ""
    for line in text.splitlines():
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
