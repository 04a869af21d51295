"""The demo Reasoner: a tiny Qwen3ForCausalLM in the real checkpoint layout, with the real Qwen3
tokenizer and chat template, trained in seconds to answer a handful of showcase questions the way
a Qwen3 thinking model does, plus a sparse autoencoder (SAE) for one layer whose features name
reasoning strategies, so that steering and feature recall can be shown without downloadable weights.

It is NOT a reasoning model: it has memorised ``SHOWCASE`` and nothing else. With thinking on (the
prompt ends with ``<|im_start|>assistant\\n``) greedy decoding writes ``<think>\\n`` + the reasoning
+ ``\\n</think>\\n\\n`` + the answer + ``<|im_end|>``; with thinking off (the prompt ends with the
empty think block) it writes the answer + ``<|im_end|>``. A build only succeeds once the written
checkpoint, loaded through ``LocalCausalLM`` (the serving path), decodes every case exactly.

The SAE (``<checkpoint>/sae``, layer ``DEMO_SAE_LAYER``) has random features, except one planted
per strategy of the SAE-Steering paper (Fang et al. 2026) whose decoder direction promotes that
strategy's keywords through the trained model's unembedding: logit recall finds them, and adding
one to the residual stream (steering) visibly changes what the model writes.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch.nn import functional as F

from guard.cache import cached_build
from guard.demo.threads import one_thread
from guard.model.config import DEMO_MARKER
from guard.text.offline_tokenizer import cached_qwen3_tokenizer_dir, copy_tokenizer_files

log = logging.getLogger(__name__)

REASONER_VERSION = "reasoner-demo-v2"
REASONER_NOTICE = "DEMO REASONER: trained in seconds to repeat a few showcase answers; it is not a reasoning model"
# (prompt, reasoning, answer): the user turn, the text inside <think>...</think>, the reply after it.
# Some reasoning says "Wait" and "check", so that a trigger-based steering demo has something to fire on.
SHOWCASE: tuple[tuple[str, str, str], ...] = (
    (
        "What is 17 + 25?",
        "The question asks for the sum of 17 and 25. First add the tens, then the ones: 30 plus 12 is 42. "
        "Wait, let me check: 42 minus 25 is 17. Yes.",
        "17 + 25 = 42.",
    ),
    (
        "Is 91 a prime number?",
        "The question asks if 91 is prime. Suppose it is prime; then no small number divides it. "
        "Wait, check 7: 7 times 13 is 91. So it is not prime.",
        "No. 91 = 7 * 13, so it is not a prime number.",
    ),
    (
        "How many minutes are in 3 hours?",
        "One hour has 60 minutes. The plan: multiply 3 by 60, which gives 180. "
        "Let me verify: 180 divided by 60 is 3. Correct.",
        "There are 180 minutes in 3 hours.",
    ),
    (
        "Which is heavier, a kilogram of iron or a kilogram of feathers?",
        "This is a trick question. I assume iron, since iron feels heavier. But wait, both are one kilogram. "
        "Let me confirm: the mass is the same.",
        "Neither: both weigh exactly one kilogram.",
    ),
    (
        "What is the capital of Australia?",
        "The question asks for the capital of Australia. Sydney is the largest city, so one might guess Sydney. "
        "Wait, let me check that again. The capital is Canberra.",
        "The capital of Australia is Canberra.",
    ),
)

DEMO_SAE_LAYER = 1  # the decoder layer the SAE reads (and steering writes): the tiny model's last
DEMO_SAE_WIDTH = 256
# Strategy (the SAE-Steering paper's names, snake case) -> (planted feature, the keywords its
# decoder direction promotes). Every keyword occurs in SHOWCASE, so its unembedding row is trained.
STRATEGY_FEATURES: dict[str, tuple[int, tuple[str, ...]]] = {
    "problem_understanding": (11, (" question", " asks")),
    "procedural_planning": (42, (" First", " then", " plan")),
    "backtracking": (73, (" Wait", " wait", " check")),
    "multi_perspective_verification": (150, (" verify", " confirm", " check")),
    "hypothesis_reasoning": (201, (" Suppose", " assume", " if")),
}

THINK_OPEN, THINK_CLOSE, END_OF_TURN = "<think>", "</think>", "<|im_end|>"


def render_prompt(tokenizer: Any, prompt: str, *, thinking: bool) -> str:
    """The Qwen3 chat template's generation prompt for one user turn."""
    messages = [{"role": "user", "content": prompt}]
    return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True, enable_thinking=thinking)


def response_text(reasoning: str, answer: str, *, thinking: bool) -> str:
    """What the model writes after the generation prompt, end-of-turn token included."""
    if thinking:
        return f"{THINK_OPEN}\n{reasoning}\n{THINK_CLOSE}\n\n{answer}{END_OF_TURN}"
    return f"{answer}{END_OF_TURN}"


@dataclass(frozen=True)
class ShowcaseCase:
    """One showcase prompt in one thinking mode, as token ids."""

    index: int  # into SHOWCASE
    thinking: bool
    prompt_ids: list[int]
    response_ids: list[int]


def showcase_cases(tokenizer: Any) -> list[ShowcaseCase]:
    """Every SHOWCASE entry with thinking on and off (what training reads and the build checks)."""
    cases = []
    for index, (prompt, reasoning, answer) in enumerate(SHOWCASE):
        for thinking in (True, False):
            cases.append(
                ShowcaseCase(
                    index,
                    thinking,
                    tokenizer.encode(render_prompt(tokenizer, prompt, thinking=thinking), add_special_tokens=False),
                    tokenizer.encode(response_text(reasoning, answer, thinking=thinking), add_special_tokens=False),
                )
            )
    return cases


def single_token(tokenizer: Any, text: str) -> int:
    """The id of ``text``, which must be exactly one token."""
    ids = tokenizer.encode(text, add_special_tokens=False)
    if len(ids) != 1:
        raise ValueError(f"{text!r} is {len(ids)} tokens ({ids}) in this tokenizer, expected one")
    return ids[0]


class _Trainer:
    """Teacher-forced next-token training on the showcase cases, all of them in every batch.

    Cheap on a 151,936-token vocabulary: the embedding matrix (tied to the LM head) stays frozen
    and only the rows the cases use train, as a small delta table folded in before writing; the
    loss ranks those rows only, and ``mistakes`` checks the argmax over the FULL vocabulary."""

    def __init__(self, model: Any, cases: list[ShowcaseCase], pad_id: int) -> None:
        self.model = model
        self.cases = cases
        self.pad_id = pad_id
        self.embedding = model.model.embed_tokens.weight  # [vocab, D]; tied: also the LM head
        self.embedding.requires_grad_(False)
        used = sorted({t for c in cases for t in c.prompt_ids + c.response_ids} | {pad_id})
        self.used = torch.tensor(used)
        self.row_of = torch.zeros(self.embedding.shape[0], dtype=torch.long)
        self.row_of[self.used] = torch.arange(len(used))
        self.delta = torch.nn.Parameter(torch.zeros(len(used), self.embedding.shape[1]))  # [U, D]
        params = [p for p in model.parameters() if p.requires_grad] + [self.delta]
        self.opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)

    def _embed(self, ids: torch.Tensor) -> torch.Tensor:
        # F.embedding's backward is deterministic across threads (indexing's accumulate is not).
        return self.embedding[ids] + F.embedding(self.row_of[ids], self.delta)

    def _hidden(self, cases: list[ShowcaseCase]) -> tuple[torch.Tensor, torch.Tensor]:
        """Final hidden states [N, D] at the positions that predict each response token, and those tokens [N]."""
        sequences = [c.prompt_ids + c.response_ids for c in cases]
        width = max(len(s) for s in sequences)
        ids = torch.full((len(cases), width), self.pad_id, dtype=torch.long)  # [B, T], right padded
        mask = torch.zeros((len(cases), width), dtype=torch.long)
        rows, cols, targets = [], [], []
        for b, (case, seq) in enumerate(zip(cases, sequences, strict=True)):
            ids[b, : len(seq)] = torch.tensor(seq)
            mask[b, : len(seq)] = 1
            for k, token in enumerate(case.response_ids):  # response token k is predicted one position before it
                rows.append(b)
                cols.append(len(case.prompt_ids) + k - 1)
                targets.append(token)
        hidden = self.model.model(inputs_embeds=self._embed(ids), attention_mask=mask).last_hidden_state  # [B, T, D]
        return hidden[torch.tensor(rows), torch.tensor(cols)], torch.tensor(targets)

    def train(self, steps: int, peak: float, focus: list[ShowcaseCase] | None = None) -> float:
        """``steps`` full-batch steps on a one-cycle schedule; ``focus`` cases count twice."""
        from guard.demo.judge_model import one_cycle_lr

        batch = self.cases + (focus or [])
        labels_of = {t: i for i, t in enumerate(self.used.tolist())}
        self.model.train()
        loss = torch.tensor(0.0)
        for step in range(steps):
            for group in self.opt.param_groups:
                group["lr"] = one_cycle_lr(step / steps, peak)
            hidden, targets = self._hidden(batch)
            logits = hidden @ self._embed(self.used).T  # [N, U]
            loss = F.cross_entropy(logits, torch.tensor([labels_of[t] for t in targets.tolist()]))
            self.opt.zero_grad()
            loss.backward()
            self.opt.step()
            if step % 100 == 0 or step == steps - 1:
                log.info("event=reasoner_train step=%d loss=%.4f", step, loss.item())
        self.model.eval()
        return float(loss.item())

    @torch.no_grad()
    def mistakes(self, margin: float) -> list[ShowcaseCase]:
        """The cases where some response token is not the full-vocabulary argmax by at least ``margin``
        (teacher forcing: then greedy decoding follows the response exactly, with room for rounding)."""
        self.model.eval()
        output = self.embedding.clone()
        output[self.used] += self.delta
        wrong = []
        for case in self.cases:
            hidden, targets = self._hidden([case])
            logits = hidden @ output.T  # [N, vocab]
            right = logits.gather(1, targets[:, None]).squeeze(1)
            logits.scatter_(1, targets[:, None], float("-inf"))
            if bool((right - logits.max(-1).values < margin).any()):
                wrong.append(case)
        return wrong

    @torch.no_grad()
    def fold(self) -> None:
        """Move the delta table into the embedding matrix (what gets written)."""
        self.embedding[self.used] += self.delta
        self.delta.zero_()


def _served_misses(path: Path, cases: list[ShowcaseCase]) -> list[ShowcaseCase]:
    """The cases that greedy decoding through ``LocalCausalLM`` (the serving path) gets wrong."""
    from guard.reasoning.local_lm import LocalCausalLM

    lm = LocalCausalLM(path)
    misses = []
    for case in cases:
        out = list(lm.generate(case.prompt_ids, max_tokens=len(case.response_ids) + 8, stop_ids=lm.stop_ids))
        if out != case.response_ids:
            misses.append(case)
    return misses


def _background_features(unembedding: torch.Tensor, keyword_ids: list[int], seed: int) -> torch.Tensor:
    """Random unit decoder rows [width, D] orthogonal to every keyword's unembedding row.

    The demo's vocabulary is in effect the ~150 tokens SHOWCASE uses (only their rows are trained),
    so a random direction would rank keywords among its top tokens by chance and logit recall would
    find dozens of features. In a real SAE over a full vocabulary that is rare; keeping the random
    features blind to the keywords makes recall here find the planted features only, as it should."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.randn(DEMO_SAE_WIDTH, unembedding.shape[1], generator=generator)  # [width, D]
    basis = torch.linalg.qr(unembedding.detach().float()[keyword_ids].T).Q  # [D, K], spans the keyword rows
    rows = rows - (rows @ basis) @ basis.T
    return rows / rows.norm(dim=-1, keepdim=True)


def write_demo_sae(checkpoint: Path, unembedding: torch.Tensor, tokenizer: Any, *, seed: int = 0) -> Path:
    """``<checkpoint>/sae``: background features plus one planted per strategy, whose decoder row is
    the direction that promotes the strategy's keywords through ``unembedding`` [vocab, D]."""
    from guard.reasoning.sae_writer import promoting_direction, write_sae

    keywords = {index: [single_token(tokenizer, word) for word in words] for index, words in STRATEGY_FEATURES.values()}
    background = _background_features(unembedding, sorted({t for ids in keywords.values() for t in ids}), seed)
    plant = {index: background[index] for index in range(DEMO_SAE_WIDTH)}
    plant.update({index: promoting_direction(unembedding, ids) for index, ids in keywords.items()})
    return write_sae(
        checkpoint / "sae",
        d_model=unembedding.shape[1],
        width=DEMO_SAE_WIDTH,
        layer=DEMO_SAE_LAYER,
        activation="relu",
        seed=seed,
        features=[(index, strategy) for strategy, (index, _) in STRATEGY_FEATURES.items()],
        plant=plant,
    )


def _train_once(out_dir: Path, tokenizer: Any, seed: int, steps: int, max_rounds: int) -> bool:
    """One seed: train, then (bounded) keep training on the cases still wrong; write the checkpoint
    and return whether the served model decodes every case exactly."""
    from transformers import Qwen3ForCausalLM

    from guard.retrieval.checkpoint_writer import qwen3_config

    end_of_turn = single_token(tokenizer, END_OF_TURN)
    end_of_text = single_token(tokenizer, "<|endoftext|>")
    cases = showcase_cases(tokenizer)
    torch.manual_seed(seed)
    # head_dim 64: vLLM's CPU attention needs it, so the demo also serves as a vLLM upstream
    config = qwen3_config(
        "tiny", head_dim=64, eos_token_id=end_of_turn, pad_token_id=end_of_text, bos_token_id=end_of_text
    )
    model = Qwen3ForCausalLM(config)
    model.generation_config.eos_token_id = [end_of_turn, end_of_text]  # as Qwen3 releases ship it
    model.generation_config.pad_token_id = end_of_text
    trainer = _Trainer(model, cases, end_of_text)
    trainer.train(steps, 3e-3)
    for round_ in range(max_rounds + 1):
        wrong = trainer.mistakes(margin=2.0)
        log.info("event=reasoner_check seed=%d round=%d wrong=%d of=%d", seed, round_, len(wrong), len(cases))
        if not wrong:
            break
        if round_ < max_rounds:
            trainer.train(100, 1e-3, focus=wrong)
    trainer.fold()
    model.config.update({DEMO_MARKER: {"version": REASONER_VERSION, "notice": REASONER_NOTICE}})
    model.save_pretrained(str(out_dir))
    copy_tokenizer_files(cached_qwen3_tokenizer_dir(), out_dir)
    misses = _served_misses(out_dir, cases)
    log.info("event=reasoner_served_check seed=%d misses=%d of=%d", seed, len(misses), len(cases))
    if misses:
        return False
    write_demo_sae(out_dir, model.get_output_embeddings().weight.detach(), tokenizer, seed=seed)
    return True


def train_demo_reasoner(
    out_dir: Path, *, steps: int = 300, seed: int = 0, max_rounds: int = 4, max_seeds: int = 3
) -> Path:
    """Train and write the demo reasoner and its SAE. Float rounding differs between CPUs, so a
    fixed step count alone could give a model right on one machine and wrong on another: training
    goes on (bounded) until every response token wins the full-vocabulary argmax by a margin, the
    written checkpoint is then decoded through the serving path, and a miss starts over from
    another seed (bounded too)."""
    from transformers import AutoTokenizer

    started = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(str(cached_qwen3_tokenizer_dir()))
    with one_thread():
        for attempt in range(max_seeds):
            if _train_once(out_dir, tokenizer, seed + attempt * 1009, steps, max_rounds):
                break
        else:
            raise RuntimeError(f"the demo reasoner still decodes showcase cases wrong after {max_seeds} seeds")
    log.info("event=reasoner_built path=%s seconds=%.1f", out_dir, time.perf_counter() - started)
    return out_dir


def demo_reasoner_dir(rebuild: bool = False) -> Path:
    """The cached demo reasoner checkpoint (with its SAE in ``sae/``), trained on first use."""
    return cached_build(REASONER_VERSION, train_demo_reasoner, rebuild=rebuild)
