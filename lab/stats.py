"""Summary statistics over per-prompt results: the one place speed-ups are computed."""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pandas as pd

from lab.engine.records import StepRecord, cost_ratio, predicted_speedup


def per_prompt(rows: pd.DataFrame) -> pd.DataFrame:
    """One row per prompt: median wall times over repetitions, tokens from the first one."""
    # A stable sort keeps the prompts in their file order (quicksort shuffles equal keys).
    first = rows.sort_values("repetition", kind="stable").groupby("question_id", sort=False).first()
    for column in ("total_ms", "ref_total_ms", "ref_decode_ms"):
        if column in rows:
            first[column] = rows.groupby("question_id", sort=False)[column].median()
    first["tokens_per_s"] = 1000.0 * first["new_tokens"] / first["total_ms"]
    return first


def reference(prompts: pd.DataFrame) -> pd.DataFrame:
    """The interleaved reference arm of per-prompt rows, shaped as rows of its own."""
    return pd.DataFrame(
        {"total_ms": prompts["ref_total_ms"], "new_tokens": prompts["ref_new_tokens"],
         "category": prompts["category"]},
        index=prompts.index,
    )  # fmt: skip


# Fewer prompts than this get no bootstrap interval (None ends): resampling 1 or 2 values gives
# [x, x] or a near-empty interval that reads as certainty.
MIN_CI_PROMPTS = 3
Interval = tuple[float, float | None, float | None]  # estimate, 95% interval ends


def bootstrap_geomean(ratios: np.ndarray, seed: int, n: int = 2000) -> Interval:
    """Geometric mean of ratios and its percentile-bootstrap 95% interval (None below 3)."""
    if len(ratios) == 0 or not np.all(np.asarray(ratios) > 0):
        raise ValueError(f"speed-up ratios must be positive and non-empty, got {ratios}")
    logs = np.log(ratios)
    if len(logs) < MIN_CI_PROMPTS:
        return float(np.exp(logs.mean())), None, None
    rng = np.random.default_rng(seed)
    means = logs[rng.integers(0, len(logs), size=(n, len(logs)))].mean(axis=1)
    low, high = np.percentile(means, [2.5, 97.5])
    return float(np.exp(logs.mean())), float(np.exp(low)), float(np.exp(high))


def _pair(method: pd.DataFrame, baseline: pd.DataFrame) -> pd.DataFrame:
    """Method and baseline rows of the same prompts side by side (baseline columns get _base)."""
    return method.merge(baseline, left_index=True, right_index=True, suffixes=("", "_base"))


def paired_speedup(
    method: pd.DataFrame, baseline: pd.DataFrame, seed: int, n: int = 2000
) -> dict[str, Any]:
    """Per-prompt baseline time / method time on the same prompts: geomean, CI, n, throughput."""
    joined = _pair(method, baseline)
    if joined.empty:
        raise ValueError("no prompt in common with the baseline: cannot pair speed-ups")
    ratios = (joined["total_ms_base"] / joined["total_ms"]).to_numpy()
    geo, low, high = bootstrap_geomean(ratios, seed, n)
    throughput = (joined["new_tokens"].sum() / joined["total_ms"].sum()) / (
        joined["new_tokens_base"].sum() / joined["total_ms_base"].sum()
    )
    return {"speedup": geo, "speedup_ci_low": low, "speedup_ci_high": high,
            "speedup_n": len(joined), "throughput_ratio": float(throughput)}  # fmt: skip


def greedy_match(method: pd.DataFrame, baseline: pd.DataFrame) -> pd.Series:
    """Per prompt: whether the generated tokens equal the baseline's."""
    joined = _pair(method[["token_ids"]], baseline[["token_ids"]])
    return joined.apply(lambda r: list(r["token_ids"]) == list(r["token_ids_base"]), axis=1)


def _steps(steps: pd.DataFrame) -> list[StepRecord]:
    # Older steps.csv files lack the newer optional columns (accept_ms): use what is there.
    fields = [f for f in StepRecord.__dataclass_fields__ if f in steps.columns]
    return [StepRecord(**r) for r in steps[fields].to_dict("records")]


def summarize(
    rows: pd.DataFrame, steps: pd.DataFrame, seed: int, baseline_rows: pd.DataFrame | None = None
) -> dict[str, Any]:
    """The metrics.json of a stage item.

    Speed-ups, c and the reference's speed come from the interleaved reference runs (`ref_*`
    columns, lab.pipeline.suite), when the rows have them; baseline_rows (the baseline stage's)
    only decide the greedy match.
    """
    prompts = per_prompt(rows)
    first_rep = steps[steps["repetition"] == 0]
    # A token tree's depth (its longest path) plays a chain's K: = proposed for chains.
    proposed = int(first_rep["depth"].sum())
    out: dict[str, Any] = {
        "prompts": len(prompts),
        "new_tokens": int(prompts["new_tokens"].sum()),
        "tokens_per_s": float(1000.0 * prompts["new_tokens"].sum() / prompts["total_ms"].sum()),
        "ttft_ms": float(prompts["ttft_ms"].mean()),
        "peak_rss_mb": float(rows["peak_rss_mb"].max()),
        "acceptance_rate": float(first_rep["accepted"].sum() / proposed) if proposed else None,
        "mean_accepted_length": float(first_rep["emitted"].mean()) if len(first_rep) else None,
        "mean_k": float(first_rep["depth"].mean()) if proposed else None,
    }
    if rows["peak_cuda_mb"].notna().any():
        out["peak_cuda_mb"] = float(rows["peak_cuda_mb"].max())
    if baseline_rows is not None:
        out["greedy_match_rate"] = float(greedy_match(prompts, per_prompt(baseline_rows)).mean())
    if "ref_total_ms" in rows:
        out.update(_paired(prompts, first_rep, out, seed))
    return out


def _paired(
    prompts: pd.DataFrame, steps: pd.DataFrame, out: dict[str, Any], seed: int
) -> dict[str, Any]:
    """Speed-up against the interleaved reference, its speed, c and Leviathan's prediction."""
    ref = reference(prompts)
    paired: dict[str, Any] = paired_speedup(prompts, ref, seed)
    paired["reference_tokens_per_s"] = float(
        1000.0 * ref["new_tokens"].sum() / ref["total_ms"].sum()
    )
    c = cost_ratio(_steps(steps), float(prompts["ref_decode_ms"].mean()))
    paired["cost_ratio"] = c
    if c is not None and out["acceptance_rate"] is not None and out["mean_k"]:
        paired["predicted_speedup"] = predicted_speedup(out["acceptance_rate"], out["mean_k"], c)
    return paired


def acceptance_ci(steps: pd.DataFrame, seed: int, n: int) -> Interval:
    """sum(accepted)/sum(depth) with a bootstrap 95% CI over prompts (None below 3)."""
    sums = steps[steps["repetition"] == 0].groupby("question_id")[["accepted", "depth"]].sum()
    accepted, proposed = sums["accepted"].to_numpy(), sums["depth"].to_numpy()
    if not proposed.sum():
        raise ValueError("no draft token was proposed: acceptance is undefined")
    if len(sums) < MIN_CI_PROMPTS:
        return float(accepted.sum() / proposed.sum()), None, None
    picks = np.random.default_rng(seed).integers(0, len(sums), size=(n, len(sums)))  # (n, prompts)
    with np.errstate(invalid="ignore", divide="ignore"):  # a resample may propose nothing
        ratios = accepted[picks].sum(axis=1) / proposed[picks].sum(axis=1)
    low, high = np.nanpercentile(ratios, [2.5, 97.5])
    return float(accepted.sum() / proposed.sum()), float(low), float(high)


def acceptance_by_position(steps: pd.DataFrame) -> pd.DataFrame:
    """P(draft position i accepted | at least i proposed), i = 1..max K (tree: path depth)."""
    first = steps[steps["repetition"] == 0]
    positions = np.arange(1, int(first["depth"].max()) + 1)
    # Acceptance is a prefix: position i is kept iff accepted >= i.  (steps, positions)
    offered = first["depth"].to_numpy()[:, None] >= positions
    kept = first["accepted"].to_numpy()[:, None] >= positions
    return pd.DataFrame(
        {
            "position": positions,
            "proposed": offered.sum(axis=0),
            "acceptance": kept.sum(axis=0) / offered.sum(axis=0),
        }
    )


def category_speedups(rows: pd.DataFrame, seed: int) -> pd.DataFrame:
    """Paired speed-up per category, on that category's prompts only (rows as in prompts.jsonl)."""
    mine = per_prompt(rows)
    ref = reference(mine)
    out = []
    for category in mine["category"].unique():
        chosen = mine["category"] == category
        out.append({"category": category, "prompts": int(chosen.sum()),
                    **paired_speedup(mine[chosen], ref[chosen], seed)})  # fmt: skip
    return pd.DataFrame(out)


def oracle_regret(controller: pd.DataFrame, fixed: list[pd.DataFrame]) -> float:
    """Controller time / time with the best fixed K per prompt, minus 1 (prompts.jsonl rows).

    Each time is taken relative to its own interleaved reference, so configurations timed minutes
    apart compare without the machine's drift between them.
    """
    relative = [_relative_time(rows) for rows in fixed]
    times = pd.concat(relative, axis=1, join="inner")
    mine = _relative_time(controller)
    common = times.index.intersection(mine.index)
    return float(mine[common].sum() / times.loc[common].min(axis=1).sum() - 1.0)


def _relative_time(rows: pd.DataFrame) -> pd.Series:
    """Per prompt: method time / its interleaved reference's time."""
    prompts = per_prompt(rows)
    return prompts["total_ms"] / prompts["ref_total_ms"]


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
