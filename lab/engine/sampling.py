"""Turning logits into token choices: greedy, or seeded sampling with temperature, top-k, top-p."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 means greedy; top_k 0 and top_p 1.0 mean no truncation."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise ValueError(f"top_k must be >= 0, got {self.top_k}")
        if not 0.0 < self.top_p <= 1.0:
            raise ValueError(f"top_p must be in (0, 1], got {self.top_p}")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0.0


class Sampler:
    """Applies SamplingParams with its own seeded generator, so runs are reproducible."""

    def __init__(self, params: SamplingParams, seed: int, device: torch.device) -> None:
        self.params = params
        self.generator = torch.Generator(device=device).manual_seed(seed)

    @property
    def greedy(self) -> bool:
        return self.params.greedy

    def probs(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., V) logits -> (..., V) float32 probabilities after temperature/top-k/top-p."""
        logits = logits.float()
        if self.params.greedy:
            # A point mass on the argmax keeps the lossless policies' maths valid at temperature 0.
            return torch.nn.functional.one_hot(logits.argmax(-1), logits.shape[-1]).float()
        logits = logits / self.params.temperature
        if self.params.top_k:
            kth = torch.topk(logits, min(self.params.top_k, logits.shape[-1]), dim=-1).values[
                ..., -1:
            ]
            logits = logits.masked_fill(logits < kth, float("-inf"))
        if self.params.top_p < 1.0:
            sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
            cumulative = sorted_logits.softmax(-1).cumsum(-1)
            # Drop a token once the mass before it already reaches top_p (the top-1 always stays).
            drop_sorted = (cumulative - sorted_logits.softmax(-1)) >= self.params.top_p
            drop = drop_sorted.scatter(-1, order, drop_sorted)
            logits = logits.masked_fill(drop, float("-inf"))
        return logits.softmax(-1)

    def sample(self, probs: torch.Tensor) -> torch.Tensor:
        """(..., V) probabilities -> (...) token ids drawn with this sampler's generator."""
        flat = probs.reshape(-1, probs.shape[-1])
        drawn = torch.multinomial(flat, 1, generator=self.generator)
        return drawn.reshape(probs.shape[:-1])

    def choose(self, logits: torch.Tensor) -> torch.Tensor:
        """(..., V) logits -> (...) token ids: argmax when greedy, else a seeded draw."""
        if self.params.greedy:
            return logits.argmax(-1)
        return self.sample(self.probs(logits))

    def uniform(self, n: int, device: torch.device) -> torch.Tensor:
        """(n,) uniform draws in [0, 1) from this sampler's generator."""
        return torch.rand(n, generator=self.generator, device=device)
