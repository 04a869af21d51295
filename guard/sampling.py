"""Choosing the next token from last-position logits, the same way for every local generator
(the Reasoner's local model, ParScale): argmax at temperature 0, else a seeded draw from the
temperature-scaled softmax, cut to the nucleus when ``top_p`` < 1."""

from __future__ import annotations

import torch


class Sampler:
    def __init__(self, temperature: float, top_p: float | None, generator: torch.Generator | None) -> None:
        self.temperature, self.top_p, self.generator = temperature, top_p, generator

    @classmethod
    def seeded(cls, temperature: float, top_p: float | None, seed: int | None, device: torch.device | str = "cpu"):
        """A sampler whose draws repeat for the same seed (None: torch's global generator)."""
        generator = torch.Generator(device=device).manual_seed(seed) if temperature > 0 and seed is not None else None
        return cls(temperature, top_p, generator)

    @torch.inference_mode()
    def __call__(self, logits: torch.Tensor) -> int:
        if self.temperature == 0:
            return int(logits.argmax())
        probs = torch.softmax(logits / self.temperature, dim=-1)  # [vocab]
        if self.top_p is not None and self.top_p < 1:
            sorted_probs, order = probs.sort(descending=True)
            keep = sorted_probs.cumsum(-1) - sorted_probs < self.top_p  # the smallest prefix reaching top_p
            probs = torch.zeros_like(probs).scatter(0, order[keep], sorted_probs[keep])
        cdf = probs.cumsum(-1)  # inverse-CDF draw: exact, and far cheaper than multinomial over 150K ids
        u = torch.rand(1, generator=self.generator, device=cdf.device) * cdf[-1]
        return min(int(torch.searchsorted(cdf, u)), cdf.numel() - 1)
