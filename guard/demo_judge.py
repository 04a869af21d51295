"""The demo Generative judge: a tiny Qwen3ForCausalLM in the real checkpoint layout, trained in
seconds to answer the official instruction in the official format on the synthetic corpus.

NOT a safety model. Its tokenizer ships the Qwen3Guard-Gen chat template (the instruction), so
it is rendered and parsed exactly like a real Qwen3Guard-Gen checkpoint.
"""

from __future__ import annotations

import logging
import os
import random
import shutil
import tempfile
import time
from importlib import resources
from pathlib import Path

import torch

from guard.cache import cache_dir
from guard.config import DEMO_MARKER
from guard.demo_corpus import SAFE_PROMPTS, SAFE_SENTENCES, UNSAFE_PROMPTS, UNSAFE_SENTENCES
from guard.offline_tokenizer import cached_qwen3_tokenizer_dir

log = logging.getLogger(__name__)

JUDGE_VERSION = "judge-demo-v2"
JUDGE_NOTICE = "DEMO JUDGE: trained in seconds on a synthetic phrase list; it is not a safety model"
# Stream short names -> Generative names.
GEN_NAME = {
    "Violent": "Violent",
    "PII": "PII",
    "Self-Harm": "Suicide & Self-Harm",
    "Illegal Acts": "Non-violent Illegal Acts",
    "Political": "Politically Sensitive Topics",
    "Jailbreak": "Jailbreak",
}
REFUSALS = (
    "I'm sorry, but I can't help with that.",
    "I cannot assist with this request.",
    "Sorry, I won't provide that information.",
)


def gen_chat_template() -> str:
    return resources.files("guard").joinpath("templates/qwen3guard_gen_template.jinja").read_text()


def judge_examples(n: int, seed: int = 0) -> list[tuple[list[dict], str]]:
    """(conversation, expected output) pairs in the official format."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        if rng.random() < 0.5:  # prompt moderation
            if rng.random() < 0.5:
                prompt, answer = rng.choice(SAFE_PROMPTS), "Safety: Safe\nCategories: None"
            else:
                prompt, category = rng.choice(UNSAFE_PROMPTS)
                answer = f"Safety: Unsafe\nCategories: {GEN_NAME[category]}"
            out.append(([{"role": "user", "content": prompt}], answer))
            continue
        prompt = rng.choice(SAFE_PROMPTS) if rng.random() < 0.6 else rng.choice(UNSAFE_PROMPTS)[0]
        kind = rng.random()
        if kind < 0.35:
            response, answer = rng.choice(SAFE_SENTENCES), "Safety: Safe\nCategories: None\nRefusal: No"
        elif kind < 0.55:
            response, answer = rng.choice(REFUSALS), "Safety: Safe\nCategories: None\nRefusal: Yes"
        else:
            sentence, category, risk = rng.choice(UNSAFE_SENTENCES)
            response = f"{rng.choice(SAFE_SENTENCES)} {sentence}" if rng.random() < 0.5 else sentence
            answer = f"Safety: {risk}\nCategories: {GEN_NAME[category]}\nRefusal: No"
        out.append(([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], answer))
    return out


def train_demo_judge(out_dir: Path, *, steps: int = 280, seed: int = 0) -> Path:
    from transformers import AutoTokenizer, Qwen3Config, Qwen3ForCausalLM

    started = time.perf_counter()
    torch.manual_seed(seed)
    tokenizer = AutoTokenizer.from_pretrained(str(cached_qwen3_tokenizer_dir()))
    tokenizer.chat_template = gen_chat_template()
    config = Qwen3Config(
        vocab_size=151936,
        hidden_size=96,
        intermediate_size=192,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=24,
        tie_word_embeddings=True,
        max_position_embeddings=4096,
        rope_theta=1_000_000.0,
        eos_token_id=151645,
        bos_token_id=151643,
        pad_token_id=151643,
    )
    model = Qwen3ForCausalLM(config)
    rows = []
    for messages, answer in judge_examples(800, seed):
        prompt = tokenizer.encode(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False)
        target = tokenizer.encode(answer + "<|im_end|>", add_special_tokens=False)
        rows.append((prompt, target))
    # Keep a step cheap on a 151,936-token vocabulary: only the embedding rows the corpus uses are
    # trained (a small delta table, added back at the end), and the loss ranks only the tokens
    # that answers use (the tied output layer).
    embedding = model.model.embed_tokens.weight
    embedding.requires_grad_(False)
    used = sorted({tok for prompt, target in rows for tok in prompt + target} | {config.pad_token_id})
    row_of = torch.zeros(config.vocab_size, dtype=torch.long)
    row_of[torch.tensor(used)] = torch.arange(len(used))
    delta = torch.nn.Parameter(torch.zeros(len(used), config.hidden_size))
    answer_vocab = sorted({tok for _, target in rows for tok in target})
    candidates = torch.tensor(answer_vocab)
    slot_of = {tok: i for i, tok in enumerate(answer_vocab)}
    # The answer's decisions (the first token of Safe/Unsafe/Controversial, of the category, of
    # Yes/No) weigh more than its fixed wording, which the model learns in a few steps anyway.
    decision_words = [
        " Safe",
        " Unsafe",
        " Controversial",
        " Yes",
        " No",
        " None",
        *(f" {n}" for n in GEN_NAME.values()),
    ]
    decisions = {tokenizer.encode(word, add_special_tokens=False)[0] for word in decision_words}
    weight_of = torch.tensor([5.0 if tok in decisions else 1.0 for tok in answer_vocab])
    params = [p for p in model.parameters() if p.requires_grad] + [delta]
    opt = torch.optim.AdamW(params, lr=6e-3, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=6e-3, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(seed)
    pad = config.pad_token_id
    model.train()
    for step in range(steps):
        batch = [rows[i] for i in torch.randint(0, len(rows), (12,), generator=gen).tolist()]
        length = max(len(p) + len(t) for p, t in batch)
        ids = torch.full((len(batch), length), pad)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        positions, targets = [], []
        for b, (p, t) in enumerate(batch):
            seq = p + t
            ids[b, : len(seq)] = torch.tensor(seq)
            mask[b, : len(seq)] = 1
            for k, tok in enumerate(t):  # predict target token k from the position before it
                positions.append((b, len(p) + k - 1))
                targets.append(tok)
        embeds = embedding[ids] + delta[row_of[ids]]  # [B, T, hidden]
        hidden = model.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        rows_idx = torch.tensor([b for b, _ in positions])
        cols_idx = torch.tensor([c for _, c in positions])
        h = hidden[rows_idx, cols_idx]  # only the answer positions: [N, hidden]
        logits = h @ (embedding[candidates] + delta[row_of[candidates]]).T  # [N, answer vocabulary]
        labels = torch.tensor([slot_of[t] for t in targets])
        loss = torch.nn.functional.cross_entropy(logits, labels, weight=weight_of)
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if step % 40 == 0 or step == steps - 1:
            log.info("event=judge_train step=%d loss=%.4f", step, loss.item())
    with torch.no_grad():
        embedding[torch.tensor(used)] += delta  # fold the trained rows into the (tied) embedding
    model.eval()
    model.config.update({DEMO_MARKER: {"version": JUDGE_VERSION, "notice": JUDGE_NOTICE}})
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    log.info("event=judge_built path=%s seconds=%.1f", out_dir, time.perf_counter() - started)
    return out_dir


def demo_judge_dir(rebuild: bool = False) -> Path:
    """The cached demo judge checkpoint, trained on first use."""
    target = cache_dir() / JUDGE_VERSION
    if rebuild:
        shutil.rmtree(target, ignore_errors=True)
    if (target / "config.json").exists():
        return target
    tmp = Path(tempfile.mkdtemp(prefix="judge-", dir=cache_dir()))
    try:
        train_demo_judge(tmp)
        try:
            os.replace(tmp, target)
        except OSError:
            if not (target / "config.json").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
