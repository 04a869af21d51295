"""An upstream's OpenAI response guarded on its way through a proxy (the Envoy processor):
body bytes in, the bytes the client may see out, over one :class:`ResponseSession`.

Streams (:class:`GuardedEventStream`): the body is split into SSE events across arbitrary chunk
boundaries; each event's text goes to the session as it arrives (its ``token_ids`` instead, when
the upstream's ids are Qwen3's), and an event goes on only once its text is released, so nothing
unjudged reaches the client (HOLD_BACK). While the released text equals the events' own text
they go on byte for byte; from the first difference (a redaction) the rest is re-framed: events
carrying the released text in the stream's own envelope. On INTERRUPT the body ends with what
was released, a last event whose ``finish_reason`` is ``content_filter`` (our verdict in its
``guard`` field) and ``data: [DONE]``; the transport then stops the upstream.

Whole responses (:class:`GuardedBody`): the JSON body is judged as one chunk under the same
policy; a cut or redacted answer is rewritten, a safe one goes on unchanged.

A body that is not what it claims (an event too long, not UTF-8, not JSON) or that ends without
``[DONE]`` is an upstream failure, and the domain's fail mode decides: open releases what was
received, judged to its end; closed withholds what is held and ends with an error event.
"""

from __future__ import annotations

import json
import logging
from collections import deque
from dataclasses import dataclass

from guard.errors import EngineError
from guard.policy.rules import FailMode, Policy
from guard.session.response_session import ChunkOutcome, FinalOutcome, Pending, ResponseSession
from server.gateway import openai_wire as wire
from server.gateway.sse import DONE, SseDecoder, SseEvent, encode

log = logging.getLogger(__name__)


@dataclass
class _Held:
    """An event received and not yet sent."""

    raw: bytes
    event: dict | None
    text: str = ""
    ids: tuple[int, ...] = ()
    done: bool = False  # data: [DONE]


class BodyFailure(Exception):
    """The upstream's body is malformed or broke off (the fail mode decides)."""


def verdict_field(final: FinalOutcome, policy: Policy) -> dict:
    """Our verdict in an interrupted response (the ``guard`` field)."""
    return wire.interrupt_field(domain=policy.name, category=final.category, reason=final.reason,
                                offset=final.flag_index, released_tokens=final.released)  # fmt: skip


class _Guarded:
    """What both kinds share: the session, its policy and the outcome record."""

    def __init__(self, session: ResponseSession, kind: str, record_chunk) -> None:
        self.session = session
        self.policy: Policy = session.policy
        self.kind = kind
        self._record = record_chunk
        self.outcome = "passed"  # passed, interrupted, redacted, failed_open, failed_closed

    async def _resolve(self, pending: Pending) -> ChunkOutcome | None:
        outcome = await self.session.resolve(pending)
        if outcome is not None:
            self._record(self.policy, outcome)
            if outcome.redactions:
                self.outcome = "redacted"
        return outcome


class GuardedEventStream(_Guarded):
    def __init__(self, session: ResponseSession, kind: str, record_chunk, *, token_ids: bool = False,
                 max_event_bytes: int = 1 << 20) -> None:  # fmt: skip
        super().__init__(session, kind, record_chunk)
        self.use_token_ids = token_ids
        self._ids_mode: bool | None = None  # decided by the first event with text
        self._decoder = SseDecoder(max_event_bytes)
        self._held: deque[_Held] = deque()
        self._trailer: list[bytes] = []  # re-framed: finish and usage events, sent at the end
        self._released = ""  # released text not yet sent
        self._reframed = False
        self._base: dict | None = None  # the envelope of the latest event
        self._tool_calls = False  # the answer calls tools (a redaction cannot be re-framed into those)
        self._unframeable = False
        self.finished = False  # the client's body is complete (end, interrupt, failure)
        self.cut = False  # ended before the upstream's end (interrupt, withheld, fail closed): stop the upstream

    async def feed(self, chunk: bytes) -> bytes:
        """The bytes the client may see after ``chunk``."""
        if self.finished:
            return b""  # after the end (an interrupt), what still arrives is dropped
        failure = ""
        pending: list[Pending] = []
        done = False
        try:
            for event in self._decoder.feed(chunk):
                held = self._hold(event)
                self._held.append(held)
                done = held.done
                if held.text or held.ids:
                    pending.append(self._submit(held))
                if done:
                    break  # nothing counts after [DONE]
        except BodyFailure as exc:
            failure = str(exc)
        failure = failure or self._decoder.error  # what came before it is still judged and sent
        try:
            for item in pending:
                outcome = await self._resolve(item)
                if outcome is None:
                    continue
                self._released += outcome.released_text
                if outcome.interrupted:
                    return self._interrupted(self.session.final())
        except EngineError as exc:  # a limit of the guard (a session's tokens, its idle timeout): not judged
            return self._emit() + await self.fail(str(exc), closed=True)
        out = self._emit()
        if self._unframeable:
            return out + self._withhold_tool_call()
        if failure:
            return out + await self.fail(failure)
        return out + await self._end() if done else out

    async def end_of_body(self) -> bytes:
        """The upstream's body ended: without [DONE] (and its tail) it broke off."""
        if self.finished:
            return b""
        tail = self._decoder.finish()
        if self._decoder.error:
            return await self.fail(self._decoder.error)
        if tail and tail[0].data == "[DONE]":  # its blank line left out: still the end
            self._held.append(_Held(tail[0].raw, None, done=True))
            return self._emit() + await self._end()
        return await self.fail("the upstream's event stream ended without data: [DONE]")

    # ------------------------------------------------------------------ events in

    def _hold(self, event: SseEvent) -> _Held:
        if event.data == "[DONE]":
            return _Held(event.raw, None, done=True)
        if not event.data:
            return _Held(event.raw, None)  # a comment or keep-alive
        try:
            parsed = json.loads(event.data)
        except json.JSONDecodeError:
            raise BodyFailure("an event's data is not JSON") from None
        if not isinstance(parsed, dict):
            raise BodyFailure("an event's data is not a JSON object")
        try:
            text, ids = wire.event_text(parsed, self.kind)
        except wire.MalformedAnswer as exc:
            raise BodyFailure(f"an event the guard cannot read: {exc}") from None
        if parsed.get("choices"):
            self._base = parsed
            self._tool_calls = self._tool_calls or wire.has_tool_calls(parsed)
        return _Held(event.raw, parsed, text, tuple(ids) if self.use_token_ids else ())

    def _submit(self, held: _Held) -> Pending:
        if self._ids_mode is None:
            self._ids_mode = bool(held.ids)
        if self._ids_mode:
            if not held.ids and held.text:
                raise BodyFailure("an event with text but no token_ids in a stream of token ids")
            return self.session.submit_ids(held.ids)
        return self.session.submit_text(held.text)

    # ------------------------------------------------------------------ events out

    def _emit(self) -> bytes:
        """Send every held event whose text is released (unchanged while the text matches)."""
        out: list[bytes] = []
        while self._held:
            head = self._held[0]
            if head.done:
                break  # [DONE] goes last, once the end is judged
            if not head.text:
                if self._reframed and head.event is not None:
                    self._trailer.append(head.raw)  # a finish or usage event waits for the text before it
                else:
                    out.append(head.raw)
                self._held.popleft()
                continue
            if not self._reframed:
                if self._released.startswith(head.text):
                    out.append(head.raw)
                    self._released = self._released[len(head.text) :]
                    self._held.popleft()
                    continue
                if head.text.startswith(self._released):
                    break  # partly released: the event waits for the rest
                if self._tool_calls:
                    self._unframeable = True  # a redacted tool call cannot be re-framed: it is withheld
                    break
                self._reframed = True  # released text differs (a redaction): re-frame from here
                log.debug("event=gateway_reframed session=%s", self.session.id)
            self._held.popleft()  # its text comes out as released text; its finish reason at the end
            choice = (head.event or {}).get("choices") or [{}]
            if isinstance(choice[0], dict) and choice[0].get("finish_reason"):
                self._trailer.append(self._event(wire.with_text(head.event, self.kind, "")))
        if self._reframed and self._released:
            out.append(self._event(wire.text_event(self._envelope(), self.kind, self._released)))
            self._released = ""
        return b"".join(out)

    async def _end(self) -> bytes:
        """[DONE] arrived: judge the held-back tail, send the rest, the trailer, then [DONE]."""
        tail = await self._resolve(self.session.submit_end())
        if tail is not None:
            self._released += tail.released_text
        final = self.session.final()
        if final.interrupted:
            return self._interrupted(final)
        if final.redactions and self.outcome == "passed":
            self.outcome = "redacted"
        self._released += final.released_text
        out = self._emit()
        if self._unframeable:
            return out + self._withhold_tool_call()
        if self._released:  # text that matched no event (a re-framed tail)
            out += self._event(wire.text_event(self._envelope(), self.kind, self._released))
            self._released = ""
        out += b"".join(self._trailer) + b"".join(h.raw for h in self._held if not h.text)
        self._held.clear()
        self.finished = True
        return out

    def _interrupted(self, final: FinalOutcome) -> bytes:
        out = self._emit()
        if self._released and not self._tool_calls:  # released text of an event only partly released
            out += self._event(wire.text_event(self._envelope(), self.kind, self._released))
            self._released = ""
        guard = verdict_field(final, self.policy)
        out += self._event(wire.finish_event(self._envelope(), self.kind, "content_filter", guard)) + DONE
        self._held.clear()
        self.finished = self.cut = True
        self.outcome = "interrupted"
        return out

    def _withhold_tool_call(self) -> bytes:
        final = self.session.withhold("the policy redacts part of a tool call: the call is withheld")
        guard = wire.interrupt_field(action="REDACT", domain=self.policy.name, category="", reason=final.reason,
                                     offset=None, released_tokens=final.released)  # fmt: skip
        self._held.clear()
        self.finished = self.cut = True
        self.outcome = "redacted"
        return self._event(wire.finish_event(self._envelope(), self.kind, "content_filter", guard)) + DONE

    async def fail(self, why: str, *, closed: bool = False) -> bytes:
        """The upstream's body failed: the domain's fail mode decides what of the held part goes."""
        log.warning("event=gateway_upstream_failure session=%s fail_mode=%s", self.session.id,
                    self.policy.fail_mode.value)  # fmt: skip
        if self.policy.fail_mode is FailMode.OPEN and not closed:
            self.outcome = "failed_open"
            self.session.fail_open(f"upstream body failed: {why}; fail open")
            return await self._end()  # no [DONE]: the stream stays broken, as the upstream left it
        self.outcome = "failed_closed"
        final = self.session.withhold(f"upstream body failed: {why}; fail closed")
        self._held.clear()
        self.finished = self.cut = True
        error = {"error": {"message": f"the upstream response failed ({why}); the guard withheld "
                                      f"{final.withheld} tokens (fail closed)", "type": "upstream_error"}}  # fmt: skip
        return self._event(error) + DONE

    def _envelope(self) -> dict:
        return wire.envelope(self._base, self.kind)

    @staticmethod
    def _event(obj: dict) -> bytes:
        return encode(wire.dumps(obj))


class GuardedBody(_Guarded):
    """A whole JSON response, judged as one chunk (bounded)."""

    def __init__(self, session: ResponseSession, kind: str, record_chunk, *, max_bytes: int,
                 slice_chars: int = 512) -> None:  # fmt: skip
        super().__init__(session, kind, record_chunk)
        self.max_bytes = max_bytes
        self.slice_chars = slice_chars  # the text goes to the engine in slices within its chunk limit
        self._body = bytearray()
        self._over = False
        self.finished = False

    def feed(self, chunk: bytes) -> None:
        """Held until the end (bounded: beyond ``max_bytes`` it is dropped, and fails)."""
        if not self._over and len(self._body) + len(chunk) > self.max_bytes:
            self._over, self._body = True, bytearray()
        if not self._over:
            self._body += chunk

    async def end_of_body(self) -> bytes:
        self.finished = True
        if self._over:  # nothing of it was kept: an error, whatever the fail mode
            return await self.fail(f"the upstream's response is over {self.max_bytes} bytes", closed=True)
        body = bytes(self._body)
        try:
            data = json.loads(body)
        except (UnicodeDecodeError, json.JSONDecodeError):
            data = None
        if not isinstance(data, dict):
            return await self.fail("the upstream's response is not a JSON object")
        try:
            text = wire.message_text(data, self.kind)
        except wire.MalformedAnswer as exc:
            return await self.fail(f"the guard cannot read the upstream's response: {exc}")
        if not text:
            return body
        try:
            released = await self._judge(text)
        except EngineError as exc:  # a limit of the guard (the session's tokens): not judged, not passed
            return await self.fail(str(exc), closed=True)
        final = self.session.final()
        released += final.released_text
        if final.redactions and self.outcome == "passed":
            self.outcome = "redacted"
        if not final.interrupted and released == text:
            return body
        calls = wire.has_tool_calls(data)  # a cut or redacted tool call is withheld whole, never re-shaped
        out = wire.with_text(data, self.kind, "" if calls else released, message=True)
        if final.interrupted or calls:
            out["choices"][0]["finish_reason"] = "content_filter"
            out["guard"] = verdict_field(final, self.policy)
            if not final.interrupted:
                out["guard"].update(action="REDACT", reason="the policy redacts part of a tool call: withheld")
            self.outcome = "interrupted" if final.interrupted else "redacted"
        return wire.dumps(out).encode()

    async def _judge(self, text: str) -> str:
        """The released text: the answer in slices (pipelined), then its end."""
        pending = [self.session.submit_text(text[i : i + self.slice_chars])
                   for i in range(0, len(text), self.slice_chars)]  # fmt: skip
        released = ""
        for item in [*pending, self.session.submit_end()]:
            outcome = await self._resolve(item)
            if outcome is not None:
                released += outcome.released_text
                if outcome.interrupted:
                    break
        return released

    async def fail(self, why: str, *, closed: bool = False) -> bytes:
        """The answer cannot be judged: fail open passes it as it came, fail closed withholds it."""
        self.finished = True
        if self.policy.fail_mode is FailMode.OPEN and not closed:
            self.outcome = "failed_open"
            self.session.fail_open(f"{why}; fail open")
            return bytes(self._body)
        self.outcome = "failed_closed"
        self.session.withhold(f"{why}; fail closed")
        return wire.dumps({"error": {"message": f"{why}; the guard withheld it (fail closed)",
                                     "type": "upstream_error"}}).encode()  # fmt: skip
