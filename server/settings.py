"""One typed settings object for `guard serve`, filled from flags, then environment, then defaults.

Every flag has an environment variable (``GUARD_<FLAG>``, dashes as underscores) so that
Kubernetes manifests can configure the sidecar either way. Printed at start-up.
"""

from __future__ import annotations

import argparse
import os
from dataclasses import asdict, dataclass, fields
from pathlib import Path

from guard.engine import EngineLimits


@dataclass(frozen=True)
class ServeSettings:
    model: str = "demo"  # checkpoint directory or 'demo'
    device: str = "cpu"
    dtype: str = "float32"
    address: str = "[::]:50051"  # gRPC listen address
    metrics_port: int = 9464  # Prometheus /metrics; 0 disables
    max_sessions: int = 256
    max_tokens_per_session: int = 8192
    max_chunk_tokens: int = 1024
    max_text_chars: int = 16384  # one text chunk
    max_queued_chunks: int = 4096
    idle_timeout_s: float = 300.0
    max_step_tokens: int = 2048
    max_kv_cache_mb: int = 0  # 0 = no byte budget beyond the session/token limits
    judge: str = "demo"  # Generative judge checkpoint directory, 'demo', or '' for none
    judge_endpoint: str = ""  # or an OpenAI-compatible endpoint (e.g. vLLM serving Qwen3Guard-Gen)
    judge_model: str = ""  # model name at the endpoint; empty = the first one it lists
    judge_retries: int = 2  # endpoint retries with exponential backoff
    judge_concurrency: int = 16  # concurrent endpoint requests
    judge_max_batch: int = 8  # local judge: requests batched into one generation
    judge_wait_ms: float = 5.0  # local judge: how long a batch waits to fill
    upstream_url: str = ""  # vLLM OpenAI-compatible server for GuardedGeneration (e.g. http://127.0.0.1:8000)
    upstream_model: str = ""  # model name there; empty = the first one it lists
    upstream_grpc: str = ""  # or vLLM's gRPC server (host:port): token ids in and out, Abort RPC
    upstream_engine: str = ""  # or 'async-llm': vLLM embedded in this process, serving --upstream-model (a path)
    upstream_input_path: str = "auto"  # auto (probe the upstream's tokenizer), token_ids, or text
    upstream_gpu_memory_utilization: float = 0.9  # async-llm only
    upstream_max_model_len: int = 0  # async-llm only; 0 = the model's
    policies: str = ""  # policy directory; empty = ./policies if present, else the built-in default
    default_domain: str = "default"  # the policy of streams that name no domain
    policy_poll_s: float = 0.25  # how often the policy directory is checked for edits
    grace_period_s: float = 20.0  # drain on SIGTERM; keep below terminationGracePeriodSeconds
    log_level: str = "INFO"
    log_content: bool = False  # operators may opt in to prompt/response text in logs

    def engine_limits(self) -> EngineLimits:
        return EngineLimits(
            max_sessions=self.max_sessions,
            max_tokens_per_session=self.max_tokens_per_session,
            max_chunk_tokens=self.max_chunk_tokens,
            max_queued_chunks=self.max_queued_chunks,
            idle_timeout_s=self.idle_timeout_s,
            max_step_tokens=self.max_step_tokens,
            max_kv_cache_bytes=self.max_kv_cache_mb * 2**20 or None,
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


def add_serve_arguments(parser: argparse.ArgumentParser) -> None:
    """One flag per setting: ``--max-sessions`` <-> ``GUARD_MAX_SESSIONS`` <-> ``max_sessions``."""
    for f in fields(ServeSettings):
        flag = "--" + f.name.replace("_", "-")
        help_text = f"(env {env_name(f.name)}, default {f.default!r})"
        if f.type in ("bool", bool):
            parser.add_argument(flag, action=argparse.BooleanOptionalAction, default=None, help=help_text)
        else:
            kind = {"int": int, "float": float}.get(str(f.type), str)
            parser.add_argument(flag, type=kind, default=None, help=help_text)


def settings_from(args: argparse.Namespace, environ: dict[str, str] | None = None) -> ServeSettings:
    environ = os.environ if environ is None else environ
    values = {}
    for f in fields(ServeSettings):
        flag_value = getattr(args, f.name, None)
        if flag_value is not None:
            values[f.name] = flag_value
            continue
        raw = environ.get(env_name(f.name))
        if raw is None:
            continue
        kind = {"int": int, "float": float, "bool": _parse_bool}.get(str(f.type), str)
        try:
            values[f.name] = kind(raw)
        except ValueError:
            raise ValueError(f"{env_name(f.name)}={raw!r} is not a valid {f.type}") from None
    return ServeSettings(**values)
