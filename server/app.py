"""Build and run the sidecar: grpc.aio server, services, health, reflection, metrics, drain.

Start-up order: listen with health NOT_SERVING, load the model in a worker thread (RPCs get
UNAVAILABLE meanwhile), then SERVING. On SIGTERM/SIGINT: health NOT_SERVING, new streams get
UNAVAILABLE, open streams may finish within the grace period, then the engine stops; exit 0.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import sys
from dataclasses import dataclass

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from guard.policy_loader import PolicyError, PolicyStore
from guard.runtime import load_runtime
from server.guarded_generation import GuardedGenerationService
from server.judge_service import JudgeBackend, JudgeHolder, JudgeService
from server.metrics import Metrics, MetricsInterceptor
from server.policies_service import PoliciesService
from server.qwen3guard.v1 import guard_pb2, guard_pb2_grpc
from server.settings import ServeSettings
from server.stream_guard import RuntimeHolder, StreamGuardService

log = logging.getLogger(__name__)

SERVICE_NAMES = tuple(guard_pb2.DESCRIPTOR.services_by_name[n].full_name for n in ("StreamGuard", "Judge", "Policies"))


def load_judge(settings: ServeSettings) -> JudgeBackend | None:
    """The configured Generative judge: an endpoint, a checkpoint, the demo, or none."""
    if settings.judge_endpoint:
        from guard.judge_remote import RemoteJudge

        return JudgeBackend(
            remote=RemoteJudge(
                settings.judge_endpoint,
                model=settings.judge_model or None,
                retries=settings.judge_retries,
                concurrency=settings.judge_concurrency,
            )
        )
    if not settings.judge:
        return None
    from guard.judge_local import LocalJudge
    from guard.runtime import parse_dtype

    if settings.judge == "demo":
        from guard.demo_judge import demo_judge_dir

        path = demo_judge_dir()
    else:
        path = settings.judge
    local = LocalJudge(
        path,
        device=settings.device,
        dtype=parse_dtype(settings.dtype),
        max_batch=settings.judge_max_batch,
        wait_ms=settings.judge_wait_ms,
    )
    if local.demo:
        log.warning("event=demo_judge notice=%r", local.demo.get("notice"))
    return JudgeBackend(local=local)


@dataclass
class Sidecar:
    server: grpc.aio.Server
    port: int
    holder: RuntimeHolder
    health: health.aio.HealthServicer
    metrics: Metrics
    settings: ServeSettings
    policies: PolicyStore
    judge: JudgeHolder
    upstream: object | None = None

    async def set_serving(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    async def load(self) -> None:
        """Load the model off the event loop, then report SERVING."""
        s = self.settings
        runtime = await asyncio.to_thread(
            load_runtime,
            s.model,
            device=s.device,
            dtype=s.dtype,
            limits=s.engine_limits(),
            on_step=self.metrics.on_step,
        )
        self.holder.runtime = runtime
        self.judge.backend = await asyncio.to_thread(load_judge, s)
        log.info(
            "event=ready model=%r demo=%s judge=%s",
            runtime.description,
            runtime.is_demo,
            s.judge_endpoint or s.judge or "none",
        )
        await self.set_serving(True)

    async def drain(self, grace: float | None = None) -> None:
        """Stop accepting, let open streams finish within the grace period, stop the engine."""
        grace = self.settings.grace_period_s if grace is None else grace
        log.info("event=draining grace_s=%s", grace)
        self.holder.draining = True
        await self.health.enter_graceful_shutdown()
        self.policies.stop()
        await self.server.stop(grace)
        if self.holder.runtime is not None:
            await asyncio.to_thread(self.holder.runtime.close)
        if self.judge.backend is not None:
            await self.judge.backend.close()
        if self.upstream is not None:
            await self.upstream.close()
        log.info("event=stopped")


def build_upstream(settings: ServeSettings):
    """The configured upstream engine for GuardedGeneration, or None (one of the three at most)."""
    chosen = [name for name in ("upstream_url", "upstream_grpc", "upstream_engine") if getattr(settings, name)]
    if len(chosen) > 1:
        raise ValueError(f"configure one upstream, not {' and '.join(chosen)}")
    if settings.upstream_engine:
        if settings.upstream_engine != "async-llm":
            raise ValueError(f"--upstream-engine must be 'async-llm', got {settings.upstream_engine!r}")
        if not settings.upstream_model:
            raise ValueError("--upstream-engine async-llm needs --upstream-model (the model directory)")
        from server.upstream_async_llm import AsyncLlmUpstream

        return AsyncLlmUpstream.from_model(
            settings.upstream_model,
            gpu_memory_utilization=settings.upstream_gpu_memory_utilization,
            max_model_len=settings.upstream_max_model_len or None,
            dtype="auto" if settings.device == "cpu" else settings.dtype,
        )
    if settings.upstream_grpc:
        from server.upstream import VllmGrpcUpstream

        return VllmGrpcUpstream(settings.upstream_grpc)
    if settings.upstream_url:
        from server.upstream import VllmHttpUpstream

        return VllmHttpUpstream(settings.upstream_url, model=settings.upstream_model or None)
    return None


async def start_sidecar(settings: ServeSettings, *, load: bool = True) -> Sidecar:
    """Start listening (health NOT_SERVING) and, if ``load``, load the model.

    Invalid policies stop the start-up (PolicyError): a sidecar never starts with a broken policy.
    """
    metrics = Metrics()
    policies = PolicyStore(settings.policy_dir(), settings.default_domain, on_change=metrics.on_policy_change)
    metrics.on_policy_change(policies)
    if settings.policy_dir() is not None and settings.policy_poll_s > 0:
        policies.watch(settings.policy_poll_s)
    server = grpc.aio.server(
        interceptors=[MetricsInterceptor(metrics)],
        options=[("grpc.max_receive_message_length", 8 * 2**20), ("grpc.so_reuseport", 0)],
    )
    holder = RuntimeHolder()
    stream_guard = StreamGuardService(holder, settings, metrics, policies)
    guard_pb2_grpc.add_StreamGuardServicer_to_server(stream_guard, server)
    upstream = build_upstream(settings)
    if getattr(upstream, "name", "") == "async-llm":  # vLLM's own metrics live in this process
        import prometheus_client

        metrics.include(prometheus_client.REGISTRY)
    guarded = GuardedGenerationService(stream_guard, upstream, settings.upstream_input_path)
    guard_pb2_grpc.add_GuardedGenerationServicer_to_server(guarded, server)
    guard_pb2_grpc.add_PoliciesServicer_to_server(PoliciesService(policies), server)
    judge = JudgeHolder()
    guard_pb2_grpc.add_JudgeServicer_to_server(JudgeService(judge, policies, metrics), server)
    health_servicer = health.aio.HealthServicer()
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)
    reflection.enable_server_reflection((*SERVICE_NAMES, health.SERVICE_NAME, reflection.SERVICE_NAME), server)
    port = server.add_insecure_port(settings.address)
    if port == 0:
        raise OSError(f"cannot listen on {settings.address}")
    sidecar = Sidecar(server, port, holder, health_servicer, metrics, settings, policies, judge, upstream)
    await sidecar.set_serving(False)
    await server.start()
    log.info("event=listening address=%s port=%d", settings.address, port)
    if load:
        await sidecar.load()
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
    if settings.metrics_port:
        sidecar.metrics.serve_http(settings.metrics_port)
        log.info("event=metrics port=%d", settings.metrics_port)
    loader = asyncio.create_task(sidecar.load())
    waiter = asyncio.create_task(stop.wait())
    done, _ = await asyncio.wait({loader, waiter}, return_when=asyncio.FIRST_COMPLETED)
    if loader in done and loader.exception() is not None:
        log.error("event=load_failed error=%s", loader.exception())
        await sidecar.drain(0)
        return 1
    await stop.wait()
    loader.cancel()
    await sidecar.drain()
    return 0
