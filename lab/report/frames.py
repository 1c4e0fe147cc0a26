"""Numeric frames derived from the items, shared by the sections and the dvc plots data."""

from __future__ import annotations

from typing import Any

import pandas as pd

from lab import stats
from lab.pipeline.store import Item
from lab.report.load import ReportSettings, Results, first, label, method

ACCEPTED_LENGTH_COLUMNS = ("drafter", "emitted", "steps", "share")
POSITION_COLUMNS = ("configuration", "position", "proposed", "acceptance")
STEP_COST_COLUMNS = ("draft_cost", "verify_cost", "step_cost")


def spec_row(item: Item, settings: ReportSettings) -> dict[str, Any]:
    """The columns every speculative table draws from (metrics.json plus an acceptance CI)."""
    m = item.metrics
    acc = (
        stats.acceptance_ci(item.steps, settings.seed, settings.bootstrap_samples)
        if m["acceptance_rate"] is not None
        else (None, None, None)
    )
    return {
        "configuration": label(item),
        "k": int(method(item)["k"]),
        "mean_k": m["mean_k"],
        "acceptance_rate": m["acceptance_rate"],
        "acceptance_rate_ci_low": acc[1],
        "acceptance_rate_ci_high": acc[2],
        "acceptance_rate_n": m["prompts"],  # acceptance_ci resamples prompts
        "mean_accepted_length": m["mean_accepted_length"],
        "tokens_per_s": m["tokens_per_s"],
        "speedup": m["speedup"],
        "speedup_ci_low": m["speedup_ci_low"],
        "speedup_ci_high": m["speedup_ci_high"],
        "speedup_n": m["speedup_n"],
        "throughput_ratio": m["throughput_ratio"],
        "greedy_match_rate": m["greedy_match_rate"],
        "cost_ratio": m["cost_ratio"],
        # Leviathan's formula is a chain's (one draft token per position): no prediction for trees.
        "predicted_speedup": None if is_tree(item) else m.get("predicted_speedup"),
    }


def is_tree(item: Item) -> bool:
    """Whether the item's drafter proposed token trees (more nodes than its longest path)."""
    steps = first(item.steps)
    return bool((steps["proposed"] > steps["depth"]).any())


def spec_frame(items: list[Item], settings: ReportSettings, columns: list[str]) -> pd.DataFrame:
    """spec_row of each item, these columns."""
    return pd.DataFrame([spec_row(i, settings) for i in items])[columns]


def perplexity_by_item(results: Results) -> pd.DataFrame:
    """Mean (as in perplexity/metrics.json) and pooled perplexity per stage/item."""
    outputs = results.outputs_ppl
    if outputs is None:
        return pd.DataFrame(columns=["stage", "item", "tokens", "perplexity", "pooled_perplexity"])
    grouped = outputs.groupby(["stage", "item"], sort=False)
    frame = grouped.agg(tokens=("tokens", "sum"), perplexity=("perplexity", "mean"))
    frame["pooled_perplexity"] = grouped.apply(stats.pooled_perplexity)
    return frame.reset_index()


def ppl_of(ppl: pd.DataFrame, item: Item) -> float | None:
    """Mean output perplexity of one item (ppl from perplexity_by_item), None when not scored."""
    hit = ppl[(ppl["stage"] == item.path.parent.name) & (ppl["item"] == item.path.name)]
    return float(hit["perplexity"].iloc[0]) if len(hit) else None


def accepted_length(items: list[Item]) -> pd.DataFrame:
    """Share of steps emitting n tokens, per drafter item (first repetition)."""
    frames = []
    for item in items:
        counts = first(item.steps)["emitted"].value_counts().sort_index()
        frames.append(
            pd.DataFrame(
                {
                    "drafter": label(item),
                    "emitted": counts.index,
                    "steps": counts.to_numpy(),
                    "share": (counts / counts.sum()).to_numpy(),
                }
            )
        )
    if not frames:
        return pd.DataFrame(columns=list(ACCEPTED_LENGTH_COLUMNS))
    return pd.concat(frames, ignore_index=True)


def acceptance_positions(items: list[Item]) -> pd.DataFrame:
    """stats.acceptance_by_position for every item that proposed anything, long form."""
    frames = [
        stats.acceptance_by_position(i.steps).assign(configuration=label(i))
        for i in items
        if first(i.steps)["proposed"].sum() > 0
    ]
    if not frames:
        return pd.DataFrame(columns=list(POSITION_COLUMNS))
    return pd.concat(frames, ignore_index=True)[list(POSITION_COLUMNS)]


def decode_ms(item: Item, baseline: Item | None) -> float | None:
    """The baseline's time per decoded token: the item's interleaved reference (`ref_decode_ms`,
    the denominator of its c in metrics.json), else the baseline stage's mean decode step."""
    if "ref_decode_ms" in item.rows and item.rows["ref_decode_ms"].notna().any():
        value = float(stats.per_prompt(item.rows)["ref_decode_ms"].mean())
    elif baseline is not None and len(first(baseline.steps)):
        value = float(first(baseline.steps)["verify_ms"].mean())
    else:
        return None
    return value if value > 0 else None


def step_costs(item: Item, baseline: Item | None) -> dict[str, float | None]:
    """A step's drafting, verifying and whole wall time, in decode steps of the baseline (first
    repetition): the measured terms Leviathan's prediction sets to cK and 1."""
    decode, steps = decode_ms(item, baseline), first(item.steps)
    if decode is None or steps.empty:
        return dict.fromkeys(STEP_COST_COLUMNS)
    return {
        "draft_cost": float(steps["draft_ms"].mean()) / decode,
        "verify_cost": float(steps["verify_ms"].mean()) / decode,
        "step_cost": float(steps["step_ms"].mean()) / decode,
    }


def cost_model(data: pd.DataFrame) -> pd.Series:
    """The measured-cost prediction: tau over the whole step's cost in decode steps (step_cost),
    the one definition the summary's reading of tau uses too."""
    return data["mean_accepted_length"] / data["step_cost"]
