"""Acceptance policies: how many draft tokens to keep, and which token to emit after them."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lab.sampling import Sampler


@dataclass(frozen=True)
class Verdict:
    """A policy's decision for one step."""

    accepted: int  # how many leading draft tokens to keep
    next_token: int  # the correction (after a rejection) or bonus (all accepted) token


def _first_false(mask: torch.Tensor) -> int:
    """Length of the leading run of True in a (K,) bool mask."""
    return int(mask.to(torch.int64).cumprod(0).sum())


def exact(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor,
    sampler: Sampler,
) -> Verdict:
    """Lossless longest-prefix match against the target's own choice at each position.

    Greedy: the target's argmax. Sampling: a token drawn from the target at each of the K+1
    positions; keeping draft tokens while they equal those draws leaves the output distribution
    exactly the target's, whatever the drafter proposed.
    """
    target_tokens = sampler.choose(target_logits)  # (K+1,)
    accepted = _first_false(draft_tokens == target_tokens[:-1])
    return Verdict(accepted, int(target_tokens[accepted]))


def rejection_sampling(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor,
    sampler: Sampler,
) -> Verdict:
    """Lossless speculative sampling (Leviathan et al. 2023; Chen et al. 2023).

    Keep draft token i with probability min(1, target_prob / draft_prob); at the first rejection
    emit a draw from the residual max(0, target_probs - draft_probs), renormalised; if all K are
    kept, emit a bonus draw from the target at position K+1.
    """
    k = draft_tokens.shape[0]
    target_probs = sampler.probs(target_logits)  # (K+1, V)
    if k == 0:
        return Verdict(0, int(sampler.sample(target_probs[0])))
    if draft_probs is None:
        raise ValueError("rejection_sampling needs the drafter's probabilities (draft_probs)")
    rows = torch.arange(k, device=draft_tokens.device)
    target_p = target_probs[rows, draft_tokens]  # (K,)
    draft_p = draft_probs[rows, draft_tokens]  # (K,), > 0 since the drafter drew these tokens
    keep = sampler.uniform(k, draft_tokens.device) * draft_p < target_p  # u < target_p / draft_p
    accepted = _first_false(keep)
    if accepted == k:
        return Verdict(k, int(sampler.sample(target_probs[k])))
    residual = (target_probs[accepted] - draft_probs[accepted]).clamp_min(0.0)  # (V,)
    if residual.sum() <= 0:
        # Only reachable through rounding (a rejection implies target mass elsewhere).
        residual = target_probs[accepted]
    return Verdict(accepted, int(sampler.sample(residual / residual.sum())))


Policy = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor, Sampler], Verdict]


@dataclass(frozen=True)
class PolicySpec:
    """A registered policy and what the speculative loop must know about it."""

    fn: Policy
    lossless: bool
    needs_draft_probs: bool


POLICIES: dict[str, PolicySpec] = {
    "exact": PolicySpec(exact, lossless=True, needs_draft_probs=False),
    "rejection": PolicySpec(rejection_sampling, lossless=True, needs_draft_probs=True),
}


def get_policy(name: str) -> PolicySpec:
    """The registered policy called name; unknown names list the valid ones."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}: use one of {', '.join(POLICIES)}")
    return POLICIES[name]
