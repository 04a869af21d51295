"""The built-in services, each registered like a plug-in (see server/registry.py).

Order matters only where one service builds on another: GuardedGeneration drives the stream
sessions of StreamGuard (its runtime, policies and metrics), so StreamGuard comes first.
"""

from __future__ import annotations

import asyncio
import logging

from server.qwen3guard.v1 import guard_pb2, guard_pb2_grpc
from server.registry import HostedService, ServiceContext, ServiceSpec
from server.settings import ServeSettings

log = logging.getLogger(__name__)


def _full_name(service: str) -> str:
    return guard_pb2.DESCRIPTOR.services_by_name[service].full_name


def _stream_guard(ctx: ServiceContext) -> HostedService:
    from guard.runtime import configure_torch_threads, load_runtime
    from server.stream_guard import RuntimeHolder, StreamGuardService

    holder = RuntimeHolder()
    service = StreamGuardService(holder, ctx.settings, ctx.metrics, ctx.policies)
    s = ctx.settings

    async def load() -> None:
        threads = configure_torch_threads(s.torch_threads)
        log.info("event=torch_threads threads=%d", threads)
        holder.runtime = await asyncio.to_thread(
            load_runtime, s.model, device=s.device, dtype=s.dtype, limits=s.engine_limits(), on_step=ctx.metrics.on_step
        )
        log.info("event=model_loaded model=%r demo=%s", holder.runtime.description, holder.runtime.is_demo)

    async def close() -> None:
        holder.draining = True
        if holder.runtime is not None:
            await asyncio.to_thread(holder.runtime.close)

    return HostedService(
        add_to_server=lambda server: guard_pb2_grpc.add_StreamGuardServicer_to_server(service, server),
        service_names=(_full_name("StreamGuard"),),
        load=load,
        close=close,
        state=service,
    )


def _guarded_generation(ctx: ServiceContext) -> HostedService:
    from server.guarded_generation import GuardedGenerationService
    from server.upstream_factory import build_upstream

    upstream = build_upstream(ctx.settings)
    if getattr(upstream, "name", "") == "async-llm":  # vLLM's own metrics live in this process
        import prometheus_client

        ctx.metrics.include(prometheus_client.REGISTRY)
    service = GuardedGenerationService(ctx.built["StreamGuard"].state, upstream, ctx.settings.upstream_input_path)

    async def close() -> None:
        if upstream is not None:
            await upstream.close()

    return HostedService(
        add_to_server=lambda server: guard_pb2_grpc.add_GuardedGenerationServicer_to_server(service, server),
        service_names=(_full_name("GuardedGeneration"),),
        close=close,
        state=service,
        available=upstream is not None,
    )


def _policies(ctx: ServiceContext) -> HostedService:
    from server.policies_service import PoliciesService

    service = PoliciesService(ctx.policies)
    return HostedService(
        add_to_server=lambda server: guard_pb2_grpc.add_PoliciesServicer_to_server(service, server),
        service_names=(_full_name("Policies"),),
        state=service,
    )


def _judge(ctx: ServiceContext) -> HostedService:
    from server.judge_factory import load_judge
    from server.judge_service import JudgeHolder, JudgeService

    holder = JudgeHolder()
    service = JudgeService(holder, ctx.policies, ctx.metrics)

    async def load() -> None:
        holder.backend = await asyncio.to_thread(load_judge, ctx.settings)
        log.info("event=judge_loaded judge=%s", ctx.settings.judge_endpoint or ctx.settings.judge or "none")

    async def close() -> None:
        if holder.backend is not None:
            await holder.backend.close()

    return HostedService(
        add_to_server=lambda server: guard_pb2_grpc.add_JudgeServicer_to_server(service, server),
        service_names=(_full_name("Judge"),),
        load=load,
        close=close,
        state=holder,
    )


def _settings_fields(prefix: str) -> tuple[str, ...]:
    from dataclasses import fields

    return tuple(f.name for f in fields(ServeSettings) if f.name.startswith(prefix))


BUILTIN_SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec(
        "StreamGuard",
        _stream_guard,
        settings_fields=("model", "device", "dtype", "torch_threads", *_settings_fields("max_"), "idle_timeout_s"),
        description="per-token moderation of response streams (Stream Qwen3Guard)",
    ),
    ServiceSpec(
        "GuardedGeneration",
        _guarded_generation,
        settings_fields=_settings_fields("upstream_"),
        description="generation through the upstream vLLM, moderated, aborted on interrupt",
    ),
    ServiceSpec(
        "Policies",
        _policies,
        settings_fields=("policies", "default_domain", "policy_poll_s"),
        description="the per-domain policies: list, get, evaluate, reload",
    ),
    ServiceSpec(
        "Judge",
        _judge,
        settings_fields=_settings_fields("judge"),
        description="Generative Qwen3Guard judgments of prompts and responses",
    ),
)


def builtin_service_names() -> tuple[str, ...]:
    """Full proto names of the built-in services (their health and reflection names)."""
    return tuple(_full_name(spec.name) for spec in BUILTIN_SERVICES)
