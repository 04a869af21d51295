"""The local Generative Qwen3Guard backend: a Qwen3ForCausalLM checkpoint loaded with
transformers, requests batched across callers by the shared ``Batcher`` (a small wait window;
"scored" and "generate" requests run as separate groups).

Two ways to judge:
- generate: greedy, at most ``max_new_tokens``, stopping once the needed lines are complete;
- scored: read the probabilities of the three ``Safety:`` answers (then of the categories, and
  of the refusal) from the logits: one forward per line instead of one per token, calibrated
  probabilities, and it always parses.
"""

from __future__ import annotations

from concurrent.futures import Future
from dataclasses import dataclass, replace
from pathlib import Path

import torch

from guard.batcher import Batched, Batcher, then
from guard.judge.judgment import GEN_CATEGORIES, JudgeMode, Judgment, lines_complete, mode_of, parse_output
from guard.model.labels import RiskLevel

RISK_WORDS = {"Safe": RiskLevel.SAFE, "Unsafe": RiskLevel.UNSAFE, "Controversial": RiskLevel.CONTROVERSIAL}


@dataclass(frozen=True)
class _Request:
    messages: list[dict]
    scored: bool


class LocalJudge:
    def __init__(
        self,
        path: str | Path,
        *,
        device: str = "cpu",
        dtype: torch.dtype = torch.float32,
        max_batch: int = 8,
        wait_ms: float = 5.0,
        max_new_tokens: int = 128,
        max_queue: int = 1024,
    ) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path = Path(path)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        if not getattr(self.tokenizer, "chat_template", None):
            raise ValueError(f"{self.path}: the tokenizer has no chat template (a Qwen3Guard-Gen checkpoint ships one)")
        self.model = AutoModelForCausalLM.from_pretrained(str(self.path), dtype=dtype).to(device).eval()
        self.device = torch.device(device)
        self.config = self.model.config
        self.max_new_tokens = max_new_tokens
        self.eos_id = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else self.eos_id
        self._first_token = {
            w: self._single_first_token(" " + w) for w in (*RISK_WORDS, "Yes", "No", "None", *GEN_CATEGORIES)
        }
        if len(set(self._first_token.values())) != len(self._first_token):
            raise ValueError("scored mode needs distinct first tokens for every answer word")
        self._batcher: Batcher[_Request, Judgment] = Batcher(
            self._run,
            name="judge",
            max_batch=max_batch,
            wait_ms=wait_ms,
            max_queue=max_queue,
            group_by=lambda r: r.scored,
        )

    @property
    def demo(self) -> dict | None:
        from guard.model.config import DEMO_MARKER

        return getattr(self.config, DEMO_MARKER, None)

    def _single_first_token(self, text: str) -> int:
        return self.tokenizer.encode(text, add_special_tokens=False)[0]

    def render(self, messages: list[dict]) -> str:
        return self.tokenizer.apply_chat_template(messages, tokenize=False)

    def classify(self, messages: list[dict], *, scored: bool = False) -> Future[Judgment]:
        """Queue one judgment; cancelling the future withdraws it if its batch has not started.
        Raises ``LimitExceeded`` when the queue is full, ``EngineStopped`` after ``close``."""
        return then(self._batcher.submit(_Request(messages, scored)), _with_timing)

    def close(self) -> None:
        self._batcher.close()

    # ------------------------------------------------------------------ worker

    def _run(self, batch: list[_Request]) -> list[Judgment | Exception]:
        """One homogeneous group (the batcher groups by ``scored``)."""
        return self._score(batch) if batch[0].scored else self._generate(batch)

    def _left_padded(self, texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        encoded = [self.tokenizer.encode(t, add_special_tokens=False) for t in texts]
        width = max(len(e) for e in encoded)
        ids = torch.full((len(encoded), width), self.pad_id)
        mask = torch.zeros((len(encoded), width), dtype=torch.long)
        for i, e in enumerate(encoded):
            ids[i, width - len(e) :] = torch.tensor(e)
            mask[i, width - len(e) :] = 1
        return ids.to(self.device), mask.to(self.device)

    @torch.inference_mode()
    def _generate(self, batch: list[_Request]) -> list[Judgment | Exception]:
        from transformers import StoppingCriteria, StoppingCriteriaList

        modes = [mode_of(r.messages) for r in batch]
        ids, mask = self._left_padded([self.render(r.messages) for r in batch])
        prompt_len = ids.shape[1]
        tokenizer = self.tokenizer

        class LinesComplete(StoppingCriteria):
            def __call__(self, input_ids, scores, **kwargs):
                texts = tokenizer.batch_decode(input_ids[:, prompt_len:], skip_special_tokens=True)
                done = [lines_complete(t, m) for t, m in zip(texts, modes, strict=True)]
                return torch.tensor(done, device=input_ids.device)

        out = self.model.generate(
            input_ids=ids,
            attention_mask=mask,
            do_sample=False,
            max_new_tokens=self.max_new_tokens,
            eos_token_id=self.eos_id,
            pad_token_id=self.pad_id,
            stopping_criteria=StoppingCriteriaList([LinesComplete()]),
        )
        results: list[Judgment | Exception] = []
        for row, mode in zip(out[:, prompt_len:], modes, strict=True):
            text = tokenizer.decode(row, skip_special_tokens=True).strip()
            try:
                risk, categories, refusal = parse_output(text, mode)
            except ValueError as exc:
                results.append(exc)
                continue
            results.append(Judgment(mode, risk, categories, refusal, text))
        return results

    @torch.inference_mode()
    def _read_positions(self, texts: list[str], reads: list[list[tuple[int, list[str]]]]) -> list[list[dict]]:
        """One batched forward over ``texts``; for each text, at each (tokens-from-end, words) read,
        the distribution over the words' first tokens at that position."""
        ids, mask = self._left_padded(texts)
        hidden = self.model.model(input_ids=ids, attention_mask=mask).last_hidden_state  # [B, T, hidden]
        out = []
        for row, row_reads in enumerate(reads):
            found = []
            for from_end, words in row_reads:
                # the output layer only for the answer words at this position (not [B, T, vocab])
                weight = self.model.lm_head.weight[[self._first_token[w] for w in words]]  # [W, hidden]
                logits = (hidden[row, -1 - from_end] @ weight.T).float()
                found.append(dict(zip(words, torch.softmax(logits, dim=-1).cpu().tolist(), strict=True)))
            out.append(found)
        return out

    def _tokens_after(self, prefix: str, suffix: str) -> int:
        return len(self.tokenizer.encode(prefix + suffix, add_special_tokens=False)) - len(
            self.tokenizer.encode(prefix, add_special_tokens=False)
        )

    def _score(self, batch: list[_Request]) -> list[Judgment]:
        """Risk and categories from ONE forward over ``<prompt>Safety: Unsafe\nCategories:``: the
        logits after ``Safety:`` give the three answers, those after ``Categories:`` the category
        (read as the model would continue an unsafe verdict). Response mode adds a second forward
        for the refusal line, conditioned on the chosen verdict."""
        modes = [mode_of(r.messages) for r in batch]
        prompts = [self.render(r.messages) for r in batch]
        tail = " Unsafe\nCategories:"
        texts, reads = [], []
        for prompt, mode in zip(prompts, modes, strict=True):
            names = [c for c in GEN_CATEGORIES if mode is JudgeMode.PROMPT or c != "Jailbreak"]
            texts.append(prompt + "Safety:" + tail)
            reads.append([(self._tokens_after(prompt + "Safety:", tail), list(RISK_WORDS)), (0, names)])
        first = self._read_positions(texts, reads)
        lines = []
        for risk_probs, category_probs in first:
            risk = max(risk_probs, key=risk_probs.get)
            categories = () if risk == "Safe" else (max(category_probs, key=category_probs.get),)
            lines.append((risk, categories, f"Safety: {risk}\nCategories: {', '.join(categories) or 'None'}"))
        refusals: dict[int, bool] = {}
        response_rows = [i for i, m in enumerate(modes) if m is JudgeMode.RESPONSE]
        if response_rows:
            second = self._read_positions(
                [f"{prompts[i]}{lines[i][2]}\nRefusal:" for i in response_rows],
                [[(0, ["Yes", "No"])] for _ in response_rows],
            )
            for i, (yes_no,) in zip(response_rows, second, strict=True):
                refusals[i] = yes_no["Yes"] > yes_no["No"]
        results = []
        for i, ((risk_probs, category_probs), (risk, categories, text)) in enumerate(zip(first, lines, strict=True)):
            refusal = refusals.get(i)
            if refusal is not None:
                text += f"\nRefusal: {'Yes' if refusal else 'No'}"
            results.append(
                Judgment(
                    modes[i],
                    RISK_WORDS[risk],
                    categories,
                    refusal,
                    text,
                    risk_probs=risk_probs,
                    category_probs=category_probs,
                )
            )
        return results


def _with_timing(done: Batched[Judgment]) -> Judgment:
    return replace(done.value, queue_s=done.queue_s, inference_s=done.compute_s)
