"""Acceptance policies: how many draft tokens to keep, and which token to emit after them.

exact and rejection are lossless; confidence, topk and typical are lossy (faster, not the
target's output distribution). Each also has a token-tree form (a TreePolicy, lab.engine.tree),
which picks one root-to-leaf path of a drafted tree by the same rule.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

import torch

from lab.engine import tree
from lab.engine.sampling import Sampler
from lab.engine.tree import TreeVerdict


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


def rejection_tree(
    draft_tokens: torch.Tensor,
    parents: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor,
    sampler: Sampler,
) -> TreeVerdict:
    """Lossless multi-draft speculative sampling on a tree (SpecInfer, Miao et al. 2024).

    At each node its children are tried in order, each a standard speculative-sampling step
    against the residual left by the rejected ones: keep child j with probability
    min(1, residual(x_j) / draft_probs_j(x_j)), else residual <- max(0, residual - draft_probs_j),
    renormalised; when every child is rejected, emit a draw from the residual. Lossless only if
    each child is an independent draw from its draft_probs row (siblings drawn with replacement):
    top-k candidates are not draws, and their trees need exact.
    """
    target_probs = sampler.probs(target_logits)  # (N+1, V)
    if len(draft_tokens) and draft_probs is None:
        raise ValueError("rejection_tree needs the drafter's probabilities (draft_probs)")
    tokens, kids = draft_tokens.tolist(), tree.children(parents.tolist())
    path: list[int] = []
    row = 0  # the current node's logits row: 0 the root, i + 1 node i
    while True:
        residual = target_probs[row]  # (V,)
        child = None
        for candidate in kids[row]:
            assert draft_probs is not None
            token, proposal = tokens[candidate], draft_probs[candidate]  # proposal: (V,)
            if float(sampler.uniform(1, residual.device)) * proposal[token] < residual[token]:
                child = candidate
                break
            residual = _residual(residual, proposal, target_probs[row])
        if child is None:
            return TreeVerdict(path, int(sampler.sample(residual)))
        path.append(child)
        row = child + 1


def _residual(
    residual: torch.Tensor, draft_probs: torch.Tensor, target_probs: torch.Tensor
) -> torch.Tensor:
    """(V,) max(0, residual - draft_probs), renormalised; the target's row if nothing is left."""
    left = (residual - draft_probs).clamp_min(0.0)
    # Empty only through rounding (a rejection implies residual mass elsewhere).
    return left / left.sum() if left.sum() > 0 else target_probs


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
    keep = _confidence_keep(draft_tokens, target_logits, sampler, tau)  # (K,)
    return _keep_prefix(keep, target_logits, sampler)


def _confidence_keep(
    draft_tokens: torch.Tensor, scoring_logits: torch.Tensor, sampler: Sampler, tau: float
) -> torch.Tensor:
    """(K,) whether the target's probability of draft token i, at scoring row i, is >= tau."""
    target_probs = _target_probs(scoring_logits, sampler)  # (>= K, V)
    return _draft_target_probs(draft_tokens, target_probs) >= tau


def topk(
    draft_tokens: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor,
    sampler: Sampler,
    *,
    k: int = 5,
) -> Verdict:
    """Lossy: keep draft tokens while each is among the target's k most likely tokens there."""
    return _keep_prefix(_topk_keep(draft_tokens, target_logits, k), target_logits, sampler)


def _topk_keep(draft_tokens: torch.Tensor, scoring_logits: torch.Tensor, k: int) -> torch.Tensor:
    """(K,) whether draft token i is among the k most likely at scoring row i."""
    n = draft_tokens.shape[0]
    rows = torch.arange(n, device=draft_tokens.device)
    draft_logits = scoring_logits[rows, draft_tokens]  # (K,) the target's logit of each draft token
    # Rank = tokens the target strictly prefers; ties with the k-th token count as inside top k.
    rank = (scoring_logits[:n] > draft_logits[:, None]).sum(-1)  # (K,)
    return rank < k


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
    keep = _typical_keep(draft_tokens, target_logits, sampler, epsilon, delta)  # (K,)
    return _keep_prefix(keep, target_logits, sampler)


def _typical_keep(
    draft_tokens: torch.Tensor,
    scoring_logits: torch.Tensor,
    sampler: Sampler,
    epsilon: float,
    delta: float,
) -> torch.Tensor:
    """(K,) whether draft token i passes the typical criterion at scoring row i."""
    target_probs = _target_probs(scoring_logits[: draft_tokens.shape[0]], sampler)  # (K, V)
    entropy = -(target_probs * target_probs.clamp_min(1e-30).log()).sum(-1)  # (K,)
    threshold = torch.minimum(torch.full_like(entropy, epsilon), delta * torch.exp(-entropy))
    return _draft_target_probs(draft_tokens, target_probs) > threshold


# --- the lossy policies on a token tree: the deepest path whose every node passes the same test,
# each node scored at its parent's row; then the target's own choice after the path. The keyword
# defaults repeat the chain forms' (a test checks that they agree).


def _deepest(keep: torch.Tensor, parents: torch.Tensor, target_logits: torch.Tensor,
             sampler: Sampler) -> TreeVerdict:  # fmt: skip
    """The deepest all-passing path of keep (N,), then the target's choice at its last node."""
    path = tree.deepest_passing(keep, parents)
    row = path[-1] + 1 if path else 0
    return TreeVerdict(path, int(sampler.choose(target_logits[row])))


def confidence_tree(
    draft_tokens: torch.Tensor,
    parents: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor,
    sampler: Sampler,
    *,
    tau: float = 0.3,
) -> TreeVerdict:
    """confidence on a tree (lossy)."""
    keep = _confidence_keep(draft_tokens, target_logits[parents + 1], sampler, tau)  # (N,)
    return _deepest(keep, parents, target_logits, sampler)


def topk_tree(
    draft_tokens: torch.Tensor,
    parents: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor,
    sampler: Sampler,
    *,
    k: int = 5,
) -> TreeVerdict:
    """topk on a tree (lossy)."""
    keep = _topk_keep(draft_tokens, target_logits[parents + 1], k)  # (N,)
    return _deepest(keep, parents, target_logits, sampler)


def typical_tree(
    draft_tokens: torch.Tensor,
    parents: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor,
    sampler: Sampler,
    *,
    epsilon: float = 0.09,
    delta: float = 0.3,
) -> TreeVerdict:
    """Medusa's typical acceptance on its candidate tree (lossy), as in Cai et al. 2024."""
    keep = _typical_keep(draft_tokens, target_logits[parents + 1], sampler, epsilon, delta)
    return _deepest(keep, parents, target_logits, sampler)


Policy = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor, Sampler], Verdict]
# (draft tokens (N,), parents (N,), draft probs (N, V) | None, target logits (N+1, V), sampler)
TreePolicy = Callable[
    [torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor, Sampler], TreeVerdict
]


@dataclass(frozen=True)
class PolicySpec:
    """A policy with its parameters bound, and what the speculative loop must know about it."""

    fn: Policy
    lossless: bool
    needs_draft_probs: bool
    params: dict[str, Any] = field(default_factory=dict)  # every parameter, defaults included
    tree: TreePolicy | None = None  # the same rule on a token tree; None: chains only

    def tree_rule(self) -> TreePolicy:
        """The tree form of this policy; raises if it has none."""
        if self.tree is None:
            takes = ", ".join(name for name, spec in POLICIES.items() if spec.tree is not None)
            raise ValueError(f"this policy cannot verify a token tree: use one of {takes}")
        return self.tree


POLICIES: dict[str, PolicySpec] = {
    "exact": PolicySpec(exact, lossless=True, needs_draft_probs=False, tree=tree.exact),
    "rejection": PolicySpec(rejection_sampling, lossless=True, needs_draft_probs=True,
                            tree=rejection_tree),
    "confidence": PolicySpec(confidence, lossless=False, needs_draft_probs=False,
                             tree=confidence_tree),
    "topk": PolicySpec(topk, lossless=False, needs_draft_probs=False, tree=topk_tree),
    "typical": PolicySpec(typical, lossless=False, needs_draft_probs=False, tree=typical_tree),
}  # fmt: skip


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
    tree_fn = functools.partial(spec.tree, **params) if params and spec.tree else spec.tree
    return replace(spec, fn=fn, tree=tree_fn, params=bound)
