"""Build and run the sidecar: grpc.aio server, the registered services, health, reflection,
metrics, drain. Which services run comes from the registry (server/registry.py); this module
never names one.

Start-up order: listen with health NOT_SERVING, load each service in turn off the event loop
(RPCs get UNAVAILABLE meanwhile; each service's health name turns SERVING once it is loaded),
then the whole server SERVING. On SIGTERM/SIGINT: health NOT_SERVING, new streams get
UNAVAILABLE, open streams may finish within the grace period, then the engine stops; exit 0.
"""

from __future__ import annotations

import asyncio
import gc
import logging
import signal
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from guard.policy.loader import PolicyError, PolicyStore
from server.audit import HEALTH_NAME as AUDIT_HEALTH
from server.audit import AuditLog
from server.auth import AuthInterceptor, Authorizer
from server.metrics import Metrics, MetricsInterceptor
from server.registry import HostedService, ServiceContext, ServiceLoadError, ServiceSpec, all_specs
from server.settings import ServeSettings
from server.stream_guard import RuntimeHolder
from server.tenants import TenantError, TenantStore
from server.tls import CertificateWatcher, TlsError
from server.upstream_factory import build_upstream
from server.wire_errors import WireErrorsInterceptor

__all__ = ["Sidecar", "build_upstream", "serve", "start_sidecar"]

log = logging.getLogger(__name__)


@dataclass
class Sidecar:
    server: grpc.aio.Server
    port: int
    health: health.aio.HealthServicer
    metrics: Metrics
    settings: ServeSettings
    policies: PolicyStore
    services: list[tuple[ServiceSpec, HostedService]] = field(default_factory=list)
    audit: AuditLog | None = None
    tls: CertificateWatcher | None = None  # the listeners' certificate (None: plaintext)
    authorizer: Authorizer | None = None  # tenants (None: open)
    health_server: grpc.aio.Server | None = None  # plaintext grpc.health.v1 only (--health-port)
    health_port: int = 0
    tracing: Any = None  # server.tracing.Tracing when --otlp-endpoint is set

    def service(self, name: str) -> HostedService:
        for spec, hosted in self.services:
            if spec.name == name:
                return hosted
        raise KeyError(f"no service {name!r} is served (served: {', '.join(s.name for s, _ in self.services)})")

    @property
    def holder(self) -> RuntimeHolder:
        """The stream model's holder (StreamGuard)."""
        return self.service("StreamGuard").state.holder

    @property
    def upstream(self):
        """GuardedGeneration's upstream engine adapter (None when none is configured)."""
        return self.service("GuardedGeneration").state.upstream

    @property
    def service_names(self) -> tuple[str, ...]:
        return tuple(name for _, hosted in self.services for name in hosted.service_names)

    async def _set_health(self, names: tuple[str, ...], serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in names:
            await self.health.set(name, status)

    async def set_serving(self, serving: bool) -> None:
        await self._set_health(("", *self.service_names), serving)
        if serving:
            for _, hosted in self.services:
                if not hosted.available:
                    await self._set_health(hosted.service_names, False)

    async def load(self) -> None:
        """Load each service off the event loop, in order; each reports SERVING once loaded, the
        whole server ("") once all are. A failure stops the start-up with the service's name."""
        for spec, hosted in self.services:
            if hosted.load is not None:
                try:
                    await hosted.load()
                except Exception as exc:
                    raise ServiceLoadError(spec.name, exc) from exc
            await self._set_health(hosted.service_names, hosted.available)
        # Everything loaded so far (torch, the models, the tokenizers: hundreds of thousands of
        # objects) lives as long as the process: out of the collector's sight, a full collection
        # no longer walks it between two chunks.
        gc.collect()
        gc.freeze()
        log.info(
            "event=ready services=%s frozen_objects=%d",
            ",".join(spec.name for spec, _ in self.services),
            gc.get_freeze_count(),
        )
        await self._set_health(("",), True)

    async def drain(self, grace: float | None = None) -> None:
        """Stop accepting, let open streams finish within the grace period, close every service."""
        grace = self.settings.grace_period_s if grace is None else grace
        log.info("event=draining grace_s=%s", grace)
        self.holder.draining = True
        await self.health.enter_graceful_shutdown()
        self.policies.stop()
        if self.authorizer is not None:
            self.authorizer.store.stop()
        await self.server.stop(grace)
        if self.health_server is not None:  # probes see NOT_SERVING until the very end of the drain
            await self.health_server.stop(0)
        for spec, hosted in reversed(self.services):
            if hosted.close is not None:
                try:
                    await hosted.close()
                except Exception:
                    log.exception("event=service_close_failed service=%s", spec.name)
        if self.audit is not None:
            self.audit.close()
        if self.tracing is not None:
            self.tracing.shutdown()
        log.info("event=stopped")


async def start_sidecar(settings: ServeSettings, *, load: bool = True, span_exporter: Any = None) -> Sidecar:
    """Start listening (health NOT_SERVING) and, if ``load``, load every service. ``span_exporter``
    (an OpenTelemetry SpanExporter) turns tracing on without an OTLP endpoint (tests, embedding).

    Invalid policies stop the start-up (PolicyError): a sidecar never starts with a broken policy.
    A service that fails to build or load stops it too (ServiceLoadError names the service).
    """
    metrics = Metrics()
    policies = PolicyStore(
        settings.policy_dir(),
        settings.default_domain,
        on_change=metrics.on_policy_change,
        topics_available=bool(settings.embedder),
    )
    metrics.on_policy_change(policies)
    tls_files = settings.tls_files()
    tls = None
    if tls_files is not None:
        tls = CertificateWatcher(tls_files, on_reload=lambda _: metrics.tls_reloads.labels("ok").inc(),
                                 on_error=lambda _: metrics.tls_reloads.labels("failed").inc())  # fmt: skip
    authorizer = None
    if settings.tenants:

        def reloaded(store: TenantStore) -> None:
            metrics.tenants_reload_ok.set(0 if store.last_error else 1)

        tenants = TenantStore(Path(settings.tenants), [spec.name for spec in all_specs()], on_change=reloaded)
        authorizer = Authorizer(tenants, metrics)
        policies.access_check = Authorizer.check_domain
    else:
        log.warning("event=auth_off notice='no --tenants file: the sidecar is open; anyone who reaches its ports "
                    "may use any domain and reload policies'")  # fmt: skip
    tracing = None
    if settings.otlp_endpoint or span_exporter is not None:
        from server.tracing import Tracing, TracingInterceptor

        tracing = Tracing(settings.otel_service_name, settings.otlp_endpoint, span_exporter)
    interceptors: list[grpc.aio.ServerInterceptor] = [] if tracing is None else [TracingInterceptor(tracing)]
    interceptors.append(MetricsInterceptor(metrics))
    if authorizer is not None:
        interceptors.append(AuthInterceptor(authorizer))  # before the request bytes are even decoded
    interceptors.append(WireErrorsInterceptor())
    server = grpc.aio.server(interceptors=interceptors, options=settings.server_options())
    audit = None
    if settings.audit_log:
        audit = AuditLog(settings.audit_log, metrics, max_bytes=settings.audit_max_bytes,
                         backups=settings.audit_backups, log_content=settings.log_content)  # fmt: skip
    context = ServiceContext(settings, metrics, policies, audit=audit, tls=tls, authorizer=authorizer)
    hosted_services = []
    for spec in all_specs():
        if not spec.enabled(settings):
            continue
        try:
            hosted = spec.build(context)
        except Exception as exc:
            raise ServiceLoadError(spec.name, exc) from exc
        context.built[spec.name] = hosted
        hosted.add_to_server(server)
        hosted_services.append((spec, hosted))
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    names = tuple(name for _, hosted in hosted_services for name in hosted.service_names)
    if settings.reflection:
        reflection.enable_server_reflection((*names, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    if tls is not None:
        port = server.add_secure_port(settings.address, tls.grpc_credentials())
    else:
        port = server.add_insecure_port(settings.address)
    if port == 0:
        raise OSError(f"cannot listen on {settings.address}")
    sidecar = Sidecar(server, port, health_servicer, metrics, settings, policies, hosted_services, audit, tls,
                      authorizer, tracing=tracing)  # fmt: skip
    await sidecar.set_serving(False)
    if settings.health_port:
        # The kubelet's gRPC probes speak plaintext only: with TLS on the main port they probe this
        # one, which serves nothing but the health service (same statuses, same drain).
        sidecar.health_server = grpc.aio.server(options=settings.server_options())
        health_pb2_grpc.add_HealthServicer_to_server(health_servicer, sidecar.health_server)
        host = settings.address.rsplit(":", 1)[0]
        sidecar.health_port = sidecar.health_server.add_insecure_port(f"{host}:{settings.health_port}")
        await sidecar.health_server.start()
    if audit is not None:  # a failing audit log turns its own health name NOT_SERVING (degraded)
        loop = asyncio.get_running_loop()
        await health_servicer.set(AUDIT_HEALTH, health_pb2.HealthCheckResponse.SERVING)

        def audit_health(ok: bool) -> None:  # on the audit writer's thread
            status = health_pb2.HealthCheckResponse.SERVING if ok else health_pb2.HealthCheckResponse.NOT_SERVING
            loop.call_soon_threadsafe(lambda: loop.create_task(health_servicer.set(AUDIT_HEALTH, status)))

        audit.on_health = audit_health
    if settings.policy_dir() is not None and settings.policy_poll_s > 0:
        policies.watch(settings.policy_poll_s)
    if authorizer is not None and settings.tenants_poll_s > 0:
        authorizer.store.watch(settings.tenants_poll_s)
    await server.start()
    transport = "plaintext" if tls is None else ("mtls" if tls.files.mutual else "tls")
    log.info("event=listening address=%s port=%d transport=%s services=%s", settings.address, port, transport,
             ",".join(names))  # fmt: skip
    if load:
        try:
            await sidecar.load()
        except BaseException:
            await sidecar.drain(0)
            raise
    return sidecar


async def serve(settings: ServeSettings) -> int:
    """Run until SIGTERM/SIGINT, then drain; the process exit code."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    try:
        sidecar = await start_sidecar(settings, load=False)
    except PolicyError as exc:
        log.error("event=policy_invalid errors=%r", str(exc))
        print(f"guard: error: invalid policies:\n{exc}", file=sys.stderr)
        return 1
    except (TlsError, TenantError) as exc:
        log.error("event=start_refused error=%r", str(exc))
        print(f"guard: error: {exc}", file=sys.stderr)
        return 1
    except ServiceLoadError as exc:
        log.error("event=service_failed service=%s error=%r", exc.service, str(exc))
        print(f"guard: error: {exc}", file=sys.stderr)
        return 1
    if settings.metrics_port:
        sidecar.metrics.serve_http(settings.metrics_port, tls=sidecar.tls)
        log.info("event=metrics port=%d", settings.metrics_port)
    loader = asyncio.create_task(sidecar.load())
    waiter = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({loader, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if loader in done and loader.exception() is not None:
        error = loader.exception()
        log.error("event=load_failed error=%s", error)
        print(f"guard: error: {error}", file=sys.stderr)
        await sidecar.drain(0)
        return 1
    await stop.wait()
    loader.cancel()
    await sidecar.drain()
    return 0
