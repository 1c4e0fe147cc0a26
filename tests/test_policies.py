"""Acceptance policies on hand-made logits; lossless sampling keeps the target's distribution."""

from __future__ import annotations

import pytest
import torch

from lab.engine.policies import exact, get_policy, rejection_sampling
from lab.engine.sampling import Sampler, SamplingParams

GREEDY = Sampler(SamplingParams(), seed=0, device=torch.device("cpu"))


def test_exact_greedy_longest_prefix():
    target_logits = torch.tensor([[0.0, 5.0, 1.0], [3.0, 0.0, 1.0], [0.0, 1.0, 4.0], [1, 2, 0.0]])
    # Target argmax per position: 1, 0, 2, 1.
    assert exact(torch.tensor([1, 0, 2]), None, target_logits, GREEDY).__dict__ == {
        "accepted": 3,
        "next_token": 1,
    }
    assert exact(torch.tensor([1, 2, 2]), None, target_logits, GREEDY).__dict__ == {
        "accepted": 1,
        "next_token": 0,
    }
    assert exact(torch.tensor([0, 0, 2]), None, target_logits, GREEDY).__dict__ == {
        "accepted": 0,
        "next_token": 1,
    }
    assert exact(torch.tensor([], dtype=torch.long), None, target_logits[:1], GREEDY).accepted == 0


def total_variation(samples: torch.Tensor, probs: torch.Tensor) -> float:
    counts = torch.bincount(samples, minlength=probs.numel()).float()
    return 0.5 * float((counts / counts.sum() - probs).abs().sum())


def emitted_pairs(policy, target_logits, draft_probs, n, seed=0):
    """First two emitted tokens of n independent steps, encoded as one id in [0, V*V)."""
    sampler = Sampler(SamplingParams(temperature=1.0), seed=seed, device=torch.device("cpu"))
    vocab = target_logits.shape[-1]
    out = []
    for _ in range(n):
        draft_tokens = sampler.sample(draft_probs)  # (K,)
        verdict = policy(draft_tokens, draft_probs, target_logits, sampler)
        tokens = draft_tokens[: verdict.accepted].tolist() + [verdict.next_token]
        if len(tokens) < 2:
            # After a rejection at position 0 the next token would come from the next step;
            # its distribution given this prefix is target position 1's in this toy model.
            tokens.append(int(sampler.sample(sampler.probs(target_logits[1]))))
        out.append(tokens[0] * vocab + tokens[1])
    return torch.tensor(out)


@pytest.mark.parametrize("seed", [0, 1])
def test_rejection_sampling_reproduces_target_distribution(seed):
    gen = torch.Generator().manual_seed(seed)
    vocab, k = 5, 3
    target_logits = torch.randn(k + 1, vocab, generator=gen) * 1.5  # (K+1, V)
    draft_probs = torch.softmax(torch.randn(k, vocab, generator=gen) * 1.5, -1)  # (K, V)
    target_probs = torch.softmax(target_logits, -1)
    # In this toy, each position's target distribution ignores the prefix, so the first two
    # emitted tokens must be independent draws from target positions 0 and 1.
    joint = torch.outer(target_probs[0], target_probs[1]).flatten()
    samples = emitted_pairs(rejection_sampling, target_logits, draft_probs, 20_000, seed)
    assert total_variation(samples, joint) < 0.03
    # The draft's own distribution is far from the target's: the check has teeth.
    draft_joint = torch.outer(draft_probs[0], draft_probs[1]).flatten()
    assert 0.5 * float((draft_joint - joint).abs().sum()) > 0.15


def test_naive_acceptance_would_fail_the_same_check():
    """Accepting every draft token (no correction) gives the draft's distribution: TV is large."""
    gen = torch.Generator().manual_seed(0)
    target_logits = torch.randn(4, 5, generator=gen) * 1.5
    draft_probs = torch.softmax(torch.randn(3, 5, generator=gen) * 1.5, -1)

    def accept_all(draft_tokens, draft_probs, target_logits, sampler):
        return type(exact(draft_tokens[:0], None, target_logits[:1], sampler))(3, 0)

    joint = torch.outer(*torch.softmax(target_logits[:2], -1)).flatten()
    samples = emitted_pairs(accept_all, target_logits, draft_probs, 10_000)
    assert total_variation(samples, joint) > 0.1


def test_exact_sampling_reproduces_target_distribution():
    gen = torch.Generator().manual_seed(3)
    target_logits = torch.randn(4, 5, generator=gen) * 1.5
    draft_probs = torch.softmax(torch.randn(3, 5, generator=gen), -1)
    joint = torch.outer(*torch.softmax(target_logits[:2], -1)).flatten()
    samples = emitted_pairs(exact, target_logits, draft_probs, 20_000)
    assert total_variation(samples, joint) < 0.03


def test_rejection_boundaries():
    sampler = Sampler(SamplingParams(temperature=1.0), seed=0, device=torch.device("cpu"))
    target_logits = torch.log(torch.tensor([[0.0, 1.0, 0.0], [1.0, 0.0, 0.0]]) + 1e-30)
    # Draft proposes a token the target gives zero mass: always rejected, correction is token 1.
    verdict = rejection_sampling(
        torch.tensor([2]), torch.tensor([[0.0, 0.0, 1.0]]), target_logits, sampler
    )
    assert (verdict.accepted, verdict.next_token) == (0, 1)
    # Draft proposes the target's sure token: always accepted, bonus from position 1.
    verdict = rejection_sampling(
        torch.tensor([1]), torch.tensor([[0.0, 1.0, 0.0]]), target_logits, sampler
    )
    assert (verdict.accepted, verdict.next_token) == (1, 0)
    with pytest.raises(ValueError, match="draft_probs"):
        rejection_sampling(torch.tensor([1]), None, target_logits, sampler)


def test_unknown_policy_lists_valid_names():
    with pytest.raises(ValueError, match="unknown policy 'nope'.*exact.*rejection"):
        get_policy("nope")


def test_top_k_top_p():
    sampler = Sampler(SamplingParams(temperature=1.0, top_k=2), 0, torch.device("cpu"))
    probs = sampler.probs(torch.tensor([1.0, 3.0, 2.0, 0.0]))
    assert probs[0] == 0 and probs[3] == 0 and torch.isclose(probs.sum(), torch.tensor(1.0))
    sampler = Sampler(SamplingParams(temperature=1.0, top_p=0.5), 0, torch.device("cpu"))
    probs = sampler.probs(torch.log(torch.tensor([0.1, 0.6, 0.3])))
    assert torch.equal(probs, torch.tensor([0.0, 1.0, 0.0]))
    with pytest.raises(ValueError, match="top_p"):
        SamplingParams(top_p=0.0)
