"""Prometheus metrics: the standard gRPC server metrics from our own aio interceptor, and the
guard's own (chunk latency, tokens judged, verdicts, actions, interrupts, sessions, batching).

Names follow go-grpc-prometheus / py-grpc-prometheus so existing dashboards work. Labels never
carry request ids or text. Each server gets its own registry (tests run several in one process).
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from typing import TYPE_CHECKING, Any
from wsgiref.simple_server import WSGIRequestHandler, make_server

import grpc
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, make_wsgi_app, start_http_server
from prometheus_client.exposition import ThreadingWSGIServer

from guard.model.engine import StepStats

if TYPE_CHECKING:
    from server.tls import CertificateWatcher

# Milliseconds matter on the per-token path; prometheus' defaults start at 5 ms.
LATENCY_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)


class Metrics:
    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        grpc_labels = ("grpc_type", "grpc_service", "grpc_method")
        self.started = Counter("grpc_server_started_total", "RPCs started on the server.", grpc_labels, registry=r)
        self.handled = Counter(
            "grpc_server_handled_total", "RPCs completed on the server.", (*grpc_labels, "grpc_code"), registry=r
        )
        self.handling = Histogram(
            "grpc_server_handling_seconds", "RPC handling time.", grpc_labels, buckets=LATENCY_BUCKETS, registry=r
        )
        self.msg_received = Counter(
            "grpc_server_msg_received_total", "Stream messages received.", grpc_labels, registry=r
        )
        self.msg_sent = Counter("grpc_server_msg_sent_total", "Stream messages sent.", grpc_labels, registry=r)

        self.chunk_seconds = Histogram(
            "guard_chunk_classify_seconds",
            "Chunk submitted to verdict, engine side.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.queue_seconds = Histogram(
            "guard_queue_wait_seconds",
            "Chunk wait before its first forward pass.",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.step_seconds = Histogram(
            "guard_step_seconds", "One batched forward pass.", buckets=LATENCY_BUCKETS, registry=r
        )
        self.batch_rows = Histogram(
            "guard_batch_sessions", "Sessions batched in one forward pass.", buckets=BATCH_BUCKETS, registry=r
        )
        self.batch_tokens = Histogram(
            "guard_batch_tokens", "Tokens in one forward pass.", buckets=(1, 4, 16, 64, 256, 1024, 4096), registry=r
        )
        self.tokens = Counter("guard_tokens_judged_total", "Response tokens judged.", registry=r)
        self.verdicts = Counter(
            "guard_verdicts_total", "Verdicts by stage, risk and category.", ("stage", "risk", "category"), registry=r
        )
        self._verdict_children: dict[tuple[str, str, str], Counter] = {}  # bounded: stages x levels x categories
        self.actions = Counter(
            "guard_actions_total",
            "Actions by stage, action and category.",
            ("stage", "action", "category"),
            registry=r,
        )
        self.interrupts = Counter(
            "guard_stream_interruptions_total", "Responses interrupted, by category.", ("category",), registry=r
        )
        self.live_sessions = Gauge("guard_live_sessions", "Moderation sessions open now.", registry=r)
        self.kv_cache_bytes = Gauge("guard_kv_cache_bytes", "KV cache memory held.", registry=r)
        self.fail_mode = Counter(
            "guard_fail_mode_total",
            "Model unavailable or too slow: the policy's fail mode applied.",
            ("domain", "mode", "stage"),
            registry=r,
        )
        self.policy_generation = Gauge("guard_policy_generation", "Accepted policy set changes.", registry=r)
        self.policy_domains = Gauge("guard_policy_domains", "Domains in the active policy set.", registry=r)
        self.policy_last_reload_ok = Gauge(
            "guard_policy_last_reload_ok", "1 if the last policy edit was accepted, 0 if rejected.", registry=r
        )
        self.policy_rejected = Counter("guard_policy_rejected_total", "Policy edits rejected as invalid.", registry=r)
        self.errors = Counter(
            "guard_stream_errors_total", "Streams ended by an error, by gRPC code.", ("code",), registry=r
        )

        self.topic_matches = Counter(
            "guard_topic_matches_total",
            "Prompts that fell under a policy topic (the Embedder), by domain, topic and action.",
            ("domain", "topic", "action"),
            registry=r,
        )
        # The retrieval services (Embedder, Reranker): `service` is one of those two names.
        self.retrieval_inputs = Counter(
            "guard_retrieval_inputs_total", "Inputs embedded or documents scored.", ("service",), registry=r
        )
        self.retrieval_tokens = Counter(
            "guard_retrieval_tokens_total", "Tokens the retrieval models read.", ("service",), registry=r
        )
        self.retrieval_padded_tokens = Counter(
            "guard_retrieval_padded_tokens_total",
            "Positions computed, padding included (padding waste = padded - tokens).",
            ("service",),
            registry=r,
        )
        self.retrieval_forward_seconds = Histogram(
            "guard_retrieval_forward_seconds",
            "One batched forward of a retrieval model.",
            ("service",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.retrieval_batch_sequences = Histogram(
            "guard_retrieval_batch_sequences",
            "Sequences computed together.",
            ("service",),
            buckets=BATCH_BUCKETS,
            registry=r,
        )
        self.retrieval_queue_seconds = Histogram(
            "guard_retrieval_queue_seconds",
            "Request received to its last batch started.",
            ("service",),
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

        self.reasoner_generations = Counter(
            "guard_reasoner_generations_total",
            "Reasoner generations ended, by backend and finish reason (stop, length, interrupted, blocked, ...).",
            ("backend", "finish_reason"),
            registry=r,
        )
        self.reasoner_tokens = Counter(
            "guard_reasoner_tokens_total",
            "Reasoner response tokens, by phase (reasoning, answer).",
            ("phase",),
            registry=r,
        )
        self.reasoner_budget_reached = Counter(
            "guard_reasoner_thinking_budget_reached_total", "Reasonings closed by the thinking budget.", registry=r
        )
        self.reasoner_steers = Counter(
            "guard_reasoner_steers_total", "Steers applied, by target kind (feature, strategy, vector).", ("kind",),
            registry=r,
        )  # fmt: skip
        self.reasoner_memory_calls = Counter(
            "guard_reasoner_memory_calls_total", "Memory-agent calls (one per document chunk).", registry=r
        )

        self.parscale_batch_requests = Histogram(
            "guard_parscale_batch_requests", "Requests sharing one ParScale forward pass.", buckets=BATCH_BUCKETS,
            registry=r,
        )  # fmt: skip
        self.parscale_tokens = Counter(
            "guard_parscale_tokens_total",
            "ParScale tokens: through forward passes (forward), and continuation tokens scored (scored).",
            ("kind",),
            registry=r,
        )
        self.parscale_kv_bytes = Gauge("guard_parscale_kv_cache_bytes", "ParScale KV cache memory held.", registry=r)
        self.audit_records = Counter(
            "guard_audit_records_total", "Audit records written, by kind (decision, end).", ("kind",), registry=r
        )
        self.audit_failures = Counter(
            "guard_audit_write_failures_total", "Audit records that could not be written (counted, never silent).",
            registry=r,
        )  # fmt: skip
        self.tls_reloads = Counter(
            "guard_tls_reloads_total",
            "Certificate rotations noticed on disk: ok (in use from the next handshake) or failed (the "
            "previous certificate stays in use; alert on this).",
            ("outcome",),
            registry=r,
        )
        self.tenant_requests = Counter(
            "guard_tenant_requests_total",
            "Calls by tenant (from the tenants file; 'unknown' when unauthenticated) and outcome: allowed, "
            "unauthenticated, denied (service or admin-only), rate_limited (max_streams).",
            ("tenant", "outcome"),
            registry=r,
        )
        self.tenant_open_calls = Gauge(
            "guard_tenant_open_calls", "Calls open now, by tenant (its max_streams limit applies).", ("tenant",),
            registry=r,
        )  # fmt: skip
        self.tenants_reload_ok = Gauge(
            "guard_tenants_last_reload_ok", "1 when the tenants file in force is the file on disk, 0 after a "
            "rejected edit (the previous tenants stay active).", registry=r,
        )  # fmt: skip
        self.tenants_reload_ok.set(1)  # no tenants file: nothing was rejected
        self.gateway_requests = Counter(
            "guard_gateway_requests_total",
            "Requests through a gateway front end (ext_proc, openai) by how they ended: passed, blocked, "
            "interrupted, redacted, rejected (bad request), failed_open, failed_closed, client_gone (the "
            "caller hung up; the generation was cancelled), error.",
            ("gateway", "outcome"),
            registry=r,
        )
        self.gateway_hold_seconds = Histogram(
            "guard_gateway_hold_seconds",
            "How long a response body chunk is held for judging before it goes on (ext_proc).",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )

    def on_parscale_step(self, requests: int, tokens: int, kv_bytes: int) -> None:
        """The ParScale engine's per-forward hook (called on its worker thread)."""
        self.parscale_batch_requests.observe(requests)
        self.parscale_tokens.labels("forward").inc(tokens)
        self.parscale_kv_bytes.set(kv_bytes)

    def on_retrieval_batch(self, service: str) -> Callable[[Any, float], None]:
        """A retrieval model's per-forward hook (called on its batcher's thread)."""
        padded = self.retrieval_padded_tokens.labels(service)
        seconds = self.retrieval_forward_seconds.labels(service)
        sequences = self.retrieval_batch_sequences.labels(service)

        def observe(stats: Any, elapsed: float) -> None:
            padded.inc(stats.padded_tokens)
            seconds.observe(elapsed)
            sequences.observe(stats.sequences)

        return observe

    def verdict_counter(self, stage: str, risk: str, category: str) -> Counter:
        """The verdicts counter's child for these labels, looked up once (``labels()`` is not free
        and runs for every chunk)."""
        key = (stage, risk, category)
        child = self._verdict_children.get(key)
        if child is None:
            child = self._verdict_children[key] = self.verdicts.labels(stage, risk, category)
        return child

    def on_step(self, stats: StepStats) -> None:
        """Engine hook, called on the engine thread after each forward pass."""
        self.step_seconds.observe(stats.compute_s)
        self.batch_rows.observe(stats.rows)
        self.batch_tokens.observe(stats.tokens)
        self.kv_cache_bytes.set(stats.kv_bytes)

    def on_policy_change(self, store: Any) -> None:
        """PolicyStore hook: the active generation, and whether the last edit was accepted."""
        self.policy_generation.set(store.version)
        self.policy_domains.set(len(store.policies))
        self.policy_last_reload_ok.set(0 if store.last_error else 1)
        if store.last_error:
            self.policy_rejected.inc()

    def include(self, registry: CollectorRegistry) -> None:
        """Also expose another registry's metrics (vLLM's, when it runs in this process)."""

        class _Forward:
            def collect(self):
                yield from registry.collect()

        self.registry.register(_Forward())

    def serve_http(self, port: int, tls: CertificateWatcher | None = None) -> Any:
        """``/metrics`` on ``port`` from a thread (scrapes never wait for the event loop); over TLS
        (mTLS with a client CA) with the listeners' certificate when ``tls`` is given."""
        if tls is None:
            server, _thread = start_http_server(port, registry=self.registry)
            return server
        server = make_server("0.0.0.0", port, make_wsgi_app(self.registry), _TlsWSGIServer, _QuietTlsHandler)
        # The handshake runs on the first read, in the request's own thread: a client that never
        # finishes it holds one thread until the handler's timeout, never the accept loop.
        server.socket = tls.ssl_context().wrap_socket(server.socket, server_side=True, do_handshake_on_connect=False)
        threading.Thread(target=server.serve_forever, name="metrics-https", daemon=True).start()
        return server


class _TlsWSGIServer(ThreadingWSGIServer):
    def handle_error(self, request: Any, client_address: Any) -> None:
        """A failed handshake (no client certificate, plaintext, an unknown CA) is the client's
        problem: one debug line, not a traceback on stderr per scrape attempt."""
        logging.getLogger(__name__).debug("event=metrics_connection_failed error=%r", sys.exc_info()[1])


class _QuietTlsHandler(WSGIRequestHandler):
    timeout = 10.0  # seconds a connection may take for its handshake and request

    def log_message(self, format: str, *args: Any) -> None:  # scrapes are not worth a log line
        pass


def _split_method(full: str) -> tuple[str, str]:
    _, service, method = full.split("/", 2)
    return service, method


class MetricsInterceptor(grpc.aio.ServerInterceptor):
    """grpc.aio server interceptor recording the standard gRPC server metrics."""

    def __init__(self, metrics: Metrics) -> None:
        self.m = metrics

    async def intercept_service(self, continuation: Callable, handler_call_details: grpc.HandlerCallDetails):
        handler = await continuation(handler_call_details)
        if handler is None:
            return None
        service, method = _split_method(handler_call_details.method)
        if handler.request_streaming and handler.response_streaming:
            kind, behavior = "bidi_stream", handler.stream_stream
        elif handler.request_streaming:
            kind, behavior = "client_stream", handler.stream_unary
        elif handler.response_streaming:
            kind, behavior = "server_stream", handler.unary_stream
        else:
            kind, behavior = "unary", handler.unary_unary
        if not (inspect.iscoroutinefunction(behavior) or inspect.isasyncgenfunction(behavior)):
            return handler  # synchronous handlers are not wrapped (none are registered here)
        labels = (kind, service, method)
        m = self.m
        received, sent = m.msg_received.labels(*labels), m.msg_sent.labels(*labels)  # once, not per message

        def finish(context: grpc.aio.ServicerContext, started: float, error: BaseException | None) -> None:
            code = context.code() if hasattr(context, "code") else None
            if code is None:
                code = grpc.StatusCode.OK if error is None else grpc.StatusCode.UNKNOWN
            if isinstance(error, asyncio.CancelledError):
                code = grpc.StatusCode.CANCELLED
            name = code.name if isinstance(code, grpc.StatusCode) else str(code)
            m.handled.labels(*labels, name).inc()
            m.handling.labels(*labels).observe(time.perf_counter() - started)

        async def count_requests(iterator: AsyncIterator) -> AsyncIterator:
            async for item in iterator:
                received.inc()
                yield item

        def begin(request_or_iterator):
            """Count the start (and the request of a unary-request call); wrap a request stream."""
            m.started.labels(*labels).inc()
            if handler.request_streaming:
                return count_requests(request_or_iterator), time.perf_counter()
            received.inc()
            return request_or_iterator, time.perf_counter()

        if handler.response_streaming:

            async def streaming(request_or_iterator, context):
                request_or_iterator, started = begin(request_or_iterator)
                error = None
                try:
                    async for response in behavior(request_or_iterator, context):
                        sent.inc()
                        yield response
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    finish(context, started, error)

            wrapped = streaming
        else:

            async def unary(request_or_iterator, context):
                request_or_iterator, started = begin(request_or_iterator)
                error = None
                try:
                    response = await behavior(request_or_iterator, context)
                    sent.inc()
                    return response
                except BaseException as exc:
                    error = exc
                    raise
                finally:
                    finish(context, started, error)

            wrapped = unary

        factory = {
            "bidi_stream": grpc.stream_stream_rpc_method_handler,
            "client_stream": grpc.stream_unary_rpc_method_handler,
            "server_stream": grpc.unary_stream_rpc_method_handler,
            "unary": grpc.unary_unary_rpc_method_handler,
        }[kind]
        return factory(
            wrapped,
            request_deserializer=handler.request_deserializer,
            response_serializer=handler.response_serializer,
        )
