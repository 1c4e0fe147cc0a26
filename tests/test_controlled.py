"""The controlled drafter: lossless under exact, per-token acceptance a, tau 1 + sum a^i; bench."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lab import cli
from lab.bench import hf
from lab.drafting.controlled import ControlledDrafter, expected_accepted, expected_tau
from lab.drafting.oracle import settle
from lab.drafting.prompt_lookup import PromptLookup
from lab.drafting.registry import drafter_settings
from lab.engine import loop
from lab.engine.controllers import FixedK
from lab.engine.loop import Speculation
from lab.engine.model import LoadedModel
from lab.engine.policies import get_policy
from lab.engine.records import PromptResult, StepRecord, predicted_speedup
from lab.engine.sampling import Sampler, SamplingParams
from lab.method import Method, make_drafter

CPU = torch.device("cpu")
GREEDY = Sampler(SamplingParams(), seed=0, device=CPU)
N = 32  # new tokens per generation in the equality tests
V = 259  # the tiny models' vocabulary


@pytest.fixture(scope="module")
def base(qwen2: LoadedModel, prompt_ids: list[int]) -> PromptResult:
    """The greedy baseline on the loop's longest run here (shorter runs read its prefix)."""
    return loop.generate(qwen2, prompt_ids, 256)


def controlled(
    target: LoadedModel, draft: LoadedModel, base: PromptResult, a: float, seed: int = 0
) -> ControlledDrafter:
    method = Method("controlled", drafter_params={"acceptance": a, "seed": seed})
    drafter = make_drafter(
        method, target, draft, reference={tuple(base.prompt_ids): base.token_ids}
    )
    assert isinstance(drafter, ControlledDrafter)
    return drafter


def speculate(
    target: LoadedModel, drafter: ControlledDrafter, ids: list[int], n: int, k: int, policy: str
) -> PromptResult:
    speculation = Speculation(drafter, get_policy(policy), FixedK(k))
    return loop.generate(target, ids, n, speculation=speculation)


def full_steps(result: PromptResult, k: int) -> list[StepRecord]:
    """Steps that drafted all K (the last ones draft fewer, so as not to pass max_new_tokens)."""
    return [s for s in result.steps if s.proposed == k]


@pytest.mark.parametrize("a", [0.0, 0.5, 1.0])
@pytest.mark.parametrize("k", [1, 3])
def test_greedy_speculation_equals_the_baseline(qwen2, qwen2_draft, prompt_ids, base, a, k):
    out = speculate(qwen2, controlled(qwen2, qwen2_draft, base, a), prompt_ids, N, k, "exact")
    assert out.token_ids == base.token_ids[:N]
    accepted = [s.accepted for s in out.steps]
    if a == 0.0:
        assert sum(accepted) == 0
    if a == 1.0:  # every draft right: each full step emits K + 1
        assert out.acceptance_rate == 1.0
        assert all(s.emitted == k + 1 for s in full_steps(out, k))
    if a == 0.5:
        assert 0 < sum(accepted) < sum(s.proposed for s in out.steps)


def test_the_draft_model_really_runs(qwen2, qwen2_draft, prompt_ids, base):
    # The cost is real: one draft-model forward per drafted token, as the draft model drafts.
    calls = []
    hook = qwen2_draft.model.register_forward_hook(lambda *args: calls.append(1))
    try:
        out = speculate(qwen2, controlled(qwen2, qwen2_draft, base, 0.5), prompt_ids, N, 3, "exact")
    finally:
        hook.remove()
    drafted = sum(s.proposed for s in out.steps)
    assert drafted > 3 * 5 and len(calls) == 1 + drafted  # 1: the draft's prefill


def test_per_token_acceptance_in_the_loop(qwen2, qwen2_draft, prompt_ids, base):
    # K = 1: each step keeps its one draft with probability a, a Bernoulli(a) trial. 256 new
    # tokens at a = 0.7 take about 255 / 1.7 = 150 steps: SE = sqrt(0.7 * 0.3 / 150) = 0.037,
    # so 3 SE = 0.11; the bound below uses the run's own n. Always right would give 1.0.
    a = 0.7
    out = speculate(qwen2, controlled(qwen2, qwen2_draft, base, a), prompt_ids, 256, 1, "exact")
    assert out.token_ids == base.token_ids
    steps = full_steps(out, 1)
    assert len(steps) > 120
    rate = sum(s.accepted for s in steps) / len(steps)
    assert abs(rate - a) < 3 * math.sqrt(a * (1 - a) / len(steps))


def test_tau_in_the_loop(qwen2, qwen2_draft, prompt_ids, base):
    # K = 4, a = 0.7: P(A = j) = a^j (1 - a) for j < 4, P(A = 4) = a^4, so E[A] = 0.7 + 0.49 +
    # 0.343 + 0.2401 = 1.7731, tau = 2.7731; E[A^2] = 0.21 + 0.588 + 0.9261 + 3.8416 = 5.5657,
    # Var = 5.5657 - 1.7731^2 = 2.4218, SD = 1.556. 256 tokens take about 255 / 2.77 = 92 steps:
    # 3 SE = 3 * 1.556 / sqrt(92) = 0.49. One draw per step (all right or all wrong) would give
    # tau = 1 + 4a = 3.8, always right 5.
    a, k = 0.7, 4
    assert expected_tau(a, k) == pytest.approx(2.7731)
    out = speculate(qwen2, controlled(qwen2, qwen2_draft, base, a), prompt_ids, 256, k, "exact")
    assert out.token_ids == base.token_ids
    steps = full_steps(out, k)
    assert len(steps) > 70
    tau = 1 + sum(s.accepted for s in steps) / len(steps)
    assert abs(tau - 2.7731) < 3 * 1.556 / math.sqrt(len(steps))


def accepted_runs(a: float, k: int, steps: int, seed: int = 0) -> tuple[list[int], list[int]]:
    """Proposals against a known continuation: (accepted prefix per step, wrong tokens' offsets).

    The wrapped drafter is prompt lookup (no model), so many proposals take little time; each
    step starts at a fresh position of a random reference, as the loop's steps do.
    """
    generator = torch.Generator().manual_seed(1)
    reference = torch.randint(0, V, (steps + k,), generator=generator).tolist()
    prompt = [1, 2, 3]
    drafter = ControlledDrafter(PromptLookup(V, 1), {tuple(prompt): reference}, V, CPU, a, seed)
    drafter.start(prompt)
    accepted, offsets = [], []
    for j in range(steps):
        tokens = drafter.propose(prompt + reference[:j], k, GREEDY, False).tokens.tolist()
        right = reference[j : j + k]
        matches = [t == r for t, r in zip(tokens, right, strict=True)]
        accepted.append(next((i for i, m in enumerate(matches) if not m), k))
        offsets += [(t - r) % V for t, r in zip(tokens, right, strict=True) if t != r]
    return accepted, offsets


def test_per_token_probability_is_a():
    # 10000 Bernoulli(0.7) draws: SE = sqrt(0.21 / 10000) = 0.00458, 3 SE = 0.0137.
    accepted, _ = accepted_runs(0.7, 1, 10_000)
    assert abs(sum(accepted) / 10_000 - 0.7) < 0.0137


def test_accepted_run_is_a_truncated_geometric():
    # K = 4, a = 0.5: P(A >= i) = 0.5^i, E[A] = 0.9375; E[A^2] = 0.25 + 4 * 0.125 + 9 * 0.0625 +
    # 16 * 0.0625 = 2.3125, Var = 2.3125 - 0.9375^2 = 1.4336, SD = 1.197; over 4000 steps 3 SE =
    # 3 * 1.197 / sqrt(4000) = 0.0568. And P(A >= 3) = 0.125: SE sqrt(0.125 * 0.875 / 4000) =
    # 0.00523, 3 SE = 0.0157.
    accepted, _ = accepted_runs(0.5, 4, 4000)
    assert expected_accepted(0.5, 4) == 0.9375
    assert abs(sum(accepted) / 4000 - 0.9375) < 0.0568
    assert abs(sum(a >= 3 for a in accepted) / 4000 - 0.125) < 0.0157


def test_wrong_tokens_are_never_right_and_cover_the_others():
    # a = 0: every token wrong; offsets (wrong - right) mod V lie in 1..V-1, each of the 258
    # about 4000 / 258 = 15.5 times (one missing: about 258 * e^-15.5 = 5e-5).
    _, offsets = accepted_runs(0.0, 1, 4000)
    assert len(offsets) == 4000
    assert set(offsets) == set(range(1, V))


def test_runs_repeat_exactly(qwen2, qwen2_draft, prompt_ids, base):
    def pattern(drafter: ControlledDrafter) -> list[int]:
        return [s.accepted for s in speculate(qwen2, drafter, prompt_ids, N, 3, "exact").steps]

    drafter = controlled(qwen2, qwen2_draft, base, 0.5)
    first = pattern(drafter)
    # Reseeded per prompt at start: the same drafter run again repeats; another seed differs.
    assert pattern(drafter) == first
    assert pattern(controlled(qwen2, qwen2_draft, base, 0.5, seed=1)) != first
    a, _ = accepted_runs(0.5, 2, 200, seed=0)
    b, _ = accepted_runs(0.5, 2, 200, seed=0)
    assert a == b


def test_point_mass_probs_make_rejection_sampling_exact(qwen2, qwen2_draft, prompt_ids, base):
    drafter = controlled(qwen2, qwen2_draft, base, 0.5)
    drafter.start(prompt_ids)
    # As in the loop: the sequence has the target's first token, which the draft has not read.
    proposal = drafter.propose(prompt_ids + base.token_ids[:1], 3, GREEDY, True)
    assert proposal.probs is not None and proposal.probs.shape == (3, V)
    assert proposal.probs.sum(-1).tolist() == [1.0] * 3
    assert proposal.probs.argmax(-1).tolist() == proposal.tokens.tolist()
    # At temperature 0 rejection sampling keeps a draft exactly when exact does.
    runs = {
        policy: speculate(
            qwen2, controlled(qwen2, qwen2_draft, base, 0.5), prompt_ids, N, 3, policy
        )
        for policy in ("exact", "rejection")
    }
    assert runs["rejection"].token_ids == base.token_ids[:N]
    accepted = {p: [s.accepted for s in r.steps] for p, r in runs.items()}
    assert accepted["rejection"] == accepted["exact"]


def test_bad_settings_and_missing_inputs(qwen2, qwen2_draft, base):
    assert drafter_settings("controlled") == {"acceptance": 0.7, "seed": 0}
    for bad in (1.5, -0.1, float("nan"), "high", True):
        with pytest.raises(ValueError, match="acceptance"):
            drafter_settings("controlled", acceptance=bad)
    for seed in (-1, 0.5, True):
        with pytest.raises(ValueError, match="seed"):
            drafter_settings("controlled", seed=seed)
    method = Method("controlled", drafter_params={"acceptance": 0.5})
    with pytest.raises(ValueError, match="got no continuations"):
        make_drafter(method, qwen2, qwen2_draft)
    with pytest.raises(ValueError, match="got no draft model"):
        make_drafter(method, qwen2, None, reference={(1,): [2]})
    with pytest.raises(KeyError, match="no continuation"):
        controlled(qwen2, qwen2_draft, base, 0.5).start([9, 9])


def test_bench_methods_follow_their_baselines():
    table = hf.methods("d", static_cache=True, acceptance=[0.5, 0.9])
    assert list(table)[:4] == list(hf.methods("d"))[:4]
    assert table["lab_speculative_controlled_a0.5"] == hf.BenchMethod(
        "dynamic", "controlled", "lab_baseline", 0.5
    )
    assert table["lab_speculative_controlled_a0.9_static"].reference == "lab_baseline_static"
    assert set(hf.methods("d", static_cache=True)) == set(table) - {
        hf.controlled_name(a, s) for a in (0.5, 0.9) for s in (False, True)
    }


def test_bench_acceptance_rejects_bad_values_before_loading(monkeypatch, capsys):
    from lab.models import random as random_models

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(random_models, "load", refuse)
    assert cli.main(["bench", "--target", "tiny-random-qwen2", "--acceptance", "0.5", "1.2"]) == 2
    assert "acceptance must be in [0, 1], got 1.2" in capsys.readouterr().err


def test_bench_reports_controlled_methods_against_leviathan(capsys):
    k = 3
    args = ["bench", "--target", "tiny-random-qwen2", "--draft", "tiny-random-qwen2-draft",
            "--k", str(k), "--max-new-tokens", "12", "--categories", "code", "--static-cache",
            "--acceptance", "0", "0.5", "1", "--json"]  # fmt: skip
    assert cli.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["identical"] is True
    for cache, suffix in (("dynamic", ""), ("static", "_static")):
        never = out["methods"][f"lab_speculative_controlled_a0{suffix}"]
        always = out["methods"][f"lab_speculative_controlled_a1{suffix}"]
        assert never["cache"] == always["cache"] == cache
        assert never["acceptance_rate"] == 0.0 and never["tau"] == 1.0
        assert always["acceptance_rate"] == 1.0 and always["expected_tau"] == k + 1
        # 11 tokens after the prefill's: steps of 4, 4 and then 3 (K cut to 2 at the end).
        assert always["tau"] == pytest.approx(11 / 3)
        half = out["methods"][f"lab_speculative_controlled_a0.5{suffix}"]
        # a = 0.5, K = 3: 0.5 + 0.25 + 0.125 = 0.875 accepted of 3 drafted; Leviathan's
        # (1 - 0.5^4) / ((1 - 0.5)(3c + 1)) = 1.875 / (3c + 1), from a, not the rate.
        assert half["expected_acceptance_rate"] == pytest.approx(0.875 / 3)
        assert half["predicted_speedup"] == pytest.approx(1.875 / (3 * half["c"] + 1))
        for info in (never, half, always):
            assert info["settle_passes"] == 1 and info["c"] > 0 and info["speedup"] > 0
            c = info["c"]
            assert info["predicted_speedup"] == predicted_speedup(info["acceptance"], k, c)
            assert hf.controlled_line(info).startswith(
                f"controlled a={info['acceptance']:g} on {cache}: speed-up"
            )
    # Leviathan at a = 0: no draft ever kept, so the draft's cost is pure loss: 1 / (cK + 1).
    assert never["predicted_speedup"] == pytest.approx(1 / (never["c"] * k + 1))


def test_settling_finds_the_path_s_own_continuation(qwen2, qwen2_draft, prompt_ids, base):
    # A reference wrong from token 10 on (as bf16 verification can make it): the first pass
    # leaves it there, the second replays the path's own output and follows it to the end.
    reference = base.token_ids[:10] + [(t + 1) % V for t in base.token_ids[10:N]]
    run = hf._controlled(qwen2, qwen2, qwen2_draft, 3, 1.0)
    result, passes = settle(run, qwen2, prompt_ids, reference, N)
    assert passes == 2 and result.token_ids == base.token_ids[:N]
    assert result.acceptance_rate == 1.0
