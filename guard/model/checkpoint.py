"""Load a Qwen3Guard-Stream checkpoint directory (official layout) without remote code.

The directory holds config.json (``Qwen3ForGuardModel``), safetensors weights under the
official names (``model.*`` backbone, the two head stacks at top level, optionally ``lm_head``)
and the tokenizer files. Names map to our modules through one table
(``HEAD_PARAMETER_NAMES``); anything unexpected or missing is an error, never a silent skip.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from guard.model.config import CheckpointError, StreamGuardConfig
from guard.model.decoder import Rotary
from guard.model.qwen3_guard_model import HEAD_PARAMETER_NAMES, Qwen3StreamGuard

IGNORED_WEIGHTS = ("lm_head.weight",)  # present in some checkpoints, unused for moderation


def weight_files(path: Path) -> list[Path]:
    """The safetensors files of a checkpoint, single-file or sharded."""
    index = path / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
        return [path / s for s in shards]
    single = path / "model.safetensors"
    if single.is_file():
        return [single]
    raise CheckpointError(f"{path} has neither model.safetensors nor model.safetensors.index.json")


def official_to_module_name(name: str) -> str | None:
    """Map a checkpoint tensor name to our parameter name; None for tensors we ignore."""
    if name in IGNORED_WEIGHTS:
        return None
    if name.startswith("model."):
        return name
    prefix, _, rest = name.partition(".")
    if prefix in HEAD_PARAMETER_NAMES:
        return f"{HEAD_PARAMETER_NAMES[prefix]}.{rest}"
    raise CheckpointError(f"unexpected tensor {name!r} in the checkpoint")


def read_state_dict(path: Path, dtype: torch.dtype) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = {}
    for file in weight_files(path):
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():  # noqa: SIM118 - safe_open has no __iter__
                target = official_to_module_name(name)
                if target is not None:
                    state[target] = f.get_tensor(name).to(dtype)
    return state


@dataclass(frozen=True)
class LoadedGuard:
    path: Path
    config: StreamGuardConfig
    model: Qwen3StreamGuard


def load_stream_guard(path: str | Path, *, device: str = "cpu", dtype: torch.dtype = torch.float32) -> LoadedGuard:
    """Load config + weights into our model, on ``device`` in ``dtype``."""
    path = Path(path)
    config = StreamGuardConfig.from_dir(path)
    with torch.device("meta"):
        model = Qwen3StreamGuard(config)
    state = read_state_dict(path, dtype)
    expected = {k for k in model.state_dict() if not k.endswith("inv_freq")}
    missing = sorted(expected - state.keys())
    unexpected = sorted(state.keys() - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"checkpoint weights do not match the config: missing={missing[:8]} unexpected={unexpected[:8]}"
        )
    for name, tensor in state.items():
        want = model.get_parameter(name).shape
        if tensor.shape != want:
            raise CheckpointError(f"tensor {name} has shape {tuple(tensor.shape)}, config implies {tuple(want)}")
    model.load_state_dict(state, strict=False, assign=True)
    model.model.rotary = Rotary(config.head_dim, config.rope_theta)
    model.to(device=device)
    model.eval()
    model.pack()
    return LoadedGuard(path, config, model)
