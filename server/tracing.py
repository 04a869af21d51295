"""OpenTelemetry traces, opt-in (``--otlp-endpoint``): one SERVER span per RPC, a child of the
gateway's trace when its context arrives in the metadata (W3C ``traceparent``), carrying what
the guard decided.

A span gets ``rpc.*`` attributes and the gRPC status; a response session's decisions become span
events (``qwen3guard.decision``: stage, action, category, token offset) and its end the span's
``qwen3guard.*`` attributes (domain, policy version, outcome, tokens judged, released and
withheld, tenant); a Judge call its judgment (risk, categories, action). The same facts as the
audit log, from the same place (guard/session/audit.py), and like it never the text.

The sidecar keeps its own tracer provider (no global state: several servers share a test
process) and exports in batches off the request path; spans of a sidecar without tracing are
the API's non-recording spans (nothing is built).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import grpc
from opentelemetry import context as otel_context
from opentelemetry import propagate, trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from guard.session.audit import AuditSink
from server.interception import around_handler

log = logging.getLogger(__name__)

__all__ = ["Tracing", "TracingInterceptor", "annotate", "span_sink"]

PREFIX = "qwen3guard."
_NOT_ATTRIBUTES = frozenset({"time", "kind", "text"})  # the text never leaves the process in a span


class Tracing:
    """The sidecar's tracer: OTLP/gRPC to ``endpoint``, or ``exporter`` (tests: in memory, exported
    as each span ends)."""

    def __init__(self, service_name: str, endpoint: str = "", exporter: Any = None) -> None:
        from opentelemetry.sdk.resources import Resource  # the SDK only when tracing is on
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor, SimpleSpanProcessor

        self.provider = TracerProvider(resource=Resource.create({"service.name": service_name}))
        if exporter is None:
            from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import OTLPSpanExporter

            insecure = endpoint.startswith("http://")
            self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=endpoint, insecure=insecure)))
        else:
            self.provider.add_span_processor(SimpleSpanProcessor(exporter))
        self.tracer = self.provider.get_tracer("qwen3guard-sidecar")

    def shutdown(self) -> None:
        """Export what is buffered and stop (the drain's last step)."""
        self.provider.shutdown()


def _status_of(context: grpc.aio.ServicerContext, exc: BaseException | None) -> grpc.StatusCode:
    code = None
    with contextlib.suppress(Exception):  # older grpcio: no code() on the aio context
        code = context.code()
    if isinstance(code, grpc.StatusCode):
        return code
    if isinstance(code, int):
        return next((c for c in grpc.StatusCode if c.value[0] == code), grpc.StatusCode.UNKNOWN)
    if exc is None:
        return grpc.StatusCode.OK
    cancelled = isinstance(exc, asyncio.CancelledError | GeneratorExit)  # the caller went away
    return grpc.StatusCode.CANCELLED if cancelled else grpc.StatusCode.UNKNOWN


class TracingInterceptor(grpc.aio.ServerInterceptor):
    """A SERVER span around every RPC (health checks excepted: probes every few seconds are noise)."""

    UNTRACED = frozenset({"grpc.health.v1.Health"})

    def __init__(self, tracing: Tracing) -> None:
        self.tracer = tracing.tracer

    async def intercept_service(
        self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails
    ) -> grpc.RpcMethodHandler | None:
        handler = await continuation(handler_call_details)
        full, _, method = handler_call_details.method.lstrip("/").partition("/")
        if handler is None or full in self.UNTRACED:
            return handler
        tracer = self.tracer

        @asynccontextmanager
        async def traced(context: grpc.aio.ServicerContext) -> AsyncIterator[None]:
            carrier = {key: value for key, value in (context.invocation_metadata() or ()) if isinstance(value, str)}
            attributes = {"rpc.system": "grpc", "rpc.service": full, "rpc.method": method}
            parent = propagate.extract(carrier)
            span = tracer.start_span(f"{full}/{method}", context=parent, kind=SpanKind.SERVER, attributes=attributes)
            # Current for the rest of this RPC's task (each RPC has its own), never detached: a
            # stream cancelled while grpc writes is closed later from another task, where a
            # detach would fail; the span still ends there.
            otel_context.attach(trace.set_span_in_context(span, parent))
            failure: BaseException | None = None
            try:
                yield
            except BaseException as exc:
                failure = exc
                raise
            finally:
                code = _status_of(context, failure)
                span.set_attribute("rpc.grpc.status_code", code.value[0])
                if code != grpc.StatusCode.OK:
                    span.set_status(Status(StatusCode.ERROR, code.name))
                span.end()

        return around_handler(handler, traced)


def _attributes(record: dict[str, Any]) -> dict[str, Any]:
    return {PREFIX + key: value for key, value in record.items()
            if key not in _NOT_ATTRIBUTES and value is not None and value != ""}  # fmt: skip


def span_sink() -> AuditSink | None:
    """A sink for audit records that annotates the current RPC's span (None when it is not recorded)."""
    span = trace.get_current_span()
    if not span.is_recording():
        return None

    def annotate_span(record: dict[str, Any]) -> None:
        if record.get("kind") == "end":
            span.set_attributes(_attributes(record))
        else:
            span.add_event(PREFIX + "decision", _attributes(record))

    return annotate_span


def annotate(**attributes: Any) -> None:
    """Set ``qwen3guard.<name>`` attributes on the current RPC's span (nothing when not traced)."""
    span = trace.get_current_span()
    if span.is_recording():
        span.set_attributes({PREFIX + k: v for k, v in attributes.items() if v is not None and v != ""})
