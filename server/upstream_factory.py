"""The configured upstream engine of GuardedGeneration: vLLM over HTTP, over gRPC, or embedded."""

from __future__ import annotations

from server.settings import ServeSettings


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
            enforce_eager=settings.upstream_enforce_eager,
            dtype="auto" if settings.device == "cpu" else settings.dtype,
        )
    if settings.upstream_grpc:
        from server.upstream import VllmGrpcUpstream

        return VllmGrpcUpstream(settings.upstream_grpc)
    if settings.upstream_url:
        from server.upstream import VllmHttpUpstream

        return VllmHttpUpstream(settings.upstream_url, model=settings.upstream_model or None)
    return None
