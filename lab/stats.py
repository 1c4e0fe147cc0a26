"""Summary statistics over per-prompt results: the one place speed-ups are computed."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from lab.engine.records import StepRecord, cost_ratio, predicted_speedup


def per_prompt(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per prompt: the median wall time over repetitions, tokens from the first one."""
    first = rows.sort_values("repetition").groupby("question_id", sort=False).first()
    first["total_ms"] = rows.groupby("question_id", sort=False)["total_ms"].median()
    first["tokens_per_s"] = 1000.0 * first["new_tokens"] / first["total_ms"]
    return first


def bootstrap_geomean(ratios: np.ndarray, seed: int, n: int = 2000) -> tuple[float, float, float]:
    """Geometric mean of ratios and its percentile-bootstrap 95% interval."""
    logs = np.log(ratios)
    rng = np.random.default_rng(seed)
    means = logs[rng.integers(0, len(logs), size=(n, len(logs)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(np.exp(logs.mean())), float(np.exp(low)), float(np.exp(high))


def _pair(method: pd.DataFrame, baseline: pd.DataFrame) -> pd.DataFrame:
    """Method and baseline rows of the same prompts side by side (baseline columns get _base)."""
    return method.merge(baseline, left_index=True, right_index=True, suffixes=("", "_base"))


def paired_speedup(
    method: pd.DataFrame, baseline: pd.DataFrame, seed: int, n: int = 2000
) -> dict[str, float]:
    """Per-prompt baseline time / method time on the same prompts: geomean, CI, throughput ratio."""
    joined = _pair(method, baseline)
    if joined.empty:
        raise ValueError("no prompt in common with the baseline: cannot pair speed-ups")
    ratios = (joined["total_ms_base"] / joined["total_ms"]).to_numpy()
    geo, low, high = bootstrap_geomean(ratios, seed, n)
    throughput = (joined["new_tokens"].sum() / joined["total_ms"].sum()) / (
        joined["new_tokens_base"].sum() / joined["total_ms_base"].sum()
    )
    return {"speedup": geo, "speedup_ci_low": low, "speedup_ci_high": high,
            "throughput_ratio": float(throughput)}  # fmt: skip


def greedy_match(method: pd.DataFrame, baseline: pd.DataFrame) -> pd.Series:
    """Per prompt: whether the generated tokens equal the baseline's."""
    joined = _pair(method[["token_ids"]], baseline[["token_ids"]])
    return joined.apply(lambda r: list(r["token_ids"]) == list(r["token_ids_base"]), axis=1)


def _steps(steps: pd.DataFrame) -> list[StepRecord]:
    # Older steps.csv files lack the newer optional columns (accept_ms): use what is there.
    fields = [f for f in StepRecord.__dataclass_fields__ if f in steps.columns]
    return [StepRecord(**r) for r in steps[fields].to_dict("records")]


def summarize(
    rows: pd.DataFrame,
    steps: pd.DataFrame,
    baseline_rows: pd.DataFrame | None,
    baseline_steps: pd.DataFrame | None,
    seed: int,
) -> dict[str, Any]:
    """The metrics.json of a stage item; speed-ups only when a baseline is given."""
    prompts = per_prompt(rows)
    first_rep = steps[steps["repetition"] == 0]
    proposed = int(first_rep["proposed"].sum())
    out: dict[str, Any] = {
        "prompts": len(prompts),
        "new_tokens": int(prompts["new_tokens"].sum()),
        "tokens_per_s": float(1000.0 * prompts["new_tokens"].sum() / prompts["total_ms"].sum()),
        "ttft_ms": float(prompts["ttft_ms"].mean()),
        "peak_rss_mb": float(rows["peak_rss_mb"].max()),
        "acceptance_rate": float(first_rep["accepted"].sum() / proposed) if proposed else None,
        "mean_accepted_length": float(first_rep["emitted"].mean()) if len(first_rep) else None,
        "mean_k": float(first_rep["proposed"].mean()) if proposed else None,
    }
    if rows["peak_cuda_mb"].notna().any():
        out["peak_cuda_mb"] = float(rows["peak_cuda_mb"].max())
    if baseline_rows is None or baseline_steps is None:
        return out
    base = per_prompt(baseline_rows)
    out.update(paired_speedup(prompts, base, seed))
    out["greedy_match_rate"] = float(greedy_match(prompts, base).mean())
    c = cost_ratio(_steps(first_rep), _steps(baseline_steps[baseline_steps["repetition"] == 0]))
    out["cost_ratio"] = c
    if c is not None and out["acceptance_rate"] is not None and out["mean_k"]:
        out["predicted_speedup"] = predicted_speedup(out["acceptance_rate"], out["mean_k"], c)
    return out


def acceptance_ci(steps: pd.DataFrame, seed: int, n: int) -> tuple[float, float, float]:
    """sum(accepted)/sum(proposed) with a bootstrap 95% CI over prompts."""
    sums = steps[steps["repetition"] == 0].groupby("question_id")[["accepted", "proposed"]].sum()
    accepted, proposed = sums["accepted"].to_numpy(), sums["proposed"].to_numpy()
    picks = np.random.default_rng(seed).integers(0, len(sums), size=(n, len(sums)))  # (n, prompts)
    with np.errstate(invalid="ignore", divide="ignore"):  # a resample may propose nothing
        ratios = accepted[picks].sum(axis=1) / proposed[picks].sum(axis=1)
    low, high = np.nanpercentile(ratios, [2.5, 97.5])
    return float(accepted.sum() / proposed.sum()), float(low), float(high)


def acceptance_by_position(steps: pd.DataFrame) -> pd.DataFrame:
    """P(draft position i accepted | at least i proposed), i = 1..max K."""
    first = steps[steps["repetition"] == 0]
    positions = np.arange(1, int(first["proposed"].max()) + 1)
    # Acceptance is a prefix: position i is kept iff accepted >= i.  (steps, positions)
    offered = first["proposed"].to_numpy()[:, None] >= positions
    kept = first["accepted"].to_numpy()[:, None] >= positions
    return pd.DataFrame(
        {
            "position": positions,
            "proposed": offered.sum(axis=0),
            "acceptance": kept.sum(axis=0) / offered.sum(axis=0),
        }
    )


def category_speedups(method: pd.DataFrame, baseline: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Paired speed-up per category, on that category's prompts only (rows as in prompts.jsonl)."""
    mine, base = per_prompt(method), per_prompt(baseline)
    rows = []
    for category in base["category"].unique():
        pair = mine[mine["category"] == category], base[base["category"] == category]
        paired = len(pair[0].index.intersection(pair[1].index))
        if paired:
            rows.append({"category": category, "prompts": paired,
                         **paired_speedup(pair[0], pair[1], seed)})  # fmt: skip
    return pd.DataFrame(rows)


def oracle_regret(controller: pd.DataFrame, fixed: list[pd.DataFrame]) -> float:
    """Controller time / time with the best fixed K per prompt, minus 1 (prompts.jsonl rows)."""
    times = pd.concat([per_prompt(rows)["total_ms"] for rows in fixed], axis=1, join="inner")
    mine = per_prompt(controller)["total_ms"]
    common = times.index.intersection(mine.index)
    return float(mine[common].sum() / times.loc[common].min(axis=1).sum() - 1.0)


def pooled_perplexity(outputs: pd.DataFrame) -> float:
    """Token-weighted perplexity over outputs: exp(sum(n log ppl) / sum(n))."""
    scored = outputs[outputs["tokens"] > 0]
    return math.exp(
        (scored["tokens"] * np.log(scored["perplexity"])).sum() / scored["tokens"].sum()
    )


# Where a step's wall time goes; bookkeeping is the rest of step_ms.
PHASES = ("draft_ms", "verify_ms", "accept_ms", "bookkeeping_ms")


def phases(steps: pd.DataFrame) -> pd.DataFrame:
    """Per-step ms in each of PHASES, and step_ms (steps.csv rows)."""
    out = steps[["draft_ms", "verify_ms", "accept_ms"]].copy()
    out["bookkeeping_ms"] = steps["step_ms"] - out.sum(axis=1)
    out["step_ms"] = steps["step_ms"]
    return out


def step_breakdown(steps: pd.DataFrame) -> dict[str, float]:
    """Mean ms per step in each of PHASES, and of step_ms."""
    return {name: float(value) for name, value in phases(steps).mean().items()}
