"""The built-in services, each registered like a plug-in (see server/registry.py).

Order matters only where one service builds on another: the Embedder comes first (the policies'
topics use it from StreamGuard, GuardedGeneration and Policies), and GuardedGeneration drives the
stream sessions of StreamGuard (its runtime, policies and metrics), so StreamGuard precedes it.
"""

from __future__ import annotations

import asyncio
import logging

from server.qwen3guard.embedding.v1 import embedding_pb2
from server.qwen3guard.parscale.v1 import parscale_pb2
from server.qwen3guard.reasoning.v1 import reasoning_pb2
from server.qwen3guard.rerank.v1 import rerank_pb2
from server.qwen3guard.v1 import guard_pb2, guard_pb2_grpc
from server.registry import HostedService, ServiceContext, ServiceSpec
from server.settings import ServeSettings

log = logging.getLogger(__name__)


def _full_name(service: str) -> str:
    """The full proto name of a built-in service (its health and reflection name)."""
    for proto in (guard_pb2, embedding_pb2, rerank_pb2, reasoning_pb2, parscale_pb2):
        if service in proto.DESCRIPTOR.services_by_name:
            return proto.DESCRIPTOR.services_by_name[service].full_name
    if service == "ExternalProcessor":  # Envoy's (xds-protos), imported only when asked for
        from envoy.service.ext_proc.v3 import external_processor_pb2

        return external_processor_pb2.DESCRIPTOR.services_by_name[service].full_name
    raise KeyError(f"no proto declares a service {service!r}")


def _topic_matcher(ctx: ServiceContext):
    """The policies' topic matcher over the Embedder (built before the guard services), or None."""
    if "Embedder" not in ctx.built:
        return None
    if "topics" not in ctx.built["Embedder"].extras:
        from guard.policy.topics import TopicMatcher
        from server.embedding_service import topic_embedder

        ctx.built["Embedder"].extras["topics"] = TopicMatcher(topic_embedder(ctx.built["Embedder"].state))
    return ctx.built["Embedder"].extras["topics"]


def _stream_guard(ctx: ServiceContext) -> HostedService:
    from guard.runtime import configure_torch_threads, load_runtime
    from server.stream_guard import RuntimeHolder, StreamGuardService

    holder = RuntimeHolder()
    service = StreamGuardService(holder, ctx.settings, ctx.metrics, ctx.policies, _topic_matcher(ctx), ctx.audit)
    s = ctx.settings

    async def load() -> None:
        threads = configure_torch_threads(s.torch_threads)
        log.info("event=torch_threads threads=%d", threads)
        holder.runtime = await asyncio.to_thread(
            load_runtime, s.model, device=s.device, dtype=s.dtype, limits=s.engine_limits(), on_step=ctx.metrics.on_step
        )
        log.info("event=model_loaded model=%r demo=%s", holder.runtime.description, holder.runtime.is_demo)
        if ctx.audit is not None:  # the checkpoint's digest, for the audit records: hashed once, off the loop
            digest = await asyncio.to_thread(lambda: holder.runtime.digest)
            log.info("event=model_digest digest=%s", digest)

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

    guard = ctx.built.get("StreamGuard")
    service = PoliciesService(ctx.policies, _topic_matcher(ctx), guard.state.holder if guard is not None else None)
    return HostedService(
        add_to_server=lambda server: guard_pb2_grpc.add_PoliciesServicer_to_server(service, server),
        service_names=(_full_name("Policies"),),
        state=service,
    )


def _judge(ctx: ServiceContext) -> HostedService:
    from server.judge_factory import load_judge
    from server.judge_service import JudgeHolder, JudgeService

    holder = JudgeHolder()
    service = JudgeService(holder, ctx.policies, ctx.metrics, ctx.audit)

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


def _retrieval(ctx: ServiceContext, service: str) -> HostedService:
    """The Embedder or the Reranker: the same build, load and close steps."""
    from guard.runtime import parse_dtype, resolve_retrieval_model

    s = ctx.settings
    if service == "embedder":
        from guard.retrieval.embedder import Embedder as model_class
        from server.embedding_service import EmbedderHolder as holder_class
        from server.embedding_service import EmbedderService as service_class
        from server.qwen3guard.embedding.v1 import embedding_pb2_grpc as pb_grpc

        proto_name, add = "Embedder", pb_grpc.add_EmbedderServicer_to_server
    else:
        from guard.retrieval.reranker import Reranker as model_class
        from server.qwen3guard.rerank.v1 import rerank_pb2_grpc as pb_grpc
        from server.rerank_service import RerankerHolder as holder_class
        from server.rerank_service import RerankerService as service_class

        proto_name, add = "Reranker", pb_grpc.add_RerankerServicer_to_server
    holder = holder_class()
    servicer = service_class(holder, ctx.metrics, ctx.media)

    async def load() -> None:
        def build():
            path = resolve_retrieval_model(getattr(s, service), service)
            return model_class(
                path,
                device=s.device,
                dtype=parse_dtype(s.dtype),
                limits=s.retrieval_limits(service),
                max_length=getattr(s, f"{service}_max_length") or None,
                on_batch=ctx.metrics.on_retrieval_batch(proto_name),
                endpoint=getattr(s, f"{service}_endpoint"),
                endpoint_model=getattr(s, f"{service}_endpoint_model"),
                vision_limits=s.vision_limits(),
            )

        holder.model = await asyncio.to_thread(build)
        model = holder.model
        log.info("event=model_loaded service=%s model=%r demo=%s", proto_name, model.path.name, bool(model.demo))
        if model.demo:
            log.warning("event=demo_model service=%s notice=%r", proto_name, model.demo.get("notice", "DEMO"))

    async def close() -> None:
        if holder.model is not None:
            await asyncio.to_thread(holder.model.close)

    return HostedService(
        add_to_server=lambda server: add(servicer, server),
        service_names=(_full_name(proto_name),),
        load=load,
        close=close,
        state=holder,
    )


def _reasoner(ctx: ServiceContext) -> HostedService:
    """The Reasoner: generation on the local model (steerable) or GuardedGeneration's upstream,
    guarded by StreamGuard's sessions."""
    from server.qwen3guard.reasoning.v1 import reasoning_pb2_grpc
    from server.reasoner_factory import load_reasoner
    from server.reasoning_service import ReasonerHolder, ReasonerService

    guard = ctx.built["StreamGuard"].state
    upstream = ctx.built["GuardedGeneration"].state.upstream if "GuardedGeneration" in ctx.built else None
    holder = ReasonerHolder()
    service = ReasonerService(holder, guard)

    async def load() -> None:
        tokenizer = guard.holder.ready().tokenizer.hf
        holder.model = await asyncio.to_thread(load_reasoner, ctx.settings, upstream, tokenizer)
        model = holder.model
        log.info(
            "event=model_loaded service=Reasoner backend=%s model=%r sae=%s demo=%s",
            model.backend.name, model.name, model.sae is not None, bool(model.demo),
        )  # fmt: skip

    async def close() -> None:
        model = holder.model
        if model is not None and model.backend is not upstream:  # the upstream is GuardedGeneration's to close
            await model.backend.close()

    return HostedService(
        add_to_server=lambda server: reasoning_pb2_grpc.add_ReasonerServicer_to_server(service, server),
        service_names=(_full_name("Reasoner"),),
        load=load,
        close=close,
        state=holder,
    )


def _parscale(ctx: ServiceContext) -> HostedService:
    """ParScale: its own batched engine; Generate guarded by StreamGuard's sessions."""
    from server.parscale_service import ParScaleHolder, ParScaleModel, ParScaleService
    from server.qwen3guard.parscale.v1 import parscale_pb2_grpc

    s = ctx.settings
    holder = ParScaleHolder()
    service = ParScaleService(holder, ctx.built["StreamGuard"].state)

    async def load() -> None:
        from guard.parscale.engine import ParScaleEngine
        from guard.parscale.loading import load_parscale
        from guard.runtime import parse_dtype

        def build() -> ParScaleModel:
            model, tokenizer, path = load_parscale(s.parscale, device=s.device, dtype=parse_dtype(s.dtype))
            engine = ParScaleEngine(model, s.parscale_limits(), on_step=ctx.metrics.on_parscale_step)
            return ParScaleModel(engine, tokenizer, path.name, s.device, s.dtype)

        service.attach(await asyncio.to_thread(build))
        model = holder.model
        config = model.engine.model.config
        log.info(
            "event=model_loaded service=ParScale model=%r P=%d prefix_tokens=%d demo=%s",
            model.name, config.parscale_n, config.prefix_tokens, bool(model.demo),
        )  # fmt: skip
        if model.demo:
            log.warning("event=demo_model service=ParScale notice=%r", model.demo.get("notice", "DEMO"))

    async def close() -> None:
        if holder.model is not None:
            await asyncio.to_thread(holder.model.engine.close)

    return HostedService(
        add_to_server=lambda server: parscale_pb2_grpc.add_ParScaleServicer_to_server(service, server),
        service_names=(_full_name("ParScale"),),
        load=load,
        close=close,
        state=holder,
    )


def _ext_proc(ctx: ServiceContext) -> HostedService:
    """Envoy's external processor: StreamGuard's sessions in Envoy's data path."""
    from envoy.service.ext_proc.v3 import external_processor_pb2_grpc

    from server.gateway.ext_proc import ExternalProcessorService

    service = ExternalProcessorService(ctx.built["StreamGuard"].state)
    return HostedService(
        add_to_server=lambda server: external_processor_pb2_grpc.add_ExternalProcessorServicer_to_server(
            service, server
        ),
        service_names=(_full_name("ExternalProcessor"),),
        state=service,
    )


def _openai(ctx: ServiceContext) -> HostedService:
    """The OpenAI-compatible HTTP endpoint (no gRPC service): GuardedGeneration behind OpenAI's API."""
    from server.gateway.openai_api import OpenAIEndpoint

    generation = ctx.built["GuardedGeneration"].state
    endpoint = OpenAIEndpoint(generation, ctx.settings, tls=ctx.tls, authorizer=ctx.authorizer)
    return HostedService(
        add_to_server=lambda server: None,
        service_names=(),
        load=endpoint.start,
        close=endpoint.stop,
        state=endpoint,
    )


def _settings_fields(prefix: str) -> tuple[str, ...]:
    from dataclasses import fields

    return tuple(f.name for f in fields(ServeSettings) if f.name.startswith(prefix))


BUILTIN_SERVICES: tuple[ServiceSpec, ...] = (
    ServiceSpec(
        "Embedder",
        lambda ctx: _retrieval(ctx, "embedder"),
        settings_fields=_settings_fields("embedder"),
        enabled=lambda settings: bool(settings.embedder),
        description="Qwen3-Embedding vectors (qwen3guard.embedding.v1), on with --embedder DIR|demo",
    ),
    ServiceSpec(
        "Reranker",
        lambda ctx: _retrieval(ctx, "reranker"),
        settings_fields=_settings_fields("reranker"),
        enabled=lambda settings: bool(settings.reranker),
        description="Qwen3-Reranker relevance scores (qwen3guard.rerank.v1), on with --reranker DIR|demo",
    ),
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
    ServiceSpec(
        "Reasoner",
        _reasoner,
        settings_fields=_settings_fields("reasoner"),
        enabled=lambda settings: bool(settings.reasoner),
        description="guarded reasoning: thinking budget, SAE steering, memory agent (qwen3guard.reasoning.v1)",
    ),
    ServiceSpec(
        "ParScale",
        _parscale,
        settings_fields=_settings_fields("parscale"),
        enabled=lambda settings: bool(settings.parscale),
        description="ParScale generation, batched and KV-cached, guarded; Score; Info (qwen3guard.parscale.v1)",
    ),
    ServiceSpec(
        "ExternalProcessor",
        _ext_proc,
        settings_fields=(*_settings_fields("ext_proc"), *_settings_fields("gateway_")),
        enabled=lambda settings: settings.ext_proc,
        description="Envoy ext_proc: prompts judged, SSE responses guarded in Envoy's data path, on with --ext-proc",
    ),
    ServiceSpec(
        "OpenAI",
        _openai,
        settings_fields=_settings_fields("openai_"),
        enabled=lambda settings: bool(settings.openai_port),
        description="OpenAI-compatible HTTP endpoint (/v1/chat/completions, /v1/completions) through "
        "GuardedGeneration, on with --openai-port",
    ),
)

HTTP_SERVICES = frozenset({"OpenAI"})  # served over HTTP: no gRPC health or reflection name


def builtin_service_names() -> tuple[str, ...]:
    """Full proto names of the built-in services (their health and reflection names)."""
    return tuple(_full_name(spec.name) for spec in BUILTIN_SERVICES if spec.name not in HTTP_SERVICES)
