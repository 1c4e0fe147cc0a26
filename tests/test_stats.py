"""Every statistic of lab.stats and lab.engine.records against values worked out by hand."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd
import pytest

from lab import stats
from lab.engine.records import (
    PromptResult,
    StepRecord,
    acceptance_rate,
    cost_ratio,
    mean_accepted_length,
    predicted_speedup,
)
from lab.report.tables import ci, fmt_ci, make_table


def _rows(total_ms: list[float], new_tokens: list[int] | None = None, **extra: Any) -> pd.DataFrame:
    """per_prompt-shaped rows: one prompt per time, question ids '0', '1', ..."""
    tokens = new_tokens or [10] * len(total_ms)
    frame = pd.DataFrame({"total_ms": total_ms, "new_tokens": tokens, **extra})
    frame.index = [str(i) for i in range(len(total_ms))]
    return frame


def _step(proposed: int, accepted: int, emitted: int, draft_ms: float = 0.0) -> StepRecord:
    return StepRecord(
        step=0, k=proposed, proposed=proposed, depth=proposed, accepted=accepted,
        emitted=emitted, draft_ms=draft_ms, verify_ms=1.0, step_ms=1.0, rss_mb=0.0,
    )  # fmt: skip


# --- speed-ups ------------------------------------------------------------------------------


def test_speedup_is_baseline_time_over_method_time() -> None:
    # The method takes half the baseline's time on every prompt: 2.0x, not 0.5x.
    out = stats.paired_speedup(_rows([50, 100, 200]), _rows([100, 200, 400]), seed=0)
    assert out["speedup"] == pytest.approx(2.0)
    assert (out["speedup_ci_low"], out["speedup_ci_high"]) == pytest.approx((2.0, 2.0))
    assert out["speedup_n"] == 3


def test_speedup_is_the_geometric_mean() -> None:
    # Ratios 2 and 0.5: geometric mean 1 (the arithmetic mean would be 1.25).
    out = stats.paired_speedup(_rows([100, 200]), _rows([200, 100]), seed=0)
    assert out["speedup"] == pytest.approx(1.0)
    assert stats.bootstrap_geomean(np.array([1.0, 4.0]), seed=0)[0] == pytest.approx(2.0)
    assert stats.bootstrap_geomean(np.array([2.0, 8.0, 4.0]), seed=0)[0] == pytest.approx(4.0)


def test_speedup_pairs_prompts_by_id() -> None:
    # Prompt '1' is missing from the baseline: only '0' (ratio 3) counts.
    out = stats.paired_speedup(_rows([100, 100]), _rows([300]), seed=0)
    assert out["speedup"] == pytest.approx(3.0) and out["speedup_n"] == 1
    with pytest.raises(ValueError, match="no prompt in common"):
        stats.paired_speedup(_rows([100]), _rows([100]).rename(index={"0": "x"}), seed=0)


def test_throughput_ratio_by_hand() -> None:
    # Method 60 tokens in 400 ms (0.15/ms), baseline 70 tokens in 700 ms (0.10/ms): 1.5.
    # Per-prompt ratios are 4 and 1: geomean 2, arithmetic mean 2.5, both different from 1.5.
    method, base = _rows([100, 300], [10, 50]), _rows([400, 300], [20, 50])
    out = stats.paired_speedup(method, base, seed=0)
    assert out["throughput_ratio"] == pytest.approx(1.5)
    assert out["speedup"] == pytest.approx(2.0)


# --- the bootstrap and the n >= 3 rule ------------------------------------------------------


def test_bootstrap_is_deterministic_and_contains_the_estimate() -> None:
    ratios = np.array([0.8, 1.1, 1.3, 0.9, 1.6, 1.2])
    mid, low, high = stats.bootstrap_geomean(ratios, seed=7)
    assert stats.bootstrap_geomean(ratios, seed=7) == (mid, low, high)
    assert stats.bootstrap_geomean(ratios, seed=8) != (mid, low, high)
    assert low is not None and high is not None
    assert ratios.min() <= low < mid < high <= ratios.max()
    assert mid == pytest.approx(math.prod(ratios) ** (1 / 6))


def test_bootstrap_covers_the_true_geometric_mean() -> None:
    # Lognormal ratios with log-mean 0.2: the true geometric mean is e^0.2. The percentile
    # bootstrap's 95% interval from n = 30 holds it in about 93.6% of draws (it uses z, not t29,
    # and the 1/n variance: P(|t29| < 1.96 sqrt(29/30))). 2000 draws: standard error 0.0055.
    rng = np.random.default_rng(0)
    draws, hits = 2000, 0
    for i in range(draws):
        _, low, high = stats.bootstrap_geomean(np.exp(rng.normal(0.2, 0.5, size=30)), seed=i)
        assert low is not None and high is not None
        hits += low <= math.exp(0.2) <= high
    assert 0.92 <= hits / draws <= 0.97


def test_bootstrap_rejects_bad_ratios() -> None:
    for bad in ([], [1.0, 0.0, 2.0], [1.0, -2.0, 1.0]):
        with pytest.raises(ValueError, match="positive"):
            stats.bootstrap_geomean(np.array(bad), seed=0)


def test_no_interval_below_three_prompts() -> None:
    two = stats.paired_speedup(_rows([100, 200]), _rows([200, 100]), seed=0)
    assert (two["speedup_ci_low"], two["speedup_ci_high"], two["speedup_n"]) == (None, None, 2)
    three = stats.paired_speedup(_rows([100, 200, 100]), _rows([200, 100, 100]), seed=0)
    assert three["speedup_n"] == 3
    assert three["speedup_ci_low"] < three["speedup"] < three["speedup_ci_high"]


def test_table_shows_n_where_there_is_no_interval() -> None:
    data = pd.DataFrame(
        {"configuration": ["a", "b"], "speedup": [1.234, 2.0], "speedup_ci_low": [None, 1.5],
         "speedup_ci_high": [None, 2.5], "speedup_n": [2, 3]}
    )[["configuration", *ci("speedup")]]  # fmt: skip
    shown = make_table("t", "caption", data).shown
    assert list(shown.columns) == ["configuration", "speed-up [95% CI]"]
    assert shown["speed-up [95% CI]"].tolist() == ["1.23 (n=2)", "2.00 [1.50, 2.50]"]
    assert fmt_ci(1.234, None, None) == "1.23" and fmt_ci(None, None, None, 2) == "n/a"
    assert fmt_ci(1.234, float("nan"), float("nan"), 2.0) == "1.23 (n=2)"  # as read from a CSV


# --- acceptance, tau, c, Leviathan ----------------------------------------------------------

# A hand-made step table: 5 tokens proposed, 3 accepted, 6 emitted in 3 steps, 10 ms drafting.
STEPS = [_step(2, 2, 3, 4.0), _step(2, 0, 1, 4.0), _step(1, 1, 2, 2.0)]


def test_acceptance_rate_by_hand() -> None:
    assert acceptance_rate(STEPS) == pytest.approx(3 / 5)
    assert acceptance_rate([_step(0, 0, 1)]) is None  # the baseline proposes nothing


def test_tau_counts_the_bonus_token() -> None:
    assert mean_accepted_length(STEPS) == pytest.approx(6 / 3)  # 1.0 without the bonus token
    assert mean_accepted_length([_step(0, 0, 1)] * 4) == pytest.approx(1.0)  # the baseline
    assert mean_accepted_length([]) is None


def test_cost_ratio_by_hand() -> None:
    # 10 ms of drafting for 5 proposed tokens = 2 ms a token; a decode step takes 5 ms: c = 0.4.
    assert cost_ratio(STEPS, decode_ms=5.0) == pytest.approx(0.4)
    assert cost_ratio([_step(0, 0, 1)], decode_ms=5.0) is None
    assert cost_ratio(STEPS, decode_ms=0.0) is None


@pytest.mark.parametrize(
    ("alpha", "k", "c", "expected"),
    [
        (0.5, 2, 0.0, 1.75),  # (1 - 1/8) / (1/2 * 1)
        (0.5, 2, 0.5, 0.875),  # (1 - 1/8) / (1/2 * 2)
        (1.0, 2, 0.5, 1.5),  # every draft kept: (K + 1) / (cK + 1)
        (0.0, 2, 0.5, 0.5),  # nothing kept: 1 / (cK + 1)
        (0.5, 0, 0.5, 1.0),  # K = 0 is plain decoding
    ],
)
def test_predicted_speedup_by_hand(alpha: float, k: float, c: float, expected: float) -> None:
    assert predicted_speedup(alpha, k, c) == pytest.approx(expected)


def test_predicted_speedup_is_continuous_at_one() -> None:
    assert predicted_speedup(1 - 1e-9, 3, 0.2) == pytest.approx(predicted_speedup(1.0, 3, 0.2))


@pytest.mark.parametrize(("alpha", "k", "c"), [(1.2, 2, 0.1), (-0.1, 2, 0.1), (0.5, 2, -1)])
def test_predicted_speedup_rejects_bad_input(alpha: float, k: float, c: float) -> None:
    with pytest.raises(ValueError, match="alpha"):
        predicted_speedup(alpha, k, c)


def test_prompt_result_rates() -> None:
    result = PromptResult([1], [5, 6, 7, 8, 9, 10], "", 20.0, 200.0, 0.0, None, STEPS, 5.0)
    assert result.tokens_per_s == pytest.approx(30.0)  # 6 tokens in 0.2 s
    assert result.ttft_ms == pytest.approx(25.0)  # target and draft prefill
    assert result.summary()["acceptance_rate"] == pytest.approx(0.6)
    assert result.summary()["mean_accepted_length"] == pytest.approx(2.0)


# --- per-prompt frames ----------------------------------------------------------------------


def _step_frame(qids: list[str], proposed: list[int], accepted: list[int], rep: int = 0) -> Any:
    return pd.DataFrame(
        {"question_id": qids, "repetition": rep, "proposed": proposed, "depth": proposed,
         "accepted": accepted}
    )  # fmt: skip


def test_acceptance_ci_pools_tokens() -> None:
    # Prompts 1/1, 0/3 and 0/4: 1/8 of the tokens (the mean of per-prompt rates would be 1/3).
    steps = _step_frame(["a", "b", "c"], [1, 3, 4], [1, 0, 0])
    rate, low, high = stats.acceptance_ci(steps, seed=0, n=500)
    assert rate == pytest.approx(1 / 8)
    assert low is not None and high is not None and 0.0 <= low <= rate <= high <= 1.0
    assert stats.acceptance_ci(steps, seed=0, n=500) == (rate, low, high)


def test_acceptance_ci_needs_three_prompts() -> None:
    steps = _step_frame(["a", "a", "b"], [2, 2, 4], [2, 0, 1])
    assert stats.acceptance_ci(steps, seed=0, n=100) == (pytest.approx(3 / 8), None, None)
    same = _step_frame(["a", "b", "c"], [2, 4, 6], [1, 2, 3])
    assert stats.acceptance_ci(same, seed=0, n=100) == pytest.approx((0.5, 0.5, 0.5))
    with pytest.raises(ValueError, match="no draft token"):
        stats.acceptance_ci(_step_frame(["a", "b", "c"], [0, 0, 0], [0, 0, 0]), seed=0, n=10)


def test_acceptance_by_position_by_hand() -> None:
    steps = pd.concat(
        [_step_frame(["a"] * 3, [3, 2, 3], [1, 2, 3]), _step_frame(["a"], [3], [0], rep=1)]
    )
    out = stats.acceptance_by_position(steps).set_index("position")
    assert out["proposed"].tolist() == [3, 3, 2]  # the second repetition is left out
    assert out["acceptance"].tolist() == pytest.approx([1.0, 2 / 3, 1 / 2])


def _generations(total_ms: list[float], ref_ms: list[float], **extra: Any) -> pd.DataFrame:
    """suite.run-shaped rows, one repetition, one prompt per time."""
    n = len(total_ms)
    return pd.DataFrame(
        {"question_id": [str(i) for i in range(n)], "repetition": 0, "category": "c",
         "total_ms": total_ms, "new_tokens": 10, "ref_total_ms": ref_ms, "ref_new_tokens": 10,
         **extra}
    )  # fmt: skip


def test_per_prompt_takes_the_median_repetition() -> None:
    rows = pd.DataFrame(
        {"question_id": ["p", "p", "p", "q"], "repetition": [2, 0, 1, 0],
         "total_ms": [30.0, 10.0, 11.0, 50.0], "new_tokens": [9, 20, 8, 5]}
    )  # fmt: skip
    out = stats.per_prompt(rows)
    assert out.loc["p", "total_ms"] == pytest.approx(11.0)  # the mean would be 17
    assert out.loc["p", "new_tokens"] == 20  # from repetition 0
    assert out.loc["p", "tokens_per_s"] == pytest.approx(1000 * 20 / 11)


def test_per_prompt_keeps_prompt_order() -> None:
    ids = [str(i) for i in range(40)]
    rows = pd.DataFrame(
        {"question_id": [q for q in ids for _ in range(3)], "repetition": [0, 1, 2] * 40,
         "total_ms": 1.0, "new_tokens": 1}
    )  # fmt: skip
    assert stats.per_prompt(rows).index.tolist() == ids


def test_reference_arm_by_hand() -> None:
    rows = _generations([100.0, 100.0], [250.0, 300.0])
    rows = pd.concat([rows, rows.assign(repetition=1, ref_total_ms=[350.0, 100.0])])
    ref = stats.reference(stats.per_prompt(rows))
    assert ref["total_ms"].tolist() == pytest.approx([300.0, 200.0])  # median of two
    assert ref["new_tokens"].tolist() == [10, 10]


def test_category_speedups_by_hand() -> None:
    # Category b first in the file: 1 prompt at 4x (no interval); a: 3 prompts at 2x.
    rows = _generations([100.0] * 4, [400.0, 200.0, 200.0, 200.0])
    rows["category"] = ["b", "a", "a", "a"]
    out = stats.category_speedups(rows, seed=0).set_index("category")
    assert out.index.tolist() == ["b", "a"]
    assert out.loc["a", "speedup"] == pytest.approx(2.0) and out.loc["a", "speedup_n"] == 3
    assert out.loc["a", "speedup_ci_low"] == pytest.approx(2.0)
    assert out.loc["b", "speedup"] == pytest.approx(4.0) and out.loc["b", "speedup_n"] == 1
    assert pd.isna(out.loc["b", "speedup_ci_low"]) and pd.isna(out.loc["b", "speedup_ci_high"])


def test_oracle_regret_by_hand() -> None:
    # Time relative to each run's reference. K=1: 0.5, 1.0; K=2: 0.8, 0.6. Best per prompt sums
    # to 1.1; the controller's 0.55 + 0.66 = 1.21 is 10% more.
    k1 = _generations([50.0, 100.0], [100.0, 100.0])
    k2 = _generations([80.0, 60.0], [100.0, 100.0])
    controller = _generations([110.0, 66.0], [200.0, 100.0])
    assert stats.oracle_regret(controller, [k1, k2]) == pytest.approx(0.1)


def test_pooled_perplexity_weights_tokens() -> None:
    # exp((3 ln 2 + 1 ln 32) / 4) = 2^2: not the mean (17) nor the unweighted geomean (8).
    outputs = pd.DataFrame({"tokens": [3, 1, 0], "perplexity": [2.0, 32.0, float("nan")]})
    assert stats.pooled_perplexity(outputs) == pytest.approx(4.0)


def test_greedy_match_by_hand() -> None:
    method = pd.DataFrame({"token_ids": [[1, 2], [3, 4], [5]]}, index=["a", "b", "c"])
    base = pd.DataFrame({"token_ids": [[3, 5], [1, 2]]}, index=["b", "a"])
    assert stats.greedy_match(method, base).to_dict() == {"a": True, "b": False}


def test_phases_and_step_breakdown_by_hand() -> None:
    steps = pd.DataFrame(
        {"draft_ms": [1.0, 3.0], "verify_ms": [2.0, 2.0], "accept_ms": [0.5, 0.5],
         "step_ms": [4.0, 7.0]}
    )  # fmt: skip
    assert stats.phases(steps)["bookkeeping_ms"].tolist() == pytest.approx([0.5, 1.5])
    assert stats.step_breakdown(steps) == pytest.approx(
        {"draft_ms": 2.0, "verify_ms": 2.0, "accept_ms": 0.5, "bookkeeping_ms": 1.0, "step_ms": 5.5}
    )


# --- summarize: the metrics.json of an item, from a hand-made table -------------------------


def _item(accepted: list[int], ref_ms: list[float]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows and steps of a 2-prompt item, 2 steps a prompt, K = 2, 1 ms drafting a token."""
    emitted = [a + 1 for a in accepted]
    rows = _generations([100.0, 200.0], ref_ms, ttft_ms=[5.0, 7.0], peak_rss_mb=[1.0, 3.0],
                        peak_cuda_mb=None, token_ids=[[1], [2]],
                        ref_decode_ms=[2.0, 2.0])  # fmt: skip
    rows["new_tokens"] = [emitted[0] + emitted[1], emitted[2] + emitted[3]]
    steps = pd.DataFrame(
        {"question_id": ["0", "0", "1", "1"], "repetition": 0, "step": [0, 1, 0, 1], "k": 2,
         "proposed": 2, "depth": 2, "accepted": accepted, "emitted": emitted, "draft_ms": 2.0,
         "verify_ms": 3.0, "step_ms": 6.0, "rss_mb": 1.0, "accept_ms": 0.5}
    )  # fmt: skip
    return rows, steps


def test_summarize_by_hand() -> None:
    # 4 of 8 drafts kept (a = 0.5), tau = 8 / 4, c = (8 ms / 8 tokens) / 2 ms = 0.5, K = 2:
    # predicted (1 - 1/8) / (1/2 * 2) = 0.875. Speed-ups 300/100 and 300/200: geomean sqrt(4.5).
    rows, steps = _item([2, 0, 1, 1], [300.0, 300.0])
    out = stats.summarize(rows, steps, seed=0)
    assert out["prompts"] == 2 and out["new_tokens"] == 8
    assert out["tokens_per_s"] == pytest.approx(1000 * 8 / 300)
    assert out["ttft_ms"] == pytest.approx(6.0) and out["peak_rss_mb"] == pytest.approx(3.0)
    assert out["acceptance_rate"] == pytest.approx(0.5)
    assert out["mean_accepted_length"] == pytest.approx(2.0)
    assert out["mean_k"] == pytest.approx(2.0)
    assert out["cost_ratio"] == pytest.approx(0.5)
    assert out["predicted_speedup"] == pytest.approx(0.875)
    assert out["speedup"] == pytest.approx(math.sqrt(4.5))
    assert (out["speedup_ci_low"], out["speedup_ci_high"], out["speedup_n"]) == (None, None, 2)
    assert out["throughput_ratio"] == pytest.approx((8 / 300) / (20 / 600))
