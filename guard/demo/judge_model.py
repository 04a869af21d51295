"""The demo Generative judge: a tiny Qwen3ForCausalLM in the real checkpoint layout, trained in
seconds to answer the official instruction in the official format on the synthetic corpus.

NOT a safety model. Its tokenizer ships the Qwen3Guard-Gen chat template (the instruction), so
it is rendered and parsed exactly like a real Qwen3Guard-Gen checkpoint.
"""

from __future__ import annotations

import logging
import math
import random
import time
from importlib import resources
from pathlib import Path

import torch

from guard.cache import cached_build
from guard.demo.corpus import SAFE_PROMPTS, SAFE_SENTENCES, UNSAFE_PROMPTS, UNSAFE_SENTENCES
from guard.model.config import DEMO_MARKER
from guard.text.offline_tokenizer import cached_qwen3_tokenizer_dir

log = logging.getLogger(__name__)

JUDGE_VERSION = "judge-demo-v3"
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


def coverage_examples() -> list[tuple[list[dict], str]]:
    """Every case the corpus can produce, once: each prompt alone, and each kind of response
    (safe, refusal, unsafe alone, unsafe after every safe sentence) after a rotating mix of safe
    and unsafe prompts. Training is not finished until the model answers all of them exactly."""
    prompts = [*SAFE_PROMPTS, *(p for p, _ in UNSAFE_PROMPTS)]
    out: list[tuple[list[dict], str]] = [
        ([{"role": "user", "content": p}], "Safety: Safe\nCategories: None") for p in SAFE_PROMPTS
    ]
    out += [([{"role": "user", "content": p}], f"Safety: Unsafe\nCategories: {GEN_NAME[c]}") for p, c in UNSAFE_PROMPTS]
    responses = [(s, "Safety: Safe\nCategories: None\nRefusal: No") for s in SAFE_SENTENCES]
    responses += [(r, "Safety: Safe\nCategories: None\nRefusal: Yes") for r in REFUSALS]
    for sentence, category, risk in UNSAFE_SENTENCES:
        answer = f"Safety: {risk}\nCategories: {GEN_NAME[category]}\nRefusal: No"
        responses.append((sentence, answer))
        responses += [(f"{safe} {sentence}", answer) for safe in SAFE_SENTENCES]
    for i, (response, answer) in enumerate(responses):
        for prompt in (prompts[i % len(prompts)], prompts[(i * 7 + 3) % len(prompts)]):
            out.append(([{"role": "user", "content": prompt}, {"role": "assistant", "content": response}], answer))
    return out


def one_cycle_lr(progress: float, peak: float) -> float:
    """Warm up over the first 10 % of training, then cosine down to peak / 100."""
    if progress < 0.1:
        return peak * progress / 0.1
    return peak * (0.01 + 0.99 * 0.5 * (1 + math.cos(math.pi * (progress - 0.1) / 0.9)))


class _Trainer:
    """Trains the tiny judge cheaply on a 151,936-token vocabulary: only the embedding rows the
    corpus uses are trained (a small delta table, folded back at the end), and the loss ranks only
    the tokens that answers use (the output layer is tied to the embedding)."""

    def __init__(self, model, tokenizer, rows: list[tuple[list[int], list[int]]], seed: int) -> None:
        config = model.config
        self.model = model
        self.pad = config.pad_token_id
        self.embedding = model.model.embed_tokens.weight
        self.embedding.requires_grad_(False)
        used = sorted({tok for prompt, target in rows for tok in prompt + target} | {self.pad})
        self.used = torch.tensor(used)
        self.row_of = torch.zeros(config.vocab_size, dtype=torch.long)
        self.row_of[self.used] = torch.arange(len(used))
        self.delta = torch.nn.Parameter(torch.zeros(len(used), config.hidden_size))
        answer_vocab = sorted({tok for _, target in rows for tok in target})
        self.candidates = torch.tensor(answer_vocab)
        self.slot_of = {tok: i for i, tok in enumerate(answer_vocab)}
        # The answer's decisions (the first token of Safe/Unsafe/Controversial, of the category,
        # of Yes/No) weigh more than its fixed wording, which the model learns in a few steps.
        decision_words = [" Safe", " Unsafe", " Controversial", " Yes", " No", " None"]
        decision_words += [f" {n}" for n in GEN_NAME.values()]
        decisions = {tokenizer.encode(word, add_special_tokens=False)[0] for word in decision_words}
        self.weight_of = torch.tensor([5.0 if tok in decisions else 1.0 for tok in answer_vocab])
        params = [p for p in model.parameters() if p.requires_grad] + [self.delta]
        self.opt = torch.optim.AdamW(params, lr=6e-3, weight_decay=0.0)
        self.gen = torch.Generator().manual_seed(seed)

    def _hidden(self, batch: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, list[int]]:
        """Hidden states at the positions that predict each answer token, and those tokens."""
        length = max(len(p) + len(t) for p, t in batch)
        ids = torch.full((len(batch), length), self.pad)
        mask = torch.zeros((len(batch), length), dtype=torch.long)
        rows_idx, cols_idx, targets = [], [], []
        for b, (p, t) in enumerate(batch):
            seq = p + t
            ids[b, : len(seq)] = torch.tensor(seq)
            mask[b, : len(seq)] = 1
            for k, tok in enumerate(t):  # target token k is predicted from the position before it
                rows_idx.append(b)
                cols_idx.append(len(p) + k - 1)
                targets.append(tok)
        embeds = self.embedding[ids] + self.delta[self.row_of[ids]]
        hidden = self.model.model(inputs_embeds=embeds, attention_mask=mask).last_hidden_state
        return hidden[torch.tensor(rows_idx), torch.tensor(cols_idx)], targets

    def step(self, batch: list[tuple[list[int], list[int]]], lr: float) -> float:
        for group in self.opt.param_groups:
            group["lr"] = lr
        h, targets = self._hidden(batch)
        logits = h @ (self.embedding[self.candidates] + self.delta[self.row_of[self.candidates]]).T
        labels = torch.tensor([self.slot_of[t] for t in targets])
        loss = torch.nn.functional.cross_entropy(logits, labels, weight=self.weight_of)
        self.opt.zero_grad()
        loss.backward()
        self.opt.step()
        return loss.item()

    def sample(self, rows: list, n: int) -> list:
        return [rows[i] for i in torch.randint(0, len(rows), (n,), generator=self.gen).tolist()]

    @torch.no_grad()
    def mistakes(self, rows: list[tuple[list[int], list[int]]]) -> list[tuple[list[int], list[int]]]:
        """The rows that greedy decoding over the FULL vocabulary would not answer exactly
        (teacher forcing: every answer token must be the argmax at its position)."""
        self.model.eval()
        output = self.embedding.clone()
        output[self.used] += self.delta
        wrong = []
        for start in range(0, len(rows), 32):
            batch = rows[start : start + 32]
            h, targets = self._hidden(batch)
            hits = (h @ output.T).argmax(-1) == torch.tensor(targets)
            offset = 0
            for row in batch:
                if not bool(hits[offset : offset + len(row[1])].all()):
                    wrong.append(row)
                offset += len(row[1])
        self.model.train()
        return wrong

    @torch.no_grad()
    def fold(self) -> None:
        self.embedding[self.used] += self.delta


def train_demo_judge(out_dir: Path, *, steps: int = 280, seed: int = 0, max_rounds: int = 12) -> Path:
    """Train on a random draw of the corpus, then keep training on what is still answered wrong
    until every case of `coverage_examples` is exact: float rounding differs between CPUs, so a
    fixed step count alone gives a model that is right on one machine and wrong on another."""
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

    def encode(examples: list[tuple[list[dict], str]]) -> list[tuple[list[int], list[int]]]:
        return [
            (
                tokenizer.encode(tokenizer.apply_chat_template(messages, tokenize=False), add_special_tokens=False),
                tokenizer.encode(answer + "<|im_end|>", add_special_tokens=False),
            )
            for messages, answer in examples
        ]

    rows = encode(judge_examples(800, seed))
    coverage = encode(coverage_examples())
    trainer = _Trainer(model, tokenizer, rows + coverage, seed)
    model.train()
    peak = 6e-3
    for step in range(steps):
        loss = trainer.step(trainer.sample(rows, 12), one_cycle_lr(step / steps, peak))
        if step % 40 == 0 or step == steps - 1:
            log.info("event=judge_train step=%d loss=%.4f", step, loss)
    for round_ in range(max_rounds):
        wrong = trainer.mistakes(coverage)
        log.info("event=judge_check round=%d wrong=%d of=%d", round_, len(wrong), len(coverage))
        if not wrong:
            break
        for _ in range(30):  # half the batch from the misses, half from the whole corpus
            trainer.step(trainer.sample(wrong, 6) + trainer.sample(rows + coverage, 6), 1e-3)
    else:
        wrong = trainer.mistakes(coverage)
        if wrong:
            raise RuntimeError(f"demo judge still answers {len(wrong)} of {len(coverage)} cases wrong after training")
    trainer.fold()
    model.eval()
    model.config.update({DEMO_MARKER: {"version": JUDGE_VERSION, "notice": JUDGE_NOTICE}})
    model.save_pretrained(str(out_dir))
    tokenizer.save_pretrained(str(out_dir))
    log.info("event=judge_built path=%s seconds=%.1f", out_dir, time.perf_counter() - started)
    return out_dir


def demo_judge_dir(rebuild: bool = False) -> Path:
    """The cached demo judge checkpoint, trained on first use."""
    return cached_build(JUDGE_VERSION, train_demo_judge, rebuild=rebuild)
