"""Lossy acceptance policies on hand-made logits, boundary values included; the registry."""

from __future__ import annotations

import math

import pytest
import torch

from lab.engine.policies import (
    POLICIES,
    confidence,
    get_policy,
    make_policy,
    policy_defaults,
    topk,
    typical,
)
from lab.engine.sampling import Sampler, SamplingParams

GREEDY = Sampler(SamplingParams(), seed=0, device=torch.device("cpu"))
NEG = -math.inf


def logits(*rows: list[float]) -> torch.Tensor:
    """(K+1, V) target logits; zeros and -inf give exact probabilities (1/n over n zeros)."""
    return torch.tensor(rows)


def draft(*tokens: int) -> torch.Tensor:
    return torch.tensor(tokens, dtype=torch.long)


# Probabilities: row 0 is 1/2 on tokens 0 and 1; row 1 is 1/4 on each token; row 2 is 1 on
# token 3; the last row (the bonus position) prefers token 2.
HALF = [0.0, 0.0, NEG, NEG]
QUARTER = [0.0, 0.0, 0.0, 0.0]
SURE = [NEG, NEG, NEG, 0.0]
BONUS = [0.0, 1.0, 5.0, 2.0]


def test_confidence_accepts_at_exactly_tau():
    target_logits = logits(HALF, QUARTER, SURE, BONUS)
    verdict = confidence(draft(1, 2, 3), None, target_logits, GREEDY, tau=0.5)
    # 0.5 >= 0.5 keeps the first draft; 0.25 < 0.5 stops at the second; the target's argmax
    # there (the first of four tied tokens) follows.
    assert (verdict.accepted, verdict.next_token) == (1, 0)
    assert confidence(draft(1, 2, 3), None, target_logits, GREEDY, tau=0.25).accepted == 3
    assert confidence(draft(1, 2, 3), None, target_logits, GREEDY, tau=0.25).next_token == 2
    assert confidence(draft(1, 2, 3), None, target_logits, GREEDY, tau=0.5000001).accepted == 0
    # A token the target gives no mass is never kept, even at the smallest tau.
    assert confidence(draft(2, 2, 3), None, target_logits, GREEDY, tau=1e-9).accepted == 0


def test_confidence_uses_the_sampling_temperature():
    # At temperature 1 token 0 has 0.9; at temperature 2 the logits halve and it has 0.75.
    target_logits = torch.tensor([[2 * math.log(3.0), 0.0], [0.0, 0.0]])
    assert confidence(draft(0), None, target_logits, GREEDY, tau=0.8).accepted == 1
    hot = Sampler(SamplingParams(temperature=2.0), seed=0, device=torch.device("cpu"))
    assert confidence(draft(0), None, target_logits, hot, tau=0.8).accepted == 0
    assert confidence(draft(0), None, target_logits, hot, tau=0.7).accepted == 1


def test_topk_rank_boundary():
    row = [3.0, 2.0, 2.0, 1.0, 0.0]  # token 0 first, 1 and 2 tied second, 3 fourth
    target_logits = logits(row, row, row)
    assert topk(draft(0, 0), None, target_logits, GREEDY, k=1).accepted == 2
    assert topk(draft(1, 0), None, target_logits, GREEDY, k=1).accepted == 0
    # Ties with the k-th most likely token count as inside the top k.
    assert topk(draft(2, 1), None, target_logits, GREEDY, k=2).accepted == 2
    # Token 3 has rank 3 (three tokens beat it): inside top 4, outside top 3.
    assert topk(draft(3, 3), None, target_logits, GREEDY, k=4).accepted == 2
    verdict = topk(draft(3, 3), None, target_logits, GREEDY, k=3)
    assert (verdict.accepted, verdict.next_token) == (0, 0)


def test_typical_epsilon_boundary_is_strict():
    target_logits = logits(HALF, HALF, BONUS)
    # delta * exp(-H) = 10 * 0.5 = 5 > epsilon, so the threshold is epsilon itself.
    verdict = typical(draft(1, 0), None, target_logits, GREEDY, epsilon=0.5, delta=10.0)
    assert (verdict.accepted, verdict.next_token) == (0, 0)  # 0.5 > 0.5 is false
    verdict = typical(draft(1, 0), None, target_logits, GREEDY, epsilon=0.4999, delta=10.0)
    assert (verdict.accepted, verdict.next_token) == (2, 2)


def test_typical_entropy_lowers_the_threshold():
    target_logits = logits(QUARTER, QUARTER)
    # Uniform over 4: H = ln 4, so delta * exp(-H) = delta / 4.
    assert typical(draft(3), None, target_logits, GREEDY, epsilon=0.3, delta=0.3).accepted == 1
    assert typical(draft(3), None, target_logits, GREEDY, epsilon=0.3, delta=2.0).accepted == 0
    # A confident target (entropy near 0) demands more than an unlikely token's probability.
    sure = logits([10.0, 0.0, 0.0, 0.0], BONUS)
    assert typical(draft(1), None, sure, GREEDY).accepted == 0
    assert typical(draft(0), None, sure, GREEDY).accepted == 1


@pytest.mark.parametrize("name", ["confidence", "topk", "typical"])
def test_no_draft_gives_the_targets_token(name):
    verdict = get_policy(name).fn(draft(), None, logits(BONUS), GREEDY)
    assert (verdict.accepted, verdict.next_token) == (0, 2)


def test_sampled_next_token_comes_from_the_target():
    sampler = Sampler(SamplingParams(temperature=1.0), seed=0, device=torch.device("cpu"))
    target_logits = logits(SURE, SURE)
    for _ in range(20):
        verdict = confidence(draft(0), None, target_logits, sampler, tau=0.5)
        assert (verdict.accepted, verdict.next_token) == (0, 3)


def test_registry_flags_lossy_policies():
    assert {n for n, s in POLICIES.items() if not s.lossless} == {"confidence", "topk", "typical"}
    assert not any(POLICIES[n].needs_draft_probs for n in ("confidence", "topk", "typical"))
    assert policy_defaults("typical") == {"epsilon": 0.09, "delta": 0.3}
    assert policy_defaults("exact") == {}
    assert get_policy("typical").fn is typical


def test_make_policy_binds_params():
    spec = make_policy("confidence", tau=0.25)
    assert spec.params == {"tau": 0.25} and not spec.lossless
    target_logits = logits(QUARTER, BONUS)
    assert spec.fn(draft(1), None, target_logits, GREEDY).accepted == 1
    assert make_policy("confidence").fn(draft(1), None, target_logits, GREEDY).accepted == 0
    assert make_policy("typical", delta=0.5).params == {"epsilon": 0.09, "delta": 0.5}
    assert make_policy("exact").params == {}


@pytest.mark.parametrize(
    "name,params,message",
    [
        ("topk", {"tau": 0.3}, "policy 'topk' has no parameter tau; it takes k"),
        ("exact", {"k": 2}, "policy 'exact' has no parameter k; it takes no parameters"),
        ("confidence", {"tau": 0.0}, r"tau must be a probability in \(0, 1\], got 0.0"),
        ("confidence", {"tau": 1.5}, "tau must be a probability"),
        ("topk", {"k": 0}, "k must be an integer >= 1, got 0"),
        ("topk", {"k": 2.5}, "k must be an integer >= 1"),
        ("topk", {"k": True}, "k must be an integer >= 1"),
        ("typical", {"delta": -1}, "delta must be a number > 0"),
        ("typical", {"epsilon": "a"}, "epsilon must be a probability"),
        ("nope", {}, "unknown policy 'nope': use one of exact, rejection, confidence"),
    ],
)
def test_make_policy_errors_name_the_problem(name, params, message):
    with pytest.raises(ValueError, match=message):
        make_policy(name, **params)
