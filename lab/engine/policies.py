"""Acceptance policies: how many draft tokens to keep, and which token to emit after them.

exact and rejection are lossless; confidence, topk and typical are lossy (faster, not the
target's output distribution).
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from lab.engine.sampling import Sampler


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


# --- lossy policies: faster, but the output is no longer guaranteed to be the target's ----------
# Each scores the draft tokens with the target's probabilities at temperature 1 (greedy runs) or
# at the sampler's temperature (sampled runs), before any top-k/top-p truncation. After the
# accepted prefix the next token is the target's own choice there (sampler.choose).


def _target_probs(target_logits: torch.Tensor, sampler: Sampler) -> torch.Tensor:
    """(K+1, V) logits -> (K+1, V) probabilities at the sampler's temperature (1 when greedy)."""
    temperature = sampler.params.temperature or 1.0
    return (target_logits.float() / temperature).softmax(-1)


def _draft_target_probs(draft_tokens: torch.Tensor, target_probs: torch.Tensor) -> torch.Tensor:
    """(K,) target probability of each draft token at its position."""
    rows = torch.arange(draft_tokens.shape[0], device=draft_tokens.device)
    return target_probs[rows, draft_tokens]


def _keep_prefix(keep: torch.Tensor, target_logits: torch.Tensor, sampler: Sampler) -> Verdict:
    """Accept the leading run of keep (K,), then the target's choice at the first miss."""
    accepted = _first_false(keep)
    return Verdict(accepted, int(sampler.choose(target_logits[accepted])))


def confidence(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor,
    sampler: Sampler,
    *,
    tau: float = 0.3,
) -> Verdict:
    """Lossy: keep draft tokens while the target's probability of each is >= tau."""
    target_probs = _target_probs(target_logits, sampler)  # (K+1, V)
    keep = _draft_target_probs(draft_tokens, target_probs) >= tau  # (K,)
    return _keep_prefix(keep, target_logits, sampler)


def topk(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor,
    sampler: Sampler,
    *,
    k: int = 5,
) -> Verdict:
    """Lossy: keep draft tokens while each is among the target's k most likely tokens there."""
    rows = torch.arange(draft_tokens.shape[0], device=draft_tokens.device)
    draft_logits = target_logits[rows, draft_tokens]  # (K,) the target's logit of each draft token
    # Rank = tokens the target strictly prefers; ties with the k-th token count as inside top k.
    rank = (target_logits[:-1] > draft_logits[:, None]).sum(-1)  # (K,)
    return _keep_prefix(rank < k, target_logits, sampler)


def typical(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor,
    sampler: Sampler,
    *,
    epsilon: float = 0.09,
    delta: float = 0.3,
) -> Verdict:
    """Lossy typical acceptance (Cai et al. 2024, Medusa).

    Keep draft tokens while the target's probability of each is > min(epsilon, delta * exp(-H)),
    H the entropy (nats) of the target's distribution at that position: a confident target
    demands its favourite, an uncertain one accepts any reasonably likely token.
    """
    target_probs = _target_probs(target_logits[:-1], sampler)  # (K, V)
    entropy = -(target_probs * target_probs.clamp_min(1e-30).log()).sum(-1)  # (K,)
    threshold = torch.minimum(torch.full_like(entropy, epsilon), delta * torch.exp(-entropy))
    keep = _draft_target_probs(draft_tokens, target_probs) > threshold  # (K,)
    return _keep_prefix(keep, target_logits, sampler)


Policy = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor, Sampler], Verdict]


@dataclass(frozen=True)
class PolicySpec:
    """A policy with its parameters bound, and what the speculative loop must know about it."""

    fn: Policy
    lossless: bool
    needs_draft_probs: bool
    params: dict[str, Any] = field(default_factory=dict)  # every parameter, defaults included


POLICIES: dict[str, PolicySpec] = {
    "exact": PolicySpec(exact, lossless=True, needs_draft_probs=False),
    "rejection": PolicySpec(rejection_sampling, lossless=True, needs_draft_probs=True),
    "confidence": PolicySpec(confidence, lossless=False, needs_draft_probs=False),
    "topk": PolicySpec(topk, lossless=False, needs_draft_probs=False),
    "typical": PolicySpec(typical, lossless=False, needs_draft_probs=False),
}


def _probability(value: Any) -> bool:
    return _number(value) and 0.0 < value <= 1.0


def _number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


# What each parameter accepts: a check and the words for the error message.
_PARAM_CHECKS: dict[str, tuple[Callable[[Any], bool], str]] = {
    "tau": (_probability, "a probability in (0, 1]"),
    "k": (lambda v: isinstance(v, int) and not isinstance(v, bool) and v > 0, "an integer >= 1"),
    "epsilon": (_probability, "a probability in (0, 1]"),
    "delta": (lambda v: _number(v) and v > 0, "a number > 0"),
}


def policy_defaults(name: str) -> dict[str, Any]:
    """The parameters a policy takes (keyword-only arguments of its function) and defaults."""
    signature = inspect.signature(get_policy(name).fn)
    return {p.name: p.default for p in signature.parameters.values() if p.kind is p.KEYWORD_ONLY}


def get_policy(name: str) -> PolicySpec:
    """The registered policy called name, with default parameters; unknown names list the valid."""
    if name not in POLICIES:
        raise ValueError(f"unknown policy {name!r}: use one of {', '.join(POLICIES)}")
    return POLICIES[name]


def make_policy(name: str, **params: Any) -> PolicySpec:
    """The policy called name with params bound; unknown or out-of-range params raise."""
    spec = get_policy(name)
    defaults = policy_defaults(name)
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        takes = ", ".join(defaults) or "no parameters"
        raise ValueError(f"policy {name!r} has no parameter {', '.join(unknown)}; it takes {takes}")
    for key, value in params.items():
        check, allowed = _PARAM_CHECKS[key]
        if not check(value):
            raise ValueError(f"policy {name!r}: {key} must be {allowed}, got {value!r}")
    bound = {**defaults, **params}
    fn = functools.partial(spec.fn, **params) if params else spec.fn
    return replace(spec, fn=fn, params=bound)
