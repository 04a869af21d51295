"""The demo Stream checkpoint: the real architecture and layout, tiny, trained in seconds on the
synthetic corpus so that the sidecar runs without downloadable weights.

It is NOT a safety model: it knows a few dozen phrases. Everything that reports on it says so.
Training uses transformers' ``Qwen3Model`` (the reference implementation) plus the two head
stacks; the result is saved under the official tensor names and loaded like any checkpoint.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from guard.cache import cache_dir
from guard.config import DEMO_MARKER, StreamGuardConfig
from guard.conversation import GuardTokenizer, Message
from guard.demo_corpus import DemoExample, coverage_corpus, generate_corpus
from guard.labels import RiskLevel
from guard.offline_tokenizer import cached_qwen3_tokenizer_dir
from guard.qwen3_guard_model import GuardHead

log = logging.getLogger(__name__)

DEMO_VERSION = "stream-demo-v3"
DEMO_NOTICE = "DEMO MODEL: trained in seconds on a synthetic phrase list; it is not a safety model"


@dataclass(frozen=True)
class _Encoded:
    ids: list[int]
    response_from: int  # index of the first response token
    risk: list[int]  # label index per response token (response head)
    category: list[int]  # category index per response token, -100 where Safe
    prompt_end: int  # index of the prompt's <|im_end|>
    prompt_risk: int
    prompt_category: int  # -100 when Safe


def _encode(tok: GuardTokenizer, cfg: StreamGuardConfig, ex: DemoExample) -> _Encoded:
    rendered, response = tok.split_response([Message("user", ex.prompt), Message("assistant", ex.response)])
    ids = [*rendered.prompt_ids, *rendered.preamble_ids, *response]
    safe_r = cfg.response_risk.index_of(RiskLevel.SAFE)
    span_from = len(response)
    risk_index = safe_r
    cat_index = -100
    if ex.unsafe_from_char is not None:
        prefix = tok.encode(ex.response[: ex.unsafe_from_char])
        if response[: len(prefix)] != prefix:
            raise ValueError(f"unsafe span of {ex.response!r} does not start on a token boundary")
        span_from = len(prefix)
        risk_index = cfg.response_risk.labels.names.index(ex.response_risk)
        cat_index = cfg.response_categories.names.index(ex.response_category)
    risk = [safe_r if i < span_from else risk_index for i in range(len(response))]
    category = [-100 if i < span_from else cat_index for i in range(len(response))]
    return _Encoded(
        ids=ids,
        response_from=len(rendered.prompt_ids) + len(rendered.preamble_ids),
        risk=risk,
        category=category,
        prompt_end=len(rendered.prompt_ids) - 1,
        prompt_risk=cfg.query_risk.labels.names.index(ex.prompt_risk),
        prompt_category=-100 if ex.prompt_category is None else cfg.query_categories.names.index(ex.prompt_category),
    )


def _batch(items: list[_Encoded], pad_id: int):
    n = max(len(e.ids) for e in items)
    ids = torch.full((len(items), n), pad_id)
    mask = torch.zeros((len(items), n), dtype=torch.long)
    risk = torch.full((len(items), n), -100)
    cat = torch.full((len(items), n), -100)
    for b, e in enumerate(items):
        ids[b, : len(e.ids)] = torch.tensor(e.ids)
        mask[b, : len(e.ids)] = 1
        risk[b, e.response_from : len(e.ids)] = torch.tensor(e.risk)
        cat[b, e.response_from : len(e.ids)] = torch.tensor(e.category)
    ends = torch.tensor([e.prompt_end for e in items])
    q_risk = torch.tensor([e.prompt_risk for e in items])
    q_cat = torch.tensor([e.prompt_category for e in items])
    return ids, mask, risk, cat, ends, q_risk, q_cat


def _behaves(e: _Encoded, risk: torch.Tensor, category: torch.Tensor, q, b: int, safe_r: int) -> bool:
    """What the sidecar's tests and demo rely on, by argmax: the prompt verdict (and category when
    unsafe); no non-safe token before the unsafe span; inside the span every token from its third
    on has the span's risk and category (the first two may lag: " To" is not yet a bomb recipe)."""
    if int(q.risk[b].argmax()) != e.prompt_risk:
        return False
    if e.prompt_category != -100 and int(q.category[b].argmax()) != e.prompt_category:
        return False
    response_risk = risk[e.response_from : len(e.ids)].tolist()
    response_category = category[e.response_from : len(e.ids)].tolist()
    for i, (want, want_category) in enumerate(zip(e.risk, e.category, strict=True)):
        if want == safe_r:
            if response_risk[i] != safe_r:
                return False
            continue
        lag = (i > 0 and e.risk[i - 1] == safe_r) or (i > 1 and e.risk[i - 2] == safe_r)
        if not lag and (response_risk[i] != want or response_category[i] != want_category):
            return False
    return True


def train_demo_checkpoint(out_dir: Path, *, steps: int = 240, seed: int = 0, max_rounds: int = 12) -> Path:
    """Train and write the demo checkpoint (official layout, tokenizer included); training goes on
    until every case of `coverage_corpus` behaves (see `_behaves`)."""
    from transformers import Qwen3Config, Qwen3Model

    from guard.checkpoint_writer import (
        SHAPES,
        module_to_official_names,
        random_official_weights,
        stream_guard_config,
        write_checkpoint,
    )

    started = time.perf_counter()
    torch.manual_seed(seed)
    tok_dir = cached_qwen3_tokenizer_dir()
    tok = GuardTokenizer.from_dir(tok_dir)
    marker = {DEMO_MARKER: {"version": DEMO_VERSION, "notice": DEMO_NOTICE}}
    cfg_dict = stream_guard_config(**SHAPES["demo"], extra=marker)
    cfg = StreamGuardConfig.from_dict(cfg_dict)
    backbone = Qwen3Model(Qwen3Config(**cfg_dict))  # extra guard fields are carried, unused
    # Start from the same random weights a fixture would write, then train all but the embedding.
    init = random_official_weights(cfg_dict, seed)
    backbone.load_state_dict({k[len("model.") :]: v for k, v in init.items() if k.startswith("model.")})
    backbone.embed_tokens.weight.requires_grad_(False)
    eps, inner, hidden = cfg.rms_norm_eps, cfg.guard_inner_size, cfg.hidden_size
    response_head = GuardHead(hidden, inner, eps, len(cfg.response_risk.labels), len(cfg.response_categories))
    query_head = GuardHead(hidden, inner, eps, len(cfg.query_risk.labels), len(cfg.query_categories))
    params = [p for m in (backbone, response_head, query_head) for p in m.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=3e-3, total_steps=steps, pct_start=0.1)

    data = [_encode(tok, cfg, ex) for ex in generate_corpus(1024, seed=seed)]
    coverage = [_encode(tok, cfg, ex) for ex in coverage_corpus()]
    gen = torch.Generator().manual_seed(seed)
    ce = nn.CrossEntropyLoss(ignore_index=-100)
    pad = tok.hf.pad_token_id
    modules = (backbone, response_head, query_head)

    def forward(items: list[_Encoded]):
        ids, mask, risk, cat, ends, q_risk, q_cat = _batch(items, pad)
        hidden_states = backbone(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, T, H]
        q = query_head(hidden_states[torch.arange(len(items)), ends])
        return response_head(hidden_states), q, (risk, cat, q_risk, q_cat)

    def train_step(items: list[_Encoded]) -> float:
        r, q, (risk, cat, q_risk, q_cat) = forward(items)
        loss = (
            ce(r.risk.flatten(0, 1), risk.flatten())
            + ce(r.category.flatten(0, 1), cat.flatten())
            + ce(q.risk, q_risk)
            + ce(q.category, q_cat)
        )
        opt.zero_grad()
        loss.backward()
        opt.step()
        return loss.item()

    @torch.no_grad()
    def mistakes() -> list[_Encoded]:
        for m in modules:
            m.eval()
        wrong = []
        for start in range(0, len(coverage), 64):
            items = coverage[start : start + 64]
            r, q, _ = forward(items)
            for b, e in enumerate(items):
                if not _behaves(e, r.risk[b].argmax(-1), r.category[b].argmax(-1), q, b, safe_r):
                    wrong.append(e)
        for m in modules:
            m.train()
        return wrong

    safe_r = cfg.response_risk.index_of(RiskLevel.SAFE)
    for m in modules:
        m.train()
    for step in range(steps):
        pick = torch.randint(0, len(data), (32,), generator=gen).tolist()
        loss = train_step([data[i] for i in pick])
        sched.step()
        if step % 40 == 0 or step == steps - 1:
            log.info("event=demo_train step=%d loss=%.4f", step, loss)
    # Float rounding differs between CPUs, so a fixed step count alone can give a model that
    # behaves on one machine and not on another: train on what is still wrong until it is right.
    for group in opt.param_groups:
        group["lr"] = 3e-4
    for round_ in range(max_rounds + 1):
        wrong = mistakes()
        log.info("event=demo_check round=%d wrong=%d of=%d", round_, len(wrong), len(coverage))
        if not wrong:
            break
        if round_ == max_rounds:
            raise RuntimeError(f"demo model still misjudges {len(wrong)} of {len(coverage)} cases after training")
        for _ in range(20):  # half the batch from the misses, half from the corpus
            pick_wrong = torch.randint(0, len(wrong), (16,), generator=gen).tolist()
            pick = torch.randint(0, len(data), (16,), generator=gen).tolist()
            train_step([wrong[i] for i in pick_wrong] + [data[i] for i in pick])

    state = {f"model.{k}": v.detach() for k, v in backbone.state_dict().items()}
    state.update({f"response_head.{k}": v.detach() for k, v in response_head.state_dict().items()})
    state.update({f"query_head.{k}": v.detach() for k, v in query_head.state_dict().items()})
    write_checkpoint(out_dir, cfg_dict, module_to_official_names(state), tokenizer_dir=tok_dir)
    log.info("event=demo_built path=%s seconds=%.1f", out_dir, time.perf_counter() - started)
    return out_dir


def demo_checkpoint_dir(rebuild: bool = False) -> Path:
    """The cached demo checkpoint, trained on first use (about half a minute on 2 CPU cores)."""
    target = cache_dir() / DEMO_VERSION
    if rebuild:
        shutil.rmtree(target, ignore_errors=True)
    if (target / "config.json").exists():
        return target
    tmp = Path(tempfile.mkdtemp(prefix="demo-", dir=cache_dir()))
    try:
        train_demo_checkpoint(tmp)
        try:
            os.replace(tmp, target)
        except OSError:  # another process finished first; its copy is equivalent
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
