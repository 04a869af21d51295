"""Our batched, cached Qwen3 forward equals transformers' Qwen3Model + the head stacks (fp32, 1e-4)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from transformers import Qwen3Config, Qwen3Model
from transformers.models.qwen3.modeling_qwen3 import Qwen3RMSNorm

from guard.model.checkpoint import load_stream_guard, weight_files
from guard.model.kv_cache import StepLayout, StepRow
from guard.text.conversation import Message

TOL = 1e-4
HEADS = {
    "response": ("risk_level_category_pre", "risk_level_category_layernorm", "risk_level_head", "category_head"),
    "query": (
        "query_risk_level_category_pre",
        "query_risk_level_category_layernorm",
        "query_risk_level_head",
        "query_category_head",
    ),
}


def reference_logits(path, ids: torch.Tensor) -> dict[str, torch.Tensor]:
    """transformers' Qwen3Model, then each head stack built from the checkpoint tensors."""
    cfg = json.loads((path / "config.json").read_text())
    tensors = {}
    for f in weight_files(path):
        tensors.update(load_file(str(f)))
    backbone = Qwen3Model(Qwen3Config(**cfg))
    assert backbone.config.rope_parameters["rope_theta"] == cfg["rope_theta"]
    backbone.load_state_dict({k[len("model.") :]: v for k, v in tensors.items() if k.startswith("model.")})
    backbone.eval()
    with torch.no_grad():
        hidden = backbone(input_ids=ids[None]).last_hidden_state[0]  # [T, hidden]
        out = {}
        for head, (pre, norm, risk, cat) in HEADS.items():
            rms = Qwen3RMSNorm(cfg["guard_inner_size"], eps=cfg["rms_norm_eps"])
            rms.weight.copy_(tensors[f"{norm}.weight"])
            x = rms(F.linear(hidden, tensors[f"{pre}.weight"]))
            out[f"{head}_risk"] = F.linear(x, tensors[f"{risk}.weight"])
            out[f"{head}_category"] = F.linear(x, tensors[f"{cat}.weight"])
    return out


def our_logits(model, cache, slot: int, ids: torch.Tensor, chunks: list[int]) -> dict[str, torch.Tensor]:
    """Prefill/continue through the KV cache in the given chunk sizes; collect all four logits."""
    outs = {k: [] for k in ("response_risk", "response_category", "query_risk", "query_category")}
    start = 0
    for n in chunks:
        layout = StepLayout([StepRow(slot, start, n)], torch.device("cpu"))
        hidden = model.step(ids[start : start + n], layout, cache)
        with torch.inference_mode():
            for head in ("response", "query"):
                logits = getattr(model, f"{head}_head")(hidden)
                outs[f"{head}_risk"].append(logits.risk)
                outs[f"{head}_category"].append(logits.category)
        start += n
    return {k: torch.cat(v) for k, v in outs.items()}


@pytest.mark.parametrize("name", ["tied-gqa", "untied-mha-sharded", "long-labels", "demo"])
@pytest.mark.parametrize("schedule", ["prefill", "prefill-then-token-by-token", "uneven-chunks"])
def test_all_four_logits_match_transformers(request, checkpoints, guard_tokenizer, name, schedule):
    path = request.getfixturevalue("demo_dir") if name == "demo" else checkpoints[name]
    messages = [
        {"role": "user", "content": "How do I water tomato plants? 你好 😀"},
        {"role": "assistant", "content": "Early in the morning, at the roots.  Twice a week!"},
    ]
    ids = torch.tensor(guard_tokenizer.render_ids([Message(**m) for m in messages]))
    n = len(ids)
    chunks = {
        "prefill": [n],
        "prefill-then-token-by-token": [n // 2] + [1] * (n - n // 2),
        "uneven-chunks": [5, 1, 7, 3, n - 16],
    }[schedule]
    guard = load_stream_guard(path)
    cache = guard.model.new_cache(max_slots=4, max_tokens=256)
    slot = cache.allocate()
    cache.reserve_tokens(n)
    ours = our_logits(guard.model, cache, slot, ids, chunks)
    ref = reference_logits(path, ids)
    for key, expected in ref.items():
        assert ours[key].shape == expected.shape, key
        diff = (ours[key] - expected).abs().max().item()
        assert diff < TOL, f"{key}: max abs diff {diff:.2e}"
