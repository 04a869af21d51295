"""A Qwen3 causal LM decoded locally, one token at a time, so that steering can reach its residual stream.

Plain incremental decoding with transformers' ``DynamicCache``: the prompt is prefilled once,
then each step feeds only the newest token(s). Greedy at temperature 0, seeded sampling
otherwise. ``generate`` is a generator that yields each token id as soon as it exists; a caller
on another thread aborts through ``should_stop``, and a caller that needs to write into the
response (a thinking budget closing the reasoning with ``</think>``) returns ids from
``inject``: they are fed through the model under the same hooks and yielded like generated ones.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from pathlib import Path

import torch

from guard.errors import InvalidInput
from guard.reasoning.steering import (
    Steer,
    SteeringHook,
    SteeringInputError,
    SteerLimits,
    TriggeredSteer,
    TriggerWatch,
)
from guard.retrieval.checkpoint import RetrievalCheckpointError, load_pretrained, read_config
from guard.retrieval.inputs import checked_ids
from guard.sampling import Sampler


class LocalCausalLM:
    """A ``Qwen3ForCausalLM`` checkpoint and its tokenizer. Refuses a checkpoint whose weights do
    not cover the model (``RetrievalCheckpointError``, a ValueError), never decoding with random ones."""

    def __init__(self, path: str | Path, device: str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.path = Path(path)
        config = read_config(self.path)
        architectures = config.get("architectures") or ["Qwen3ForCausalLM"]
        if config["model_type"] != "qwen3" or architectures[0] != "Qwen3ForCausalLM":
            raise RetrievalCheckpointError(
                f"{self.path}: {config['model_type']!r} / {architectures[0]!r}; expected a qwen3 Qwen3ForCausalLM"
            )
        self.model = load_pretrained(AutoModelForCausalLM, self.path, dtype=dtype, device=device)
        self.tokenizer = AutoTokenizer.from_pretrained(str(self.path))
        self.config = self.model.config
        self.device = torch.device(device)

    @property
    def vocab_size(self) -> int:
        return int(self.config.vocab_size)

    @property
    def unembedding(self) -> torch.Tensor:
        """The LM head weight ``W_U`` [vocab, d_model] (logit recall projects feature directions through it)."""
        return self.model.get_output_embeddings().weight.detach()

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """The ids that end a response: the tokenizer's end-of-turn token and the checkpoint's
        ``generation_config`` eos ids (``<|im_end|>`` / ``<|endoftext|>`` for Qwen3), sorted."""
        ids = {self.tokenizer.eos_token_id}
        configured = getattr(getattr(self.model, "generation_config", None), "eos_token_id", None)
        ids.update(configured if isinstance(configured, list | tuple) else [configured])
        return tuple(sorted(i for i in ids if isinstance(i, int)))

    def decode(self, ids: Sequence[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False, clean_up_tokenization_spaces=False)

    @torch.inference_mode()  # per call: a `with` around the yields would leak the mode into the caller
    def _step(self, ids: list[int], cache: object) -> torch.Tensor:
        """Feed ``ids`` after what the cache holds; the logits [vocab] at the last of them, float32."""
        input_ids = torch.tensor([ids], dtype=torch.long, device=self.device)  # [1, S]
        out = self.model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=1)
        return out.logits[0, -1].float()

    def generate(
        self,
        prompt_ids: Sequence[int],
        *,
        max_tokens: int,
        temperature: float = 0.0,
        top_p: float | None = None,
        seed: int | None = None,
        steers: Iterable[Steer] = (),
        triggered: Iterable[TriggeredSteer] = (),
        layer: int | None = None,
        limits: SteerLimits | None = None,
        stop_ids: Iterable[int] = (),
        should_stop: Callable[[], bool] | None = None,
        inject: Callable[[], Sequence[int] | None] | None = None,
    ) -> Iterator[int]:
        """Yield up to ``max_tokens`` response ids (injected ones included), one at a time.

        ``steers`` / ``triggered`` act on decoder layer ``layer`` (required when any is given).
        Stops after yielding a ``stop_ids`` id (sampled or injected), at ``max_tokens``, or as
        soon as ``should_stop()`` is true (checked before each step). ``inject()`` is consulted
        before each step: ids it returns are the next response tokens instead of a sampled one.
        Arguments are checked here, before the first id is asked for (``InvalidInput``)."""
        prompt = checked_ids(prompt_ids, self.vocab_size, "prompt_ids")
        if isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1:
            raise InvalidInput(f"`max_tokens` must be an integer >= 1, got {max_tokens!r}")
        if not math.isfinite(temperature) or temperature < 0:
            raise InvalidInput(f"`temperature` must be finite and >= 0, got {temperature}")
        if top_p is not None and not 0 < top_p <= 1:
            raise InvalidInput(f"`top_p` must be in (0, 1], got {top_p}")
        steers, triggered = list(steers), list(triggered)
        limits = limits or SteerLimits()
        hidden = int(self.config.hidden_size)
        for steer in [*steers, *triggered]:
            steer.validate(hidden, limits)
        if (steers or triggered) and layer is None:
            raise InvalidInput("`layer` is required to steer (the SAE's layer)")
        layers = int(self.config.num_hidden_layers)
        if layer is not None and (isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < layers):
            raise SteeringInputError(f"`layer` must be in [0, {layers}) for this model, got {layer!r}")
        generator = None
        if temperature > 0 and seed is not None:
            generator = torch.Generator(device=self.device).manual_seed(seed)
        sample = Sampler(temperature, top_p, generator)
        steering = (layer, steers, triggered, limits) if steers or triggered else None
        return self._decode(prompt, max_tokens, sample, steering, set(stop_ids), should_stop, inject)

    def _decode(
        self,
        prompt: list[int],
        max_tokens: int,
        sample: Sampler,
        steering: tuple[int, list[Steer], list[TriggeredSteer], SteerLimits] | None,
        stops: set[int],
        should_stop: Callable[[], bool] | None,
        inject: Callable[[], Sequence[int] | None] | None,
    ) -> Iterator[int]:
        from transformers import DynamicCache

        hook = watch = None
        if steering is not None:
            layer, steers, triggered, limits = steering
            hook = SteeringHook(self.model, layer, prompt_len=len(prompt), steers=steers, limits=limits)
            watch = TriggerWatch(triggered, self.decode)
        response: list[int] = []
        try:
            cache = DynamicCache(config=self.config)
            logits = self._step(prompt, cache)  # prefill
            while len(response) < max_tokens:
                if should_stop is not None and should_stop():
                    return
                forced = inject() if inject is not None else None
                if forced:
                    chunk = checked_ids(forced, self.vocab_size, "injected ids")[: max_tokens - len(response)]
                else:
                    chunk = [sample(logits)]
                for token in chunk:
                    response.append(token)
                    if hook is not None and watch is not None:
                        for steer in watch.observe(response):
                            hook.add(steer)
                    yield token
                    if token in stops:
                        return
                if len(response) < max_tokens:
                    logits = self._step(chunk, cache)
        finally:
            if hook is not None:
                hook.close()
