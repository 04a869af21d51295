"""`envoy.service.ext_proc.v3.ExternalProcessor`: the guard in Envoy's data path.

One ``Process`` stream per HTTP request. For ``/v1/chat/completions`` and ``/v1/completions``:

- the request body (BUFFERED; a streamed one is held until complete) gives the conversation and
  the domain (header ``x-guard-domain`` by default, or ``metadata.guard_domain``, or the dynamic
  metadata namespace ``qwen3guard`` key ``domain``); the prompt is judged before anything goes
  upstream, and a BLOCK answers 403 with an OpenAI-style error naming the category;
- the response body goes through :mod:`server.gateway.response_guard`: SSE events (STREAMED or
  FULL_DUPLEX_STREAMED body mode) go on once judged, a JSON response is judged whole.

On INTERRUPT the client gets the released text, a ``content_filter`` event and ``[DONE]``. In
FULL_DUPLEX_STREAMED mode the body then ends cleanly (``end_of_stream``) and Envoy resets the
upstream request (vLLM aborts it). In STREAMED mode the processor cannot end the body itself: it
answers the next message with an ImmediateResponse, so Envoy resets both sides after [DONE].

Other paths and non-200 responses pass unchanged. Every stream's guard session is closed when
the stream ends, however it ends.
"""

from __future__ import annotations

import asyncio
import logging
import posixpath
import re
import time
import uuid
from collections.abc import AsyncIterator
from urllib.parse import unquote

import grpc
from envoy.config.core.v3 import base_pb2
from envoy.extensions.filters.http.ext_proc.v3 import processing_mode_pb2
from envoy.service.ext_proc.v3 import external_processor_pb2 as ep
from envoy.service.ext_proc.v3 import external_processor_pb2_grpc as ep_grpc

from guard.errors import ContextTooLong, EngineError, LimitExceeded, PermissionDenied
from guard.session.response_session import ResponseSession
from guard.text.conversation import parse_messages
from server.gateway import openai_wire as wire
from server.gateway.response_guard import GuardedBody, GuardedEventStream
from server.stream_guard import StreamGuardService, prompt_pb, requested_release_mode
from server.wire import Unavailable

log = logging.getLogger(__name__)

SERVICE_NAME = ep.DESCRIPTOR.services_by_name["ExternalProcessor"].full_name
METADATA_NAMESPACE = "qwen3guard"
MODE = processing_mode_pb2.ProcessingMode
FULL_DUPLEX = MODE.FULL_DUPLEX_STREAMED
# vLLM's POST routes that generate no text: they pass. Every other POST that is not a guarded
# completion route is refused, so a route the guard does not read never reaches the model.
UNGUARDED_POST_PATHS = frozenset({
    "/tokenize", "/detokenize", "/v1/embeddings", "/pooling", "/classify", "/score", "/v1/score", "/rerank",
    "/v1/rerank", "/v2/rerank",
})  # fmt: skip


def route_of(path: str) -> str:
    """The path as the upstream will route it: query dropped, percent-decoded, slashes merged, dot
    segments resolved (so ``/v1/chat/completion%73`` and ``//v1/./chat/completions`` are guarded)."""
    path = posixpath.normpath("/" + unquote(path.split("?", 1)[0]).lstrip("/"))
    return re.sub(r"/+", "/", path)


def _headers(message) -> dict[str, str]:
    return {h.key.lower(): (h.raw_value.decode(errors="replace") if h.raw_value else h.value)
            for h in message.headers.headers}  # fmt: skip


def _immediate(error: wire.GatewayError) -> ep.ProcessingResponse:
    header = base_pb2.HeaderValueOption(header=base_pb2.HeaderValue(key="content-type", raw_value=b"application/json"))
    return ep.ProcessingResponse(
        immediate_response=ep.ImmediateResponse(
            status={"code": error.status},
            headers={"set_headers": [header]},
            body=wire.dumps(error.body()).encode(),
            details=f"qwen3guard_{error.code or error.status}",
        )
    )


class ExternalProcessorService(ep_grpc.ExternalProcessorServicer):
    def __init__(self, guard: StreamGuardService) -> None:
        self.guard = guard
        s = guard.settings
        self.domain_header = s.gateway_domain_header.lower()
        self.max_body_bytes = s.gateway_max_body_bytes
        self.token_ids = s.ext_proc_token_ids
        self.allow_media = s.gateway_allow_media
        self.slice_chars = max(s.max_chunk_tokens // 2, 1)

    async def Process(
        self, request_iterator: AsyncIterator[ep.ProcessingRequest], context: grpc.aio.ServicerContext
    ) -> AsyncIterator[ep.ProcessingResponse]:
        exchange = _Exchange(self)
        try:
            async for message in request_iterator:
                async for response in exchange.handle(message):
                    yield response
                if exchange.reset:
                    return
        finally:
            exchange.close()


class _Exchange:
    """One HTTP request and its response through the processor."""

    def __init__(self, service: ExternalProcessorService) -> None:
        self.service = service
        self.guard = service.guard
        self.kind = ""  # CHAT or COMPLETION when the path is guarded
        self.domain = ""
        self.request_id = ""
        self.body_mode = MODE.STREAMED
        self.request_body_mode = MODE.BUFFERED
        self.request_body = bytearray()
        self.session: ResponseSession | None = None
        self.body: GuardedEventStream | GuardedBody | None = None
        self.outcome = ""
        self.reset = False  # the stream is over for Envoy: stop reading
        self.reset_next = False  # STREAMED mode after an interrupt: the next answer resets the stream
        self.body_closed = False  # FULL_DUPLEX_STREAMED: end_of_stream sent, nothing more goes

    async def handle(self, message: ep.ProcessingRequest) -> AsyncIterator[ep.ProcessingResponse]:
        if message.HasField("protocol_config"):
            self.body_mode = message.protocol_config.response_body_mode
            self.request_body_mode = message.protocol_config.request_body_mode
        which = message.WhichOneof("request")
        if self.reset_next:  # Envoy resets both sides (the upstream request is aborted)
            self.reset = True
            yield _immediate(wire.GatewayError(200, "the response was interrupted", code="content_filter"))
            return
        try:
            if which == "request_headers":
                self._request_headers(message)
                yield ep.ProcessingResponse(request_headers=ep.HeadersResponse())
            elif which == "request_body":
                yield await self._request_body(message.request_body)
            elif which == "response_headers":
                yield self._response_headers(message.response_headers)
            elif which == "response_body":
                async for response in self._response_body(message.response_body):
                    yield response
            elif which == "request_trailers":
                yield ep.ProcessingResponse(request_trailers=ep.TrailersResponse())
            elif which == "response_trailers":
                async for response in self._response_trailers():
                    yield response
        except wire.GatewayError as exc:
            self.outcome = self.outcome or ("blocked" if exc.status == 403 else "rejected")
            yield _immediate(exc)
            self.reset = True

    # ------------------------------------------------------------------ request

    def _request_headers(self, message: ep.ProcessingRequest) -> None:
        headers = _headers(message.request_headers)
        self.request_id = headers.get("x-request-id", "") or uuid.uuid4().hex
        method, route = headers.get(":method", "GET"), route_of(headers.get(":path", "/"))
        if method in ("GET", "HEAD", "OPTIONS"):
            return  # reads (models, health, metrics): nothing generated
        self.kind = wire.PATHS.get(route, "")
        if not self.kind:
            if route in UNGUARDED_POST_PATHS:
                return
            raise wire.GatewayError(404, f"{method} {route} is not served through the guard (it guards "
                                    f"{', '.join(wire.PATHS)})", code="route_not_guarded")  # fmt: skip
        if self.request_body_mode not in (MODE.BUFFERED, MODE.STREAMED):
            raise wire.GatewayError(500, "the guard needs request_body_mode BUFFERED (or STREAMED): it judges the "
                                    "conversation before it goes upstream", type="server_error")  # fmt: skip
        # The operator's route metadata first, then the client's header, then the body's metadata.
        routed = message.metadata_context.filter_metadata.get(METADATA_NAMESPACE)
        if routed is not None and "domain" in routed.fields:
            self.domain = routed.fields["domain"].string_value
        else:
            self.domain = headers.get(self.service.domain_header, "")

    async def _request_body(self, message) -> ep.ProcessingResponse:
        if not self.kind:
            return ep.ProcessingResponse(request_body=ep.BodyResponse())
        self.request_body += message.body
        if len(self.request_body) > self.service.max_body_bytes:
            raise wire.GatewayError(413, f"the request body is over {self.service.max_body_bytes} bytes")
        response = ep.ProcessingResponse(request_body=ep.BodyResponse())
        if not message.end_of_stream:  # a streamed request body: nothing goes upstream before it is judged
            response.request_body.response.body_mutation.clear_body = True
            return response
        body, self.request_body = bytes(self.request_body), bytearray()  # judged: not kept for the whole answer
        await self._judge_prompt(body)
        if message.body != body:
            response.request_body.response.body_mutation.body = body
        return response

    async def _judge_prompt(self, body: bytes) -> None:
        request = await asyncio.to_thread(wire.parse_request, self.kind, body, allow_media=self.service.allow_media)
        domain = self.domain or request.domain
        try:
            runtime = self.guard.holder.ready()
            policy = self.guard.policies.get(domain)
            messages = parse_messages(request.judged_messages)
            rendered = await asyncio.to_thread(runtime.tokenizer.render_prompt, messages)  # off the event loop
            stream = runtime.moderator.open(prompt_ids=rendered.prompt_ids, preamble_ids=rendered.preamble_ids,
                                            policy=policy, loop=asyncio.get_running_loop())  # fmt: skip
        except Unavailable as exc:
            raise wire.GatewayError(503, str(exc), type="service_unavailable") from None
        except ContextTooLong as exc:
            raise wire.GatewayError(400, str(exc), code="context_length_exceeded") from None
        except LimitExceeded as exc:  # the guard's live sessions, the tenant's limits: retry later
            raise wire.GatewayError(429, str(exc), type="rate_limit_exceeded") from None
        except PermissionDenied as exc:  # the caller's tenant may not use this domain
            raise wire.GatewayError(403, str(exc), type="permission_denied") from None
        except EngineError as exc:
            raise wire.GatewayError(400, str(exc)) from None
        self.session = ResponseSession(stream, policy, requested_release_mode(0, policy), runtime.tokenizer.hf,
                                       draining=lambda: self.guard.holder.draining,
                                       audit=self.guard.audit_trail(policy, self.request_id, "ext_proc"))  # fmt: skip
        topic = self.guard.topic_check(policy, request.judged_messages, ())
        try:
            prompt = await self.session.judge_prompt(topic)
        except LimitExceeded as exc:  # the tenant's token rate
            raise wire.GatewayError(429, str(exc), type="rate_limit_exceeded") from None
        self.guard.record_prompt(policy, prompt)
        if prompt.blocked:
            if prompt.model_failure:
                raise wire.GatewayError(503, f"the guard could not judge the prompt ({prompt.model_failure}); the "
                                        f"{policy.name} policy fails closed", type="service_unavailable")  # fmt: skip
            verdict = prompt_pb(prompt, policy)
            category = verdict.verdict.category or verdict.topic
            raise wire.GatewayError(
                403, f"the prompt was blocked by the {policy.name} policy ({category or 'unsafe'})",
                type="content_filter", code="prompt_blocked",
                extra={"guard": {"action": "BLOCK", "domain": policy.name, "category": category}},
            )  # fmt: skip

    # ------------------------------------------------------------------ response

    def _response_headers(self, message) -> ep.ProcessingResponse:
        response = ep.ProcessingResponse(response_headers=ep.HeadersResponse())
        if not self.kind:
            return response
        headers = _headers(message)
        if headers.get(":status") != "200":
            self.outcome = "passed"  # an upstream error carries no answer to judge
            return response
        if self.session is None:  # e.g. a request body mode that never sent the body
            raise wire.GatewayError(502, "the guard did not judge the request, so the answer is withheld",
                                    type="upstream_error")  # fmt: skip
        content_type = headers.get("content-type", "").lower()
        encoding = headers.get("content-encoding", "identity").lower()
        if encoding != "identity":
            raise wire.GatewayError(
                502, f"a {encoding}-encoded answer cannot be judged: withheld", type="upstream_error"
            )
        record = self.guard.record_chunk
        if content_type.startswith("text/event-stream"):
            self.body = GuardedEventStream(self.session, self.kind, record, token_ids=self.service.token_ids,
                                           max_event_bytes=self.service.max_body_bytes)  # fmt: skip
        elif content_type.startswith("application/json"):
            self.body = GuardedBody(self.session, self.kind, record, max_bytes=self.service.max_body_bytes,
                                    slice_chars=self.service.slice_chars)  # fmt: skip
        else:
            raise wire.GatewayError(502, f"the upstream answered {content_type or 'without a content type'}: not "
                                    "an answer the guard can judge, withheld", type="upstream_error")  # fmt: skip
        response.response_headers.response.header_mutation.remove_headers.append("content-length")  # may change
        return response

    async def _response_body(self, message) -> AsyncIterator[ep.ProcessingResponse]:
        duplex = self.body_mode == FULL_DUPLEX
        if self.body_closed:
            return  # FULL_DUPLEX_STREAMED: the body is over for the client; what still arrives is dropped
        if self.body is None:
            if duplex:
                yield self._body_response(message.body, message.end_of_stream, True)
            else:
                yield ep.ProcessingResponse(response_body=ep.BodyResponse())  # unchanged
            return
        started = time.perf_counter()
        try:
            if isinstance(self.body, GuardedEventStream):
                out = await self.body.feed(message.body)
            else:
                self.body.feed(message.body)
                out = b""
            if message.end_of_stream and not self.body.finished:
                out += await self.body.end_of_body()
        except LimitExceeded as exc:  # the tenant's token rate (or a session limit): closed, with the limit
            log.info("event=ext_proc_body_limited request_id=%s reason=%r", self.request_id, str(exc))
            out = await self.body.fail(str(exc), closed=True)
        except Exception as exc:  # unexpected: the body fails closed, it never passes unjudged
            log.error("event=ext_proc_body_error request_id=%s error=%s", self.request_id, type(exc).__name__,
                      exc_info=exc)  # fmt: skip
            out = await self.body.fail(f"the guard failed on the answer ({type(exc).__name__})", closed=True)
        self.guard.metrics.gateway_hold_seconds.observe(time.perf_counter() - started)
        ended = self.body.finished
        if duplex:
            if out or ended or message.end_of_stream:
                self.body_closed = ended or message.end_of_stream
                yield self._body_response(out, self.body_closed, True)
            return
        yield self._body_response(out, message.end_of_stream, False)
        if ended and not message.end_of_stream and getattr(self.body, "cut", False):
            self.reset_next = True  # STREAMED: the body cannot end here; the next answer resets it (and upstream)

    async def _response_trailers(self) -> AsyncIterator[ep.ProcessingResponse]:
        if self.body is not None and not self.body.finished:  # the body ended with trailers
            if self.body_mode != FULL_DUPLEX:  # STREAMED cannot add body bytes here: reset instead
                self.reset = True
                yield _immediate(wire.GatewayError(502, "the answer ended without its end", type="upstream_error"))
                return
            out = await self.body.end_of_body()
            self.body_closed = True
            yield self._body_response(out, True, True)
        yield ep.ProcessingResponse(response_trailers=ep.TrailersResponse())

    @staticmethod
    def _body_response(data: bytes, end: bool, duplex: bool) -> ep.ProcessingResponse:
        response = ep.ProcessingResponse(response_body=ep.BodyResponse())
        mutation = response.response_body.response.body_mutation
        if duplex:
            mutation.streamed_response.body = data
            mutation.streamed_response.end_of_stream = end
        elif data:
            mutation.body = data
        else:
            mutation.clear_body = True
        return response

    # ------------------------------------------------------------------ end

    def close(self) -> None:
        if self.session is None:
            if self.kind:
                self.guard.metrics.gateway_requests.labels("ext_proc", self.outcome or "rejected").inc()
            return
        outcome = self.outcome or (self.body.outcome if self.body is not None and self.body.finished else "")
        self.session.close(f"ext_proc: {outcome or 'ended early'}")
        self.guard.metrics.gateway_requests.labels("ext_proc", outcome or "error").inc()
        log.info("event=ext_proc_done request_id=%s outcome=%s", self.request_id, outcome or "ended early")
