"""The OpenAI-compatible guarded endpoint: point any OpenAI SDK at the sidecar's base URL.

``POST /v1/chat/completions`` and ``/v1/completions`` (streaming or not) run through
GuardedGeneration (the same session, policies, release and upstream abort as the gRPC service):
the prompt is judged first (a BLOCK answers 403 with an OpenAI-style error), only released text
is streamed (OpenAI's SSE chunks), and an interrupted answer ends with ``finish_reason:
"content_filter"`` and our verdict in a ``guard`` field. The domain comes from a header
(``x-guard-domain``) or ``metadata.guard_domain``. ``GET /v1/models`` lists the served model,
``GET /health`` says whether the guard is ready. Served by uvicorn in the sidecar's event loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any

import grpc
import uvicorn
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from guard.errors import ContextTooLong, EngineError
from server.auth import Authorizer
from server.gateway import openai_wire as wire
from server.gateway.sse import DONE, encode
from server.guarded_generation import GuardedGenerationService
from server.qwen3guard.v1 import guard_pb2 as pb
from server.settings import ServeSettings
from server.tls import CertificateWatcher
from server.upstream import UpstreamError
from server.wire import error_status, status_of

log = logging.getLogger(__name__)

# Request fields GuardedGeneration cannot honour: refused, never silently ignored.
UNSUPPORTED = ("tools", "tool_choice", "functions", "function_call", "response_format", "presence_penalty",
               "frequency_penalty", "repetition_penalty", "logit_bias", "best_of", "suffix", "structured_outputs",
               "guided_json", "guided_regex", "guided_choice", "guided_grammar")  # fmt: skip
HTTP_STATUS = {
    grpc.StatusCode.INVALID_ARGUMENT: 400,
    grpc.StatusCode.FAILED_PRECONDITION: 400,
    grpc.StatusCode.RESOURCE_EXHAUSTED: 429,
    grpc.StatusCode.UNAVAILABLE: 503,
    grpc.StatusCode.ABORTED: 409,
    grpc.StatusCode.UNAUTHENTICATED: 401,
    grpc.StatusCode.PERMISSION_DENIED: 403,
}


class _Server(uvicorn.Server):
    """uvicorn inside the sidecar's loop: the sidecar owns SIGTERM and the drain, not uvicorn."""

    def capture_signals(self):  # type: ignore[override]
        return contextlib.nullcontext()


class _Authenticated:
    """ASGI middleware: every route but ``/health`` needs a tenant's key (``Authorization: Bearer``),
    holds one of its call slots for the whole response (streamed bodies included), and runs in
    its context (domain checks, token limits, audit records)."""

    OPEN_PATHS = frozenset({"/health"})

    def __init__(self, app: Any, authorizer: Authorizer) -> None:
        self.app = app
        self.authorizer = authorizer

    async def __call__(self, scope: dict, receive: Any, send: Any) -> None:
        if scope["type"] != "http" or scope["path"] in self.OPEN_PATHS:
            await self.app(scope, receive, send)
            return
        headers = {key.decode("latin-1").lower(): value.decode("latin-1") for key, value in scope["headers"]}
        try:
            grant = self.authorizer.admit(headers.get("authorization"), (), "OpenAI", scope["path"])
        except EngineError as exc:
            code = status_of(exc)
            error = wire.GatewayError(HTTP_STATUS[code], str(exc), type=code.name.lower())
            extra = {"www-authenticate": "Bearer"} if code == grpc.StatusCode.UNAUTHENTICATED else {}
            await JSONResponse(error.body(), status_code=error.status, headers=extra)(scope, receive, send)
            return
        try:
            self.authorizer.enter(grant)
            await self.app(scope, receive, send)
        finally:
            grant.release()


class OpenAIEndpoint:
    def __init__(
        self,
        generation: GuardedGenerationService,
        settings: ServeSettings,
        tls: CertificateWatcher | None = None,
        authorizer: Authorizer | None = None,
    ) -> None:
        self.generation = generation
        self.tls = tls
        self.authorizer = authorizer
        self.guard = generation.guard
        self.settings = settings
        self.app = self._build_app()
        self._server: _Server | None = None
        self._task: asyncio.Task | None = None
        self.port = 0  # the bound port once started

    # ------------------------------------------------------------------ lifecycle

    async def start(self) -> None:
        host = self.settings.address.rsplit(":", 1)[0].strip("[]") or "0.0.0.0"
        tls = self.tls
        app = _Authenticated(self.app, self.authorizer) if self.authorizer is not None else self.app
        config = uvicorn.Config(
            app, host=host, ssl_context_factory=(lambda _config, _default: tls.ssl_context()) if tls else None,
            port=self.settings.openai_port, log_level="warning", access_log=False,
            lifespan="off", limit_concurrency=self.settings.openai_max_connections,
            timeout_graceful_shutdown=max(1, int(self.settings.grace_period_s)),
        )  # fmt: skip
        self._server = _Server(config)
        self._task = asyncio.create_task(self._server.serve())
        while not self._server.started:
            if self._task.done():
                error = self._task.exception() if not self._task.cancelled() else None
                raise OSError(f"the OpenAI endpoint could not listen on {host}:{self.settings.openai_port} ({error})")
            await asyncio.sleep(0.02)
        self.port = self._server.servers[0].sockets[0].getsockname()[1]
        log.info("event=openai_listening host=%s port=%d", host, self.port)

    async def stop(self) -> None:
        if self._server is not None and self._task is not None:
            self._server.should_exit = True
            await asyncio.gather(self._task, return_exceptions=True)

    async def model_name(self) -> str:
        if self.settings.openai_model:
            return self.settings.openai_model
        upstream = self.generation.upstream
        if upstream is None:
            raise wire.GatewayError(503, "no upstream engine is configured", type="service_unavailable")
        if hasattr(upstream, "model_name"):
            try:
                return await upstream.model_name()
            except UpstreamError as exc:
                raise wire.GatewayError(502, f"upstream: {exc}", type="upstream_error") from None
        return upstream.name

    # ------------------------------------------------------------------ routes

    def _build_app(self) -> FastAPI:
        app = FastAPI(title="qwen3guard sidecar: OpenAI-compatible guarded endpoint", docs_url=None, redoc_url=None)

        @app.exception_handler(wire.GatewayError)
        async def gateway_error(request: Request, exc: wire.GatewayError) -> JSONResponse:
            return JSONResponse(exc.body(), status_code=exc.status)

        @app.get("/health")
        async def health() -> Response:
            holder = self.guard.holder
            ready = holder.runtime is not None and not holder.draining and self.generation.upstream is not None
            return JSONResponse({"status": "ok" if ready else "unavailable"}, status_code=200 if ready else 503)

        @app.get("/v1/models")
        async def models() -> JSONResponse:
            name = await self.model_name()
            model = {"id": name, "object": "model", "created": 0, "owned_by": "qwen3guard-sidecar"}
            return JSONResponse({"object": "list", "data": [model]})

        @app.post("/v1/chat/completions")
        async def chat(request: Request) -> Response:
            return await self._complete(request, wire.CHAT)

        @app.post("/v1/completions")
        async def completions(request: Request) -> Response:
            return await self._complete(request, wire.COMPLETION)

        return app

    async def _body(self, request: Request) -> bytes:
        limit = self.settings.gateway_max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise wire.GatewayError(413, f"the request body is over {limit} bytes")
        body = bytearray()
        async for part in request.stream():
            body += part
            if len(body) > limit:
                raise wire.GatewayError(413, f"the request body is over {limit} bytes")
        return bytes(body)

    async def _complete(self, http: Request, kind: str) -> Response:
        """The body read, the answer is made while watching the connection: a caller that hangs up
        before its response starts (a whole answer, or a stream before its first event) cancels
        the generation and with it the upstream request, as vLLM's own server does. Once a stream
        has started, Starlette cancels it on the disconnect."""
        try:
            body = await self._body(http)
        except wire.GatewayError:
            self._count("rejected")
            raise
        answer = asyncio.ensure_future(self._answer(http, kind, body))
        hang_up = asyncio.ensure_future(_disconnected(http))
        try:
            await asyncio.wait({answer, hang_up}, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for task in (hang_up, answer):
                if not task.done():
                    task.cancel()
            await asyncio.shield(asyncio.gather(hang_up, answer, return_exceptions=True))
        if answer.cancelled():
            self._count("client_gone")
            log.info("event=openai_client_gone")
            return Response(status_code=499)  # nobody reads it: the connection is closed
        return answer.result()

    async def _answer(self, http: Request, kind: str, body: bytes) -> Response:
        try:
            parsed = wire.parse_request(kind, body)
            unsupported = sorted(set(UNSUPPORTED) & parsed.fields)
            if unsupported:
                raise wire.GatewayError(400, f"`{unsupported[0]}` is not supported by the guarded endpoint "
                                        "(it generates through GuardedGeneration)", param=unsupported[0])  # fmt: skip
            served = await self.model_name()
            if parsed.model != served:
                raise wire.GatewayError(404, f"The model `{parsed.model}` does not exist (this endpoint serves "
                                        f"`{served}`).", code="model_not_found", param="model")  # fmt: skip
        except wire.GatewayError:
            self._count("rejected")
            raise
        request_id = ("chatcmpl-" if kind == wire.CHAT else "cmpl-") + uuid.uuid4().hex
        request = self._generate_request(parsed, http.headers.get(self.settings.gateway_domain_header), request_id)
        parsed.domain = request.domain or self.settings.default_domain
        responses = self.generation.stream(request, raw_prompt=parsed.prompt, front_end="openai")
        try:
            start = await self._next(responses)
            first = await self._next(responses)  # the upstream's first answer (or its refusal) before any header
            if start.start.prompt.verdict.action == pb.BLOCK:
                await responses.aclose()
                self._count("blocked")
                return self._blocked(start.start.prompt, first.end)
        except BaseException:
            await responses.aclose()
            raise
        base = {"id": request_id, "object": "chat.completion.chunk" if kind == wire.CHAT else "text_completion",
                "created": int(time.time()), "model": served}  # fmt: skip
        parsed.prompt_tokens = start.start.prompt.prompt_tokens
        if parsed.stream:
            return StreamingResponse(self._events(first, responses, parsed, base), media_type="text/event-stream")
        return await self._whole(first, responses, parsed, base)

    def _generate_request(self, parsed: wire.OpenAIRequest, header_domain: str | None, request_id: str):
        s = parsed.sampling
        sampling = pb.SamplingParams(
            temperature=s.get("temperature", 1.0), top_p=s.get("top_p", 0.0), max_tokens=s.get("max_tokens", 0),
            stop=s.get("stop", []),
        )  # fmt: skip
        if "seed" in s:
            sampling.seed = s["seed"]
        messages = [pb.ChatMessage(role=m["role"], content=m["content"]) for m in parsed.messages]
        return pb.GenerateRequest(request_id=request_id, domain=header_domain or parsed.domain, messages=messages,
                                  sampling=sampling)  # fmt: skip

    async def _next(self, responses: AsyncIterator[pb.GenerateResponse]) -> pb.GenerateResponse:
        try:
            return await anext(responses)
        except StopAsyncIteration:
            raise wire.GatewayError(500, "the generation ended without an answer", type="server_error") from None
        except wire.GatewayError:
            raise
        except Exception as exc:
            raise self._error(exc) from None

    def _error(self, exc: BaseException) -> wire.GatewayError:
        if isinstance(exc, UpstreamError):
            self._count("error")
            return wire.GatewayError(502, f"upstream: {exc}", type="upstream_error")
        if isinstance(exc, ContextTooLong):  # retrying will not help: not a 429
            self._count("rejected")
            return wire.GatewayError(400, str(exc), code="context_length_exceeded")
        code, message = error_status(exc, request_id="", rpc="OpenAI endpoint")
        self._count("rejected" if code == grpc.StatusCode.INVALID_ARGUMENT else "error")
        return wire.GatewayError(HTTP_STATUS.get(code, 500), message, type=code.name.lower())

    def _blocked(self, prompt: pb.PromptVerdict, end: pb.GenerationEnd) -> JSONResponse:
        category = prompt.verdict.category or prompt.topic
        status = 503 if prompt.reason and not category else 403  # the fail mode blocked it, not the model
        error = wire.GatewayError(
            status, end.reason or f"the prompt was blocked ({category})", type="content_filter",
            code="prompt_blocked", extra={"guard": {"action": "BLOCK", "category": category}},
        )  # fmt: skip
        return JSONResponse(error.body(), status_code=status)

    async def _events(self, first, responses, parsed: wire.OpenAIRequest, base: dict) -> AsyncIterator[bytes]:
        """OpenAI's stream: a role event, released text, the finish event (our verdict when
        interrupted), usage when asked, [DONE]. Closing it (the client went away) aborts upstream."""
        kind = parsed.kind
        outcome = "error"
        try:
            async with contextlib.aclosing(responses):
                if kind == wire.CHAT:
                    yield self._sse({**base, "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""},
                                                          "finish_reason": None}]})  # fmt: skip
                async for response in _chain(first, responses):
                    which = response.WhichOneof("kind")
                    if which == "chunk" and response.chunk.text:
                        yield self._sse(wire.text_event(base, kind, response.chunk.text))
                    elif which == "end":
                        end = response.end
                        if end.finish_reason == "upstream_error":
                            continue  # the error follows
                        reason, guard = self._finish(end, parsed.domain)
                        outcome = "interrupted" if guard else "passed"
                        yield self._sse(wire.finish_event(base, kind, reason, guard))
                        if parsed.include_usage:
                            yield self._sse({**base, "choices": [], "usage": self._usage(parsed, end)})
            yield DONE
        except (GeneratorExit, asyncio.CancelledError):  # the client went away: the generation is closed
            outcome = "client_gone"
            raise
        except Exception as exc:  # headers are out: the error goes as an event, as OpenAI does
            error = self._error(exc)
            outcome = ""
            yield self._sse(error.body()) + DONE
        finally:
            if outcome:
                self._count(outcome)

    async def _whole(self, first, responses, parsed: wire.OpenAIRequest, base: dict) -> JSONResponse:
        text, end = [], None
        async with contextlib.aclosing(responses):
            try:
                async for response in _chain(first, responses):
                    which = response.WhichOneof("kind")
                    if which == "chunk":
                        text.append(response.chunk.text)
                    elif which == "end":
                        end = response.end
            except Exception as exc:
                raise self._error(exc) from None
        reason, guard = self._finish(end, parsed.domain)
        choice = {"index": 0, "finish_reason": reason, "logprobs": None}
        if parsed.kind == wire.CHAT:
            choice["message"] = {"role": "assistant", "content": "".join(text)}
            obj = "chat.completion"
        else:
            choice["text"] = "".join(text)
            obj = "text_completion"
        body = {**base, "object": obj, "choices": [choice], "usage": self._usage(parsed, end)}
        if guard:
            body["guard"] = guard
        self._count("interrupted" if guard else "passed")
        return JSONResponse(body)

    @staticmethod
    def _finish(end: pb.GenerationEnd | None, domain: str) -> tuple[str, dict | None]:
        if end is None:
            raise wire.GatewayError(500, "the generation ended without its end", type="server_error")
        if end.finish_reason != "interrupted":
            return end.finish_reason or "stop", None
        guard = wire.interrupt_field(domain=domain, category=end.category, reason=end.reason,
                                     offset=end.offset if end.HasField("offset") else None,
                                     released_tokens=end.released_tokens)  # fmt: skip
        return "content_filter", guard

    @staticmethod
    def _usage(parsed: wire.OpenAIRequest, end: pb.GenerationEnd | None) -> dict:
        """Token counts: the prompt as the guard's tokenizer renders it, the completion as generated."""
        prompt = parsed.prompt_tokens
        completion = end.generated_tokens if end is not None else 0
        return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

    def _count(self, outcome: str) -> None:
        self.guard.metrics.gateway_requests.labels("openai", outcome).inc()

    @staticmethod
    def _sse(obj: dict) -> bytes:
        return encode(wire.dumps(obj))


async def _disconnected(http: Request) -> None:
    """Returns when the client has gone (ASGI ``http.disconnect``; the body is already read)."""
    while (await http.receive())["type"] != "http.disconnect":
        pass


async def _chain(first: pb.GenerateResponse, rest: AsyncIterator[pb.GenerateResponse]):
    yield first
    async for response in rest:
        yield response
