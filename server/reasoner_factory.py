"""Building the Reasoner's model from the settings: the local backend (a Qwen3 causal LM, with its
SAE when there is one) or the configured vLLM upstream, plus the memory agent's settings."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from server.reasoning_service import ReasonerModel
from server.settings import ServeSettings

TEMPLATE_OVERHEAD = 256  # tokens of a memory-agent prompt beyond its chunk and memory (template, question)
MIN_DOCUMENT_WINDOW = 16  # guard tokens per judged document window


def resolve_reasoner_model(spec: str) -> Path:
    """``demo`` -> the cached demo reasoner (trained on first use); anything else a checkpoint."""
    if spec == "demo":
        from guard.demo.reasoner_model import demo_reasoner_dir

        return demo_reasoner_dir()
    path = Path(spec).expanduser()
    if not path.is_dir():
        raise FileNotFoundError(f"reasoner model {spec!r} is neither 'demo', 'upstream' nor a checkpoint directory")
    return path


def load_reasoner(settings: ServeSettings, upstream: Any, guard_tokenizer: Any) -> ReasonerModel:
    """The Reasoner's model. ``upstream``: GuardedGeneration's (for ``--reasoner upstream``)."""
    from guard.model.config import DEMO_MARKER
    from guard.reasoning.local_lm import LocalCausalLM
    from guard.reasoning.memory_agent import MemoryAgentConfig, MemoryTemplates
    from guard.reasoning.sae import SparseAutoencoder
    from guard.reasoning.steering import SteerLimits
    from guard.runtime import parse_dtype
    from server.upstream_local import LocalUpstream

    s = settings
    limits = SteerLimits(max_alpha=s.reasoner_max_alpha, max_tokens=s.reasoner_max_steer_tokens)
    sae = unembedding = demo = path = None
    if s.reasoner == "upstream":
        if upstream is None:
            raise ValueError(
                "--reasoner upstream needs an upstream (--upstream-url, --upstream-grpc or --upstream-engine)"
            )
        if s.reasoner_sae:
            raise ValueError("--reasoner-sae needs the local backend: vLLM cannot steer (give --reasoner DIR)")
        backend, tokenizer, name = upstream, guard_tokenizer, upstream.name
        window = s.reasoner_context_window or 32768
    else:
        path = resolve_reasoner_model(s.reasoner)
        lm = LocalCausalLM(path, device=s.device, dtype=parse_dtype(s.dtype))
        sae_dir = Path(s.reasoner_sae) if s.reasoner_sae else (path / "sae" if (path / "sae").is_dir() else None)
        if sae_dir is not None:
            sae = SparseAutoencoder.load(sae_dir, device=s.device)
            sae.check_against(lm.config)
        backend = LocalUpstream(
            lm, layer=sae.layer if sae is not None else None, limits=limits, max_waiting=s.reasoner_max_waiting
        )
        tokenizer, name, unembedding = lm.tokenizer, path.name, lm.unembedding
        window = s.reasoner_context_window or int(lm.config.max_position_embeddings)
        demo = json.loads((path / "config.json").read_text()).get(DEMO_MARKER)
    memory = MemoryAgentConfig(chunk_tokens=s.reasoner_chunk_tokens, memory_tokens=s.reasoner_memory_tokens)
    if s.reasoner_document_window < MIN_DOCUMENT_WINDOW:
        raise ValueError(f"--reasoner-document-window must be at least {MIN_DOCUMENT_WINDOW} tokens")
    needed = memory.chunk_tokens + 2 * memory.memory_tokens + TEMPLATE_OVERHEAD
    if needed > window:
        raise ValueError(
            f"the memory agent's calls need about {needed} tokens (--reasoner-chunk-tokens {memory.chunk_tokens} "
            f"+ 2 x --reasoner-memory-tokens {memory.memory_tokens} + {TEMPLATE_OVERHEAD}); the window is {window}"
        )
    return ReasonerModel(
        backend=backend,
        name=name,
        context_window=window,
        tokenizer=tokenizer,
        memory_config=memory,
        memory_templates=MemoryTemplates.from_model_dir(path),
        sae=sae,
        unembedding=unembedding,
        memory_window=s.reasoner_memory_window or window // 2,
        document_window=s.reasoner_document_window,
        demo=demo,
        steer_limits=limits,
    )
