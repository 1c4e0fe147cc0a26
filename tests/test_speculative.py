"""Greedy speculative decoding reproduces the greedy baseline token for token."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lab.drafting.draft_model import DraftModel
from lab.engine import loop
from lab.engine.controllers import FixedK, HeuristicK, make_controller
from lab.engine.loop import Speculation
from lab.engine.model import LoadedModel
from lab.engine.policies import get_policy
from lab.engine.sampling import SamplingParams


def spec(
    target: LoadedModel,
    draft: LoadedModel,
    ids: list[int],
    k: int,
    n: int,
    policy: str = "exact",
    params: SamplingParams | None = None,
    seed: int = 0,
):
    return loop.generate(
        target,
        ids,
        n,
        params,
        seed,
        speculation=Speculation(DraftModel(draft), get_policy(policy), FixedK(k)),
    )


@pytest.mark.parametrize(
    "pair",
    [("llama", "llama"), ("llama", "llama_draft"), ("qwen2", "qwen2"), ("qwen2", "qwen2_draft")],
)
@pytest.mark.parametrize("k", range(1, 9))
def test_greedy_equals_baseline(request, pair, k, prompt_ids):
    target, draft = (request.getfixturevalue(name) for name in pair)
    base = loop.generate(target, prompt_ids, 48)
    out = spec(target, draft, prompt_ids, k, 48)
    assert out.token_ids == base.token_ids
    assert len(out.token_ids) == 48
    if draft is target:
        # The target drafting for itself is accepted in full at every step.
        assert out.acceptance_rate == 1.0
        assert all(s.accepted == s.proposed for s in out.steps)
    else:
        # An unrelated random model almost never guesses the target's token.
        assert out.acceptance_rate is not None and out.acceptance_rate < 0.2


def test_baseline_equals_hf_generate(llama, qwen2, prompt_ids):
    for lm in (llama, qwen2):
        base = loop.generate(lm, prompt_ids, 40)
        hf = lm.model.generate(
            torch.tensor([prompt_ids]),
            max_new_tokens=40,
            do_sample=False,
            eos_token_id=list(lm.eos_token_ids),
            pad_token_id=0,
        )
        assert base.token_ids == hf[0, len(prompt_ids) :].tolist()


@pytest.mark.parametrize("k", [2, 4, 8])
def test_eos_inside_accepted_block(llama, prompt_ids, k):
    free = loop.generate(llama, prompt_ids, 48)
    # Declare the token at position 9 an EOS: generation must stop right after its first
    # occurrence, even though the self-draft's block runs past it.
    eos = free.token_ids[9]
    stop_at = free.token_ids.index(eos) + 1
    lm = dataclasses.replace(llama, eos_token_ids=(eos,))
    base = loop.generate(lm, prompt_ids, 48)
    out = spec(lm, lm, prompt_ids, k, 48)
    assert base.token_ids == free.token_ids[:stop_at]
    assert out.token_ids == base.token_ids
    assert out.stop_reason == base.stop_reason == "eos"
    last = out.steps[-1]
    assert last.emitted < last.accepted + 1  # the cut happened inside the accepted block


@pytest.mark.parametrize("k,n", [(4, 1), (4, 2), (4, 7), (3, 10), (8, 13), (5, 6)])
def test_max_new_tokens_mid_block(llama, prompt_ids, k, n):
    base = loop.generate(llama, prompt_ids, n)
    out = spec(llama, llama, prompt_ids, k, n)
    assert out.token_ids == base.token_ids
    assert out.new_tokens == n
    assert sum(s.emitted for s in out.steps) == n - 1  # the first token comes from the prefill


def test_heuristic_controller_equality(llama, llama_draft, prompt_ids):
    base = loop.generate(llama, prompt_ids, 40)
    for draft in (llama, llama_draft):
        for controller in (HeuristicK(3), make_controller("adaptive", 3, window=2, max_k=6)):
            out = loop.generate(
                llama,
                prompt_ids,
                40,
                speculation=Speculation(DraftModel(draft), get_policy("exact"), controller),
            )
            assert out.token_ids == base.token_ids


@pytest.mark.parametrize("policy", ["exact", "rejection"])
def test_sampling_is_seeded_and_self_draft_accepts_all(llama, prompt_ids, policy):
    params = SamplingParams(temperature=0.8, top_k=50, top_p=0.95)
    first = spec(llama, llama, prompt_ids, 4, 40, policy, params, seed=7)
    again = spec(llama, llama, prompt_ids, 4, 40, policy, params, seed=7)
    other = spec(llama, llama, prompt_ids, 4, 40, policy, params, seed=8)
    assert first.token_ids == again.token_ids
    assert first.token_ids != other.token_ids
    if policy == "rejection":
        # Draft distribution equals the target's: the acceptance ratio is 1 at every position.
        assert first.acceptance_rate == 1.0


def test_rejection_sampling_greedy_equals_baseline(llama, llama_draft, prompt_ids):
    base = loop.generate(llama, prompt_ids, 40)
    for draft in (llama, llama_draft):
        assert spec(llama, draft, prompt_ids, 4, 40, "rejection").token_ids == base.token_ids


def test_records_are_consistent(llama, llama_draft, prompt_ids):
    out = spec(llama, llama_draft, prompt_ids, 3, 30)
    assert out.new_tokens == 1 + sum(s.emitted for s in out.steps)
    assert [s.step for s in out.steps] == list(range(len(out.steps)))
    for s in out.steps:
        assert s.emitted == s.accepted + 1 and s.proposed <= s.k
        assert s.step_ms >= s.draft_ms + s.verify_ms - 1e-6 and s.rss_mb > 0
    assert out.ttft_ms > 0 and out.tokens_per_s > 0 and out.peak_rss_mb > 0
    base = loop.generate(llama, prompt_ids, 30)
    assert base.acceptance_rate is None and base.mean_accepted_length == 1.0
    assert set(base.to_dict()) == set(out.to_dict())
