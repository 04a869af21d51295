"""The demo Stream checkpoint: the real architecture and layout, tiny, trained in seconds on the
synthetic corpus so that the sidecar runs without downloadable weights.

It is NOT a safety model: it knows a few dozen phrases. It is also trained on broad ordinary text
in several languages (`guard.demo.safe_text`) and on random token ids, all Safe, so that text it
never saw passes instead of being cut. Everything that reports on it says so.
Training uses transformers' ``Qwen3Model`` (the reference implementation) plus the two head
stacks; the result is saved under the official tensor names and loaded like any checkpoint.
"""

from __future__ import annotations

import logging
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from guard.cache import cached_build
from guard.demo.corpus import UNSAFE_PROMPTS, UNSAFE_SENTENCES, DemoExample, coverage_corpus, generate_corpus
from guard.demo.safe_text import safe_conversation, safe_conversations, safe_sentences
from guard.model.config import DEMO_MARKER, StreamGuardConfig
from guard.model.labels import RiskLevel
from guard.model.qwen3_guard_model import GuardHead
from guard.text.conversation import GuardTokenizer, Message
from guard.text.offline_tokenizer import cached_qwen3_tokenizer_dir

log = logging.getLogger(__name__)

DEMO_VERSION = "stream-demo-v5"
SAFE_CHECKS = 192  # ordinary conversations the finished model must pass (besides the coverage corpus)
NOISE_CHECKS = 48  # random-id responses, and as many word-salad conversations, it must pass
_CHECK_SEED = 7919
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


def _encode_random(tok: GuardTokenizer, cfg: StreamGuardConfig, prompt: str, response: list[int]) -> _Encoded:
    """A safe prompt followed by arbitrary response ids (and the closing <|im_end|>), all Safe."""
    rendered = tok.render_prompt([Message("user", prompt)])
    ids = [*rendered.prompt_ids, *rendered.preamble_ids, *response, tok.im_end_id]
    safe_r = cfg.response_risk.index_of(RiskLevel.SAFE)
    n = len(response) + 1
    return _Encoded(
        ids=ids,
        response_from=len(rendered.prompt_ids) + len(rendered.preamble_ids),
        risk=[safe_r] * n,
        category=[-100] * n,
        prompt_end=len(rendered.prompt_ids) - 1,
        prompt_risk=cfg.query_risk.index_of(RiskLevel.SAFE),
        prompt_category=-100,
    )


def unsafe_phrase_ids(tok: GuardTokenizer) -> frozenset[int]:
    """Every token of the corpus's unsafe prompts and sentences (with and without a leading space)."""
    texts = [p for p, _ in UNSAFE_PROMPTS] + [s for s, _, _ in UNSAFE_SENTENCES]
    return frozenset(i for t in texts for variant in (t, " " + t) for i in tok.encode(variant))


def random_response_ids(
    tok: GuardTokenizer, rng: random.Random, length: int, excluded: frozenset[int] | None = None
) -> list[int]:
    """``length`` ids drawn uniformly from the tokenizer's ordinary vocabulary (no special tokens),
    leaving out ``excluded`` (default: the unsafe phrases' tokens): noise is not a sentence, so it is Safe."""
    excluded = unsafe_phrase_ids(tok) if excluded is None else excluded
    out: list[int] = []
    while len(out) < length:
        tid = rng.randrange(tok.hf.vocab_size)
        if tid not in excluded:
            out.append(tid)
    return out


def word_ids(tok: GuardTokenizer, excluded: frozenset[int]) -> list[int]:
    """Ids of whole English words with a leading space (" river", " Monday"), less ``excluded``."""
    tokens = tok.hf.convert_ids_to_tokens(list(range(tok.hf.vocab_size)))
    return [i for i, t in enumerate(tokens) if _WORD.fullmatch(t) and i not in excluded]


_WORD = re.compile(r"\u0120[A-Za-z]{2,}")  # byte-level BPE writes the leading space as U+0120


def broad_safe_examples(n: int, seed: int) -> list[DemoExample]:
    """Ordinary conversations in several languages (`guard.demo.safe_text`), all Safe."""
    return [DemoExample(p, r, "Safe", None, None, "Safe", None) for p, r in safe_conversations(n, seed)]


def mixed_examples(n: int, seed: int) -> list[DemoExample]:
    """The corpus's unsafe sentences inside broad safe text: an unsafe phrase is unsafe whatever
    surrounds it, and the safe text around it stays safe."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        lead, tail = safe_sentences(rng, 2)
        sentence, category, risk = rng.choice(UNSAFE_SENTENCES)
        prompt = safe_conversation(rng)[0]
        response = f"{lead} {sentence}" + (f" {tail}" if rng.random() < 0.5 else "")
        out.append(DemoExample(prompt, response, "Safe", None, len(lead), risk, category))
    return out


def _noise_examples(
    tok: GuardTokenizer, cfg: StreamGuardConfig, n: int, seed: int, excluded: frozenset[int]
) -> list[_Encoded]:
    rng = random.Random(seed)
    return [
        _encode_random(tok, cfg, safe_conversation(rng)[0], random_response_ids(tok, rng, rng.randint(4, 64), excluded))
        for _ in range(n)
    ]


def _salad_examples(
    tok: GuardTokenizer, cfg: StreamGuardConfig, n: int, seed: int, words: list[int]
) -> list[_Encoded]:
    """Word salad: random English words as the response (and, half the time, as the prompt). Any
    run of ordinary words is Safe; only the corpus's phrases are not."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        response = [rng.choice(words) for _ in range(rng.randint(4, 48))]
        if rng.random() < 0.5:
            prompt = tok.hf.decode([rng.choice(words) for _ in range(rng.randint(3, 12))]).strip() + "?"
        else:
            prompt = safe_conversation(rng)[0]
        out.append(_encode_random(tok, cfg, prompt, response))
    return out


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


def train_demo_checkpoint(out_dir: Path, *, steps: int = 400, seed: int = 0, max_rounds: int = 12) -> Path:
    """Train and write the demo checkpoint (official layout, tokenizer included); training goes on
    until every case of `coverage_corpus` behaves (see `_behaves`)."""
    from transformers import Qwen3Config, Qwen3Model

    from guard.model.checkpoint_writer import (
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
    broad = [_encode(tok, cfg, ex) for ex in broad_safe_examples(1536, seed=seed + 1)]
    mixed = [_encode(tok, cfg, ex) for ex in mixed_examples(512, seed=seed + 2)]
    excluded = unsafe_phrase_ids(tok)
    noise = _noise_examples(tok, cfg, 512, seed + 3, excluded)
    words = word_ids(tok, excluded)
    salad = _salad_examples(tok, cfg, 512, seed + 4, words)
    # What must behave before the model is written: every phrase in every role, plus safe text
    # and noise drawn with seeds of their own (so they are checked, not only trained on).
    coverage = [_encode(tok, cfg, ex) for ex in coverage_corpus()]
    coverage += [_encode(tok, cfg, ex) for ex in broad_safe_examples(SAFE_CHECKS, seed=_CHECK_SEED)]
    coverage += _noise_examples(tok, cfg, NOISE_CHECKS, _CHECK_SEED, excluded)
    coverage += _salad_examples(tok, cfg, NOISE_CHECKS, _CHECK_SEED, words)
    pools = ((data, 12), (broad, 10), (mixed, 3), (noise, 3), (salad, 4))  # (examples, per batch of 32)
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
                    log.debug("event=demo_wrong index=%d", start + b)
        for m in modules:
            m.train()
        return wrong

    def sample(scale: float) -> list[_Encoded]:
        """A batch drawn from every pool in its share (``scale`` 1.0: 32 examples)."""
        out = []
        for pool, k in pools:
            pick = torch.randint(0, len(pool), (max(1, round(k * scale)),), generator=gen).tolist()
            out += [pool[i] for i in pick]
        return out

    safe_r = cfg.response_risk.index_of(RiskLevel.SAFE)
    for m in modules:
        m.train()
    for step in range(steps):
        loss = train_step(sample(1.0))
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
        # A quarter of the batch from the misses, the rest from the pools: more, and fixing one
        # case breaks others (the broad safe text shares words with the unsafe phrases).
        for _ in range(20):
            pick_wrong = torch.randint(0, len(wrong), (8,), generator=gen).tolist()
            train_step([wrong[i] for i in pick_wrong] + sample(0.75))

    state = {f"model.{k}": v.detach() for k, v in backbone.state_dict().items()}
    state.update({f"response_head.{k}": v.detach() for k, v in response_head.state_dict().items()})
    state.update({f"query_head.{k}": v.detach() for k, v in query_head.state_dict().items()})
    write_checkpoint(out_dir, cfg_dict, module_to_official_names(state), tokenizer_dir=tok_dir)
    log.info("event=demo_built path=%s seconds=%.1f", out_dir, time.perf_counter() - started)
    return out_dir


def demo_checkpoint_dir(rebuild: bool = False) -> Path:
    """The cached demo checkpoint, trained on first use (under a minute and a half on 2 idle CPU cores)."""
    return cached_build(DEMO_VERSION, train_demo_checkpoint, rebuild=rebuild)
