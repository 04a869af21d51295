"""One typed settings object for `guard serve`, filled from flags, then environment, then defaults.

Every flag has an environment variable (``GUARD_<FLAG>``, dashes as underscores) so that
Kubernetes manifests can configure the sidecar either way. Printed at start-up.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from guard.model.engine import EngineLimits
    from guard.parscale.engine import ParScaleLimits
    from guard.retrieval.batching import BatchLimits
    from guard.retrieval.vision import VisionLimits
    from server.tls import TlsFiles


@dataclass(frozen=True)
class ServeSettings:
    model: str = "demo"  # checkpoint directory or 'demo'
    device: str = "cpu"
    dtype: str = "float32"
    torch_threads: int = 0  # intra-op threads of large forward passes; 0 = torch's default
    address: str = "[::]:50051"  # gRPC listen address
    metrics_port: int = 9464  # Prometheus /metrics; 0 disables
    max_sessions: int = 256
    max_tokens_per_session: int = 8192
    max_chunk_tokens: int = 1024
    max_text_chars: int = 16384  # one text chunk
    max_queued_chunks: int = 4096
    idle_timeout_s: float = 300.0
    max_step_tokens: int = 2048
    max_batch_wait_ms: float = 2.0  # a forward pass waits this long at most for the previous one's sessions
    min_parallel_tokens: int = 256  # smaller forward passes run on one torch thread (the loop keeps a core)
    max_kv_cache_mb: int = 0  # 0 = no byte budget beyond the session/token limits
    kv_cache_release_idle: bool = False  # idle: give the whole KV cache back (default: keep the first allocation)
    judge: str = "demo"  # Generative judge checkpoint directory, 'demo', or '' for none
    judge_endpoint: str = ""  # or an OpenAI-compatible endpoint (e.g. vLLM serving Qwen3Guard-Gen)
    judge_model: str = ""  # model name at the endpoint; empty = the first one it lists
    judge_retries: int = 2  # endpoint retries with exponential backoff
    judge_concurrency: int = 16  # concurrent endpoint requests
    judge_max_batch: int = 8  # local judge: requests batched into one generation
    judge_wait_ms: float = 5.0  # local judge: how long a batch waits to fill
    judge_max_queue: int = 1024  # local judge: requests waiting for a batch (RESOURCE_EXHAUSTED beyond)
    embedder: str = ""  # Qwen3-Embedding checkpoint directory, 'demo', or '' (the Embedder service is off)
    embedder_max_batch_tokens: int = 16384  # padded tokens in one forward pass
    embedder_max_batch: int = 64  # sequences in one forward pass
    embedder_wait_ms: float = 2.0  # how long a batch waits to fill
    embedder_max_queue: int = 4096  # sequences waiting (RESOURCE_EXHAUSTED beyond)
    embedder_max_client_batch: int = 256  # inputs in one request
    embedder_max_length: int = 0  # tokens per input; 0 = the model's (8192 at most)
    embedder_endpoint: str = ""  # the `vllm` backend: a vLLM pooling server computing the vectors
    embedder_endpoint_model: str = ""  # model name there; empty = the first one it lists
    reranker: str = ""  # Qwen3-Reranker checkpoint directory, 'demo', or '' (the Reranker service is off)
    reranker_max_batch_tokens: int = 16384
    reranker_max_batch: int = 64
    reranker_wait_ms: float = 2.0
    reranker_max_queue: int = 4096
    reranker_max_client_batch: int = 256  # documents in one request
    reranker_max_length: int = 0  # tokens per (query, document) prompt; 0 = 8192
    reranker_endpoint: str = ""  # the `vllm` backend: a vLLM server scoring through /classify
    reranker_endpoint_model: str = ""
    embedder_max_queue_tokens: int = 262144  # tokens waiting (bounds queued memory; RESOURCE_EXHAUSTED beyond)
    reranker_max_queue_tokens: int = 262144
    # Images and videos of Qwen3-VL-Embedding / Qwen3-VL-Reranker (both services); defaults as released.
    vision_image_min_pixels: int = 4096  # smaller images are scaled up
    vision_image_max_pixels: int = 1843200  # larger images are scaled down (1800 vision tokens)
    vision_frame_min_pixels: int = 131072
    vision_frame_max_pixels: int = 786432
    vision_video_max_pixels: int = 7864320  # all frames of one video together
    vision_max_frames: int = 64  # frames of one video; more is INVALID_ARGUMENT
    vision_max_media: int = 16  # images + videos in one input
    vision_max_encoded_bytes: int = 16 * 2**20  # one encoded image or frame
    vision_max_source_pixels: int = 64_000_000  # one decoded image, before resizing (no decompression bombs)
    vision_default_fps: float = 2.0  # a video's frame rate when the request gives none
    vision_decode_workers: int = 2  # images and videos decoded at once (threads, off the event loop)
    max_message_mb: int = 32  # largest gRPC message, either way (images travel inside requests)
    # gRPC transport hardening (see server_options): a client cannot hold the server with pings,
    # idle connections or unbounded streams; connections are recycled so load spreads again.
    grpc_max_concurrent_streams: int = 1024  # per connection; more wait in the client (HTTP/2)
    grpc_keepalive_time_s: float = 60.0  # the server pings a connection idle this long
    grpc_keepalive_timeout_s: float = 20.0  # ... and closes it when the ping is not answered in time
    grpc_min_ping_interval_s: float = 10.0  # clients may ping no more often (keepalive enforcement)
    grpc_max_ping_strikes: int = 2  # pings faster than that before the connection is closed (GOAWAY)
    grpc_max_connection_idle_s: float = 0.0  # close connections without RPCs for this long; 0 = never
    grpc_max_connection_age_s: float = 0.0  # GOAWAY after this long (rebalancing); 0 = never
    grpc_max_connection_age_grace_s: float = 300.0  # open streams may finish within this after the GOAWAY
    # TLS on every listener (gRPC, metrics, OpenAI endpoint); files re-read when they change (server/tls.py).
    tls_cert: str = ""  # PEM certificate chain; '' = plaintext listeners
    tls_key: str = ""  # its PEM private key
    tls_client_ca: str = ""  # PEM bundle of client CAs: mTLS, every client must present a certificate it signed
    otlp_endpoint: str = ""  # OpenTelemetry traces over OTLP/gRPC (e.g. http://otel-collector:4317); '' = off
    otel_service_name: str = "qwen3guard-sidecar"  # the traces' service.name
    health_port: int = 0  # a plaintext listener serving only grpc.health.v1 (kubelet probes under TLS); 0 = off
    # Tenants (server/tenants.py): API keys, domains, services, limits. '' = open (anyone who reaches the port).
    tenants: str = ""  # the tenants YAML file (a mounted Secret; edits apply live, the last good set stays)
    tenants_poll_s: float = 1.0  # how often the tenants file is checked for edits
    reflection: bool = True  # gRPC server reflection (open, like health); off hides the API from strangers
    reasoner: str = ""  # Qwen3 causal LM checkpoint, 'demo', 'upstream' (the vLLM upstream), or '' (off)
    reasoner_sae: str = ""  # SAE directory (sae.safetensors, config.json, features.csv); '' = <reasoner>/sae if any
    reasoner_context_window: int = 0  # tokens; 0 = the model's max_position_embeddings (upstream: 32768)
    reasoner_memory_window: int = 0  # documents over this many tokens use the memory agent; 0 = window / 2
    reasoner_chunk_tokens: int = 5000  # memory agent: document tokens read per step
    reasoner_memory_tokens: int = 1024  # memory agent: the memory's bound
    reasoner_document_window: int = 2048  # memory agent: the document is judged in windows of this many tokens
    reasoner_max_alpha: float = 50.0  # steering strength bound (|alpha|)
    reasoner_max_steer_tokens: int = 4096  # steering span bound (T)
    reasoner_max_waiting: int = 8  # local backend: generations waiting their turn (RESOURCE_EXHAUSTED beyond)
    parscale: str = ""  # ParScale checkpoint (qwen2_parscale or qwen2), 'demo', or '' (off)
    parscale_max_requests: int = 64  # live requests (each holds P KV cache slots)
    parscale_max_tokens: int = 0  # per request, prompt + generated; 0 = the model's context
    parscale_max_step_tokens: int = 2048  # new tokens in one forward pass, all requests together
    parscale_max_queue: int = 1024  # steps waiting for the worker (RESOURCE_EXHAUSTED beyond)
    parscale_kv_cache_mb: int = 0  # cap on ParScale's KV cache; 0 = bounded by the limits above
    parscale_wait_ms: float = 1.0  # a step waits at most this long to share a forward pass
    upstream_url: str = ""  # vLLM OpenAI-compatible server for GuardedGeneration (e.g. http://127.0.0.1:8000)
    upstream_model: str = ""  # model name there; empty = the first one it lists
    upstream_grpc: str = ""  # or vLLM's gRPC server (host:port): token ids in and out, Abort RPC
    upstream_engine: str = ""  # or 'async-llm': vLLM embedded in this process, serving --upstream-model (a path)
    upstream_input_path: str = "auto"  # auto (probe the upstream's tokenizer), token_ids, or text
    upstream_gpu_memory_utilization: float = 0.9  # async-llm only
    upstream_max_model_len: int = 0  # async-llm only; 0 = the model's
    upstream_enforce_eager: bool = False  # async-llm only: no torch.compile / CUDA graphs (fast start, slower decode)
    # Gateways: the Envoy external processor (on the gRPC port) and the OpenAI-compatible endpoint.
    ext_proc: bool = False  # serve envoy.service.ext_proc.v3.ExternalProcessor
    ext_proc_token_ids: bool = False  # the upstream's token_ids (return_token_ids) are Qwen3 ids: judge those
    openai_port: int = 0  # the OpenAI-compatible HTTP endpoint through GuardedGeneration; 0 = off
    openai_model: str = ""  # the model name it serves; empty = the upstream's
    openai_max_connections: int = 256  # concurrent HTTP connections (503 beyond)
    gateway_domain_header: str = "x-guard-domain"  # the request header naming the domain (both gateways)
    gateway_max_body_bytes: int = 4 * 2**20  # a request body, a JSON response, one SSE event
    gateway_allow_media: bool = False  # ext_proc: let image/audio/video parts through (a text guard cannot read them)
    policies: str = ""  # policy directory; empty = ./policies if present, else the built-in default
    default_domain: str = "default"  # the policy of streams that name no domain
    policy_poll_s: float = 0.25  # how often the policy directory is checked for edits
    grace_period_s: float = 20.0  # drain on SIGTERM; keep below terminationGracePeriodSeconds
    log_level: str = "INFO"
    log_content: bool = False  # operators may opt in to prompt/response text in logs (and the audit log)
    audit_log: str = "-"  # the decision audit log: '-' = stdout, a file path (rotated by size), '' = off
    audit_max_bytes: int = 100 * 2**20  # a file audit log rotates at this size
    audit_backups: int = 5  # rotated files kept
    # Options of plug-in services (server/registry.py), as (name, value) pairs: --{name} / GUARD_{NAME}.
    plugin_options: tuple[tuple[str, Any], ...] = field(default=(), metadata={"flag": False})

    def plugin_option(self, name: str) -> Any:
        """A plug-in option's value, or its declared default."""
        given = dict(self.plugin_options)
        if name in given:
            return given[name]
        from server.registry import plugin_options, plugin_specs

        for option in plugin_options(plugin_specs()):
            if option.name == name:
                return option.default
        raise KeyError(f"no service declares the option {name!r}")

    def server_options(self) -> list[tuple[str, int]]:
        """The gRPC server's channel arguments: message sizes, keepalive enforcement, connection
        age and idleness, concurrent streams per connection (grpc core's names)."""

        def ms(seconds: float) -> int:
            return int(seconds * 1000)

        options = [
            ("grpc.max_receive_message_length", self.max_message_mb * 2**20),
            ("grpc.max_send_message_length", self.max_message_mb * 2**20),
            ("grpc.max_concurrent_streams", self.grpc_max_concurrent_streams),
            ("grpc.keepalive_time_ms", ms(self.grpc_keepalive_time_s)),
            ("grpc.keepalive_timeout_ms", ms(self.grpc_keepalive_timeout_s)),
            ("grpc.keepalive_permit_without_calls", 1),  # idle gateway connections may keep themselves alive
            ("grpc.http2.min_ping_interval_without_data_ms", ms(self.grpc_min_ping_interval_s)),  # enforced on clients
            ("grpc.http2.max_ping_strikes", self.grpc_max_ping_strikes),
            ("grpc.so_reuseport", 0),  # a second sidecar on the same port fails to start, not shares it
        ]
        if self.grpc_max_connection_idle_s > 0:
            options.append(("grpc.max_connection_idle_ms", ms(self.grpc_max_connection_idle_s)))
        if self.grpc_max_connection_age_s > 0:
            options.append(("grpc.max_connection_age_ms", ms(self.grpc_max_connection_age_s)))
            options.append(("grpc.max_connection_age_grace_ms", ms(self.grpc_max_connection_age_grace_s)))
        return options

    def tls_files(self) -> TlsFiles | None:
        """The TLS files, or None for plaintext listeners (a key without a certificate is an error)."""
        from server.tls import TlsError, TlsFiles

        if not self.tls_cert and not self.tls_key:
            if self.tls_client_ca:
                raise TlsError("--tls-client-ca needs --tls-cert and --tls-key (mTLS is TLS with client certificates)")
            return None
        if not (self.tls_cert and self.tls_key):
            raise TlsError("--tls-cert and --tls-key go together")
        client_ca = Path(self.tls_client_ca) if self.tls_client_ca else None
        return TlsFiles(Path(self.tls_cert), Path(self.tls_key), client_ca)

    def engine_limits(self) -> EngineLimits:
        from guard.model.engine import EngineLimits  # the model runtime (torch): only when serving

        return EngineLimits(
            max_sessions=self.max_sessions,
            max_tokens_per_session=self.max_tokens_per_session,
            max_chunk_tokens=self.max_chunk_tokens,
            max_queued_chunks=self.max_queued_chunks,
            idle_timeout_s=self.idle_timeout_s,
            max_step_tokens=self.max_step_tokens,
            max_batch_wait_ms=self.max_batch_wait_ms,
            min_parallel_tokens=self.min_parallel_tokens,
            max_kv_cache_bytes=self.max_kv_cache_mb * 2**20 or None,
            release_idle_kv_cache=self.kv_cache_release_idle,
        )

    def retrieval_limits(self, service: str) -> BatchLimits:
        """Batching limits of the ``embedder`` or ``reranker`` service."""
        from guard.retrieval.batching import BatchLimits

        return BatchLimits(
            max_batch_tokens=getattr(self, f"{service}_max_batch_tokens"),
            max_batch=getattr(self, f"{service}_max_batch"),
            wait_ms=getattr(self, f"{service}_wait_ms"),
            max_queue=getattr(self, f"{service}_max_queue"),
            max_client_batch=getattr(self, f"{service}_max_client_batch"),
            max_queue_tokens=getattr(self, f"{service}_max_queue_tokens"),
        )

    def parscale_limits(self) -> ParScaleLimits:
        from guard.parscale.engine import ParScaleLimits

        return ParScaleLimits(
            max_requests=self.parscale_max_requests,
            max_tokens_per_request=self.parscale_max_tokens or None,
            max_step_tokens=self.parscale_max_step_tokens,
            max_queue=self.parscale_max_queue,
            max_kv_cache_bytes=self.parscale_kv_cache_mb * 2**20 or None,
            wait_ms=self.parscale_wait_ms,
        )

    def vision_limits(self) -> VisionLimits:
        """Image and video limits of the vision-language retrieval models."""
        from guard.retrieval.vision import VisionLimits

        return VisionLimits(
            image_min_pixels=self.vision_image_min_pixels,
            image_max_pixels=self.vision_image_max_pixels,
            frame_min_pixels=self.vision_frame_min_pixels,
            frame_max_pixels=self.vision_frame_max_pixels,
            video_max_pixels=self.vision_video_max_pixels,
            max_frames=self.vision_max_frames,
            max_media=self.vision_max_media,
            max_encoded_bytes=self.vision_max_encoded_bytes,
            max_source_pixels=self.vision_max_source_pixels,
            default_fps=self.vision_default_fps,
        )

    def policy_dir(self) -> Path | None:
        if self.policies:
            return Path(self.policies)
        local = Path("policies")
        return local if local.is_dir() else None

    def describe(self) -> str:
        return " ".join(f"{k}={v}" for k, v in asdict(self).items())


def env_name(field: str) -> str:
    return f"GUARD_{field.upper()}"


def _parse_bool(text: str) -> bool:
    if text.lower() in ("1", "true", "yes", "on"):
        return True
    if text.lower() in ("0", "false", "no", "off", ""):
        return False
    raise ValueError(f"expected a boolean, got {text!r}")


def _settings_fields() -> list:
    return [f for f in fields(ServeSettings) if f.metadata.get("flag", True)]


def _add_flag(group, name: str, kind: str, default: Any, help_text: str) -> None:
    flag = "--" + name.replace("_", "-")
    help_text = f"{help_text} (env {env_name(name)}, default {default!r})".strip()
    if kind == "bool":
        group.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
    else:
        group.add_argument(flag, type={"int": int, "float": float}.get(kind, str), default=None, help=help_text)


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting: ``--max-sessions`` <-> ``GUARD_MAX_SESSIONS`` <-> ``max_sessions``,
    grouped by the service that owns it (the registry says which), plug-in options included."""
    from server.registry import all_specs

    specs = all_specs()
    owner = {name: spec for spec in specs for name in spec.settings_fields}
    groups = {spec.name: parser.add_argument_group(spec.name, spec.description) for spec in specs}
    general = parser.add_argument_group("server")
    for f in _settings_fields():
        group = groups[owner[f.name].name] if f.name in owner else general
        _add_flag(group, f.name, str(f.type), f.default, "")
    for spec in specs:
        for option in spec.options:
            _add_flag(groups[spec.name], option.name, option.type.__name__, option.default, option.help)


def _value(raw: str, kind: str, name: str) -> Any:
    parse = {"int": int, "float": float, "bool": _parse_bool}.get(kind, str)
    try:
        return parse(raw)
    except ValueError:
        raise ValueError(f"{env_name(name)}={raw!r} is not a valid {kind}") from None


def settings_from(args: argparse.Namespace, environ: dict[str, str] | None = None) -> ServeSettings:
    from server.registry import plugin_options, plugin_specs

    environ = os.environ if environ is None else environ
    values: dict[str, Any] = {}
    for f in _settings_fields():
        flag_value = getattr(args, f.name, None)
        if flag_value is not None:
            values[f.name] = flag_value
        elif (raw := environ.get(env_name(f.name))) is not None:
            values[f.name] = _value(raw, str(f.type), f.name)
    plugin: list[tuple[str, Any]] = []
    for option in plugin_options(plugin_specs()):
        flag_value = getattr(args, option.name, None)
        if flag_value is not None:
            plugin.append((option.name, flag_value))
        elif (raw := environ.get(env_name(option.name))) is not None:
            plugin.append((option.name, _value(raw, option.type.__name__, option.name)))
        else:
            plugin.append((option.name, option.default))
    return ServeSettings(**values, plugin_options=tuple(plugin))
