"""The demo ParScale checkpoint: a tiny ``qwen2_parscale`` model (P = 4 streams, 8 prefix tokens
each) in the released layout with the real Qwen tokenizer and RANDOM weights, so that the
ParScale service, its batching and its guarding can be run and shown without a download. It is
marked DEMO: what it writes is noise, not language."""

from __future__ import annotations

from pathlib import Path

from guard.cache import cached_build
from guard.model.config import DEMO_MARKER

PARSCALE_VERSION = "parscale-demo-v2"
PARSCALE_NOTICE = "DEMO PARSCALE MODEL: tiny and randomly initialised; its output is noise, not language"


def write_demo_parscale(out: Path) -> None:
    from guard.parscale.checkpoint_writer import parscale_config_dict, write_parscale_checkpoint

    config = parscale_config_dict("tiny", parscale_n=4, prefix_tokens=8, smoothing=0.1)
    config[DEMO_MARKER] = {"notice": PARSCALE_NOTICE, "version": PARSCALE_VERSION}
    write_parscale_checkpoint(out, config=config, seed=2505)


def demo_parscale_dir(rebuild: bool = False) -> Path:
    """The cached demo checkpoint (written on first use, in about a second)."""
    return cached_build(PARSCALE_VERSION, write_demo_parscale, rebuild=rebuild)
