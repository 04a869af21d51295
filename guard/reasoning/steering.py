"""Activation steering: ``x'[l, t+k] = x[l, t+k] + alpha * f`` for k = 0..T-1 (Fang et al. 2026).

A ``SteeringHook`` is a forward hook on one decoder layer of a transformers causal LM; it adds
``alpha * direction`` to that layer's output (the residual stream) at exactly the absolute
positions ``prompt_len + start .. prompt_len + start + T - 1``, and nowhere else. Positions come
from the forward call itself, so the hook is right under the KV cache (one token per call) and
in a full-sequence forward alike: transformers 5.x passes each decoder layer ``position_ids``
(the absolute positions for an unpadded sequence; 5.24 passes no ``cache_position``), 4.x also
``cache_position``, which is preferred when present. The hook is removed explicitly
(``close()`` or ``with``), never left on the model.

A ``TriggeredSteer`` starts at the first occurrence of a text (e.g. "Wait") in the response:
``TriggerWatch`` resolves it, as the response grows, to a ``Steer`` whose ``start`` is the token
after the one that completed the trigger.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from guard.errors import InvalidInput

UNIT_TOLERANCE = 1e-3  # |‖direction‖ - 1| allowed: a float32 normalised row passes, a raw row does not


class SteeringInputError(InvalidInput, ValueError):
    """A steering request is malformed or over a limit (the message names the field and the limit)."""


@dataclass(frozen=True)
class SteerLimits:
    """What a caller may ask for: |alpha| and the number of steered tokens T."""

    max_alpha: float = 100.0
    max_tokens: int = 4096


def check_steer_fields(direction: Any, alpha: Any, tokens: Any, d_model: int, limits: SteerLimits) -> None:
    """The checks a ``Steer`` and a ``TriggeredSteer`` share."""
    if isinstance(alpha, bool) or not isinstance(alpha, int | float) or not math.isfinite(alpha):
        raise SteeringInputError(f"`alpha` must be a finite number, got {alpha!r}")
    if abs(alpha) > limits.max_alpha:
        raise SteeringInputError(f"`alpha` must be within [-{limits.max_alpha}, {limits.max_alpha}], got {alpha}")
    if isinstance(tokens, bool) or not isinstance(tokens, int) or not 1 <= tokens <= limits.max_tokens:
        raise SteeringInputError(f"`tokens` (T) must be an integer in [1, {limits.max_tokens}], got {tokens!r}")
    if not isinstance(direction, torch.Tensor) or direction.dim() != 1 or direction.numel() != d_model:
        shape = list(direction.shape) if isinstance(direction, torch.Tensor) else type(direction).__name__
        raise SteeringInputError(f"`direction` must be a vector [{d_model}] (the model's hidden size), got {shape}")
    norm = float(direction.float().norm())
    if not math.isfinite(norm) or abs(norm - 1.0) > UNIT_TOLERANCE:
        raise SteeringInputError(
            f"`direction` must be a unit vector, its norm is {norm:.6g} (use SparseAutoencoder.direction(i))"
        )


@dataclass(frozen=True)
class Steer:
    """Add ``alpha * direction`` at response tokens ``start .. start + tokens - 1`` (0 = the first
    generated token's position)."""

    direction: torch.Tensor  # [d_model], unit norm
    alpha: float
    start: int
    tokens: int

    def validate(self, d_model: int, limits: SteerLimits | None = None) -> None:
        check_steer_fields(self.direction, self.alpha, self.tokens, d_model, limits or SteerLimits())
        if isinstance(self.start, bool) or not isinstance(self.start, int) or self.start < 0:
            raise SteeringInputError(f"`start` must be a response token offset >= 0, got {self.start!r}")


@dataclass(frozen=True)
class TriggeredSteer:
    """Steer ``tokens`` tokens starting right after ``trigger`` first appears in the response text."""

    trigger: str
    direction: torch.Tensor  # [d_model], unit norm
    alpha: float
    tokens: int

    def validate(self, d_model: int, limits: SteerLimits | None = None) -> None:
        if not isinstance(self.trigger, str) or not self.trigger:
            raise SteeringInputError(f"`trigger` must be a non-empty string, got {self.trigger!r}")
        check_steer_fields(self.direction, self.alpha, self.tokens, d_model, limits or SteerLimits())

    def at(self, start: int) -> Steer:
        return Steer(self.direction, self.alpha, start, self.tokens)


class TriggerWatch:
    """Turns ``TriggeredSteer``s into ``Steer``s as response tokens arrive.

    ``observe`` is called after each appended token. Only a tail of the response is decoded: a
    trigger of B UTF-8 bytes spans at most B byte-level tokens, so a window of B + 4 tokens (room
    for a character split at its start) holds any occurrence the newest token completed, and an
    earlier occurrence would have been seen when it was completed."""

    def __init__(self, triggered: Iterable[TriggeredSteer], decode: Callable[[list[int]], str]) -> None:
        self.pending = list(triggered)
        self.decode = decode

    def observe(self, response: Sequence[int]) -> list[Steer]:
        """The steers whose trigger the newest token completed; each starts at the next token."""
        if not self.pending or not response:
            return []
        fired: list[Steer] = []
        texts: dict[int, str] = {}
        for steer in list(self.pending):
            window = len(steer.trigger.encode("utf-8")) + 4
            if window not in texts:
                texts[window] = self.decode(list(response[-window:]))
            if steer.trigger in texts[window]:
                self.pending.remove(steer)
                fired.append(steer.at(len(response)))
        return fired


def _positions(kwargs: dict[str, Any], hidden: torch.Tensor) -> torch.Tensor:
    """The absolute positions of this call's tokens, [S] or [B, S]."""
    positions = kwargs.get("cache_position")
    if positions is None:
        positions = kwargs.get("position_ids")
    if positions is None or positions.dim() > 2 or positions.shape[-1] != hidden.shape[-2]:
        raise RuntimeError(
            "the decoder layer was called without cache_position / position_ids matching its "
            f"{hidden.shape[-2]} tokens: steering cannot place its positions"
        )
    return positions


class SteeringHook:
    """Steering on ``model.model.layers[layer]`` for one sequence whose prompt has ``prompt_len``
    tokens. ``add`` may be called between forward calls (a triggered steer resolved mid-generation)."""

    def __init__(
        self,
        model: torch.nn.Module,
        layer: int,
        *,
        prompt_len: int,
        steers: Iterable[Steer] = (),
        limits: SteerLimits | None = None,
    ) -> None:
        layers = model.model.layers
        if isinstance(layer, bool) or not isinstance(layer, int) or not 0 <= layer < len(layers):
            raise SteeringInputError(f"`layer` must be in [0, {len(layers)}) for this model, got {layer!r}")
        if prompt_len < 0:
            raise SteeringInputError(f"`prompt_len` must be >= 0, got {prompt_len}")
        self.layer = layer
        self.prompt_len = prompt_len
        self.limits = limits or SteerLimits()
        self.d_model = int(model.config.hidden_size)
        weight = next(layers[layer].parameters())
        self._device, self._dtype = weight.device, weight.dtype
        self._active: list[tuple[int, int, torch.Tensor]] = []  # (first, end) absolute positions, alpha * f
        self.steers: list[Steer] = []
        for steer in steers:
            self.add(steer)
        self._handle: Any = layers[layer].register_forward_hook(self._hook, with_kwargs=True)

    def add(self, steer: Steer) -> None:
        steer.validate(self.d_model, self.limits)
        first = self.prompt_len + steer.start
        delta = (steer.alpha * steer.direction.detach().float()).to(device=self._device, dtype=self._dtype)
        self._active.append((first, first + steer.tokens, delta))
        self.steers.append(steer)

    def _hook(self, module: torch.nn.Module, args: tuple, kwargs: dict[str, Any], output: Any) -> Any:
        if not self._active:
            return None
        hidden = output[0] if isinstance(output, tuple) else output  # [B, S, D]
        positions = _positions(kwargs, hidden).to(hidden.device)  # [S] or [B, S]
        for first, end, delta in self._active:
            inside = ((positions >= first) & (positions < end)).to(hidden.dtype)  # 1 where steered
            hidden = hidden + inside.unsqueeze(-1) * delta  # + 0 elsewhere leaves values bit-identical
        return (hidden, *output[1:]) if isinstance(output, tuple) else hidden

    def close(self) -> None:
        if self._handle is not None:
            self._handle.remove()
            self._handle = None

    def __enter__(self) -> SteeringHook:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
