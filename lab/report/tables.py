"""Tables: cell formatting, raw columns to shown headers, and writing them as md, tex and csv."""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

MISSING = "n/a"

# Table headers; raw column names (CSV) not listed here are shown as they are.
HEADERS = {
    "configuration": "configuration",
    "k": "K",
    "mean_k": "mean K",
    "prompts": "prompts",
    "new_tokens": "new tokens",
    "tokens_per_s": "tokens/s",
    "ttft_ms": "TTFT (ms)",
    "step_ms_median": "median step (ms)",
    "step_ms_p90": "p90 step (ms)",
    "peak_rss_mb": "peak RSS (MB)",
    "peak_cuda_mb": "peak CUDA (MB)",
    "acceptance_rate": "acceptance",
    "mean_accepted_length": "tau",
    "speedup": "speed-up",
    "throughput_ratio": "throughput ratio",
    "greedy_match_rate": "greedy match",
    "cost_ratio": "c",
    "predicted_speedup": "predicted (Leviathan)",
    "measured_over_predicted": "measured / Leviathan",
    "draft_cost": "draft per step (decode steps)",
    "verify_cost": "verify per step (decode steps)",
    "step_cost": "whole step (decode steps)",
    "tree_size": "tree size",
    "nodes": "nodes per step",
    "depth": "depth per step",
    "predicted_from_costs": "predicted (tau / cost)",
    "measured_over_costs": "measured / cost model",
    "perplexity": "perplexity",
    "pooled_perplexity": "pooled perplexity",
    "controller_params": "settings",
    "best_fixed_k": "best fixed K",
    "best_fixed_speedup": "best fixed-K speed-up",
    "regret": "regret",
    "regret_oracle": "regret (per-prompt best K, time)",
    "draft_ms": "draft (ms)",
    "verify_ms": "verify (ms)",
    "accept_ms": "accept + rollback (ms)",
    "bookkeeping_ms": "bookkeeping (ms)",
    "step_ms": "step (ms)",
    "peak_rss_mb_max": "peak RSS, max over items (MB)",
    "peak_cuda_mb_max": "peak CUDA, max over items (MB)",
}


@dataclass
class Table:
    """One table: numbers for the CSV, formatted strings for markdown and LaTeX."""

    name: str
    caption: str
    data: pd.DataFrame
    shown: pd.DataFrame


def _is_missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def fmt(value: Any) -> str:
    """A table cell: 2-3 significant decimals for floats, yes/no for flags, n/a when missing."""
    if _is_missing(value):
        return MISSING
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return str(value)
    if isinstance(value, float | np.floating):
        size = abs(float(value))
        if size >= 100:
            return f"{value:.0f}"
        if size >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}" if size == 0 or size >= 0.1 else f"{value:.2g}"
    return str(value)


def fmt_ci(mid: Any, low: Any, high: Any, n: Any = None) -> str:
    """'1.23 [1.10, 1.37]'; '1.23 (n=2)' without an interval (too few prompts); n/a if missing."""
    if _is_missing(mid):
        return MISSING
    if _is_missing(low) or _is_missing(high):
        return f"{mid:.2f}" if _is_missing(n) else f"{mid:.2f} (n={int(n)})"
    return f"{mid:.2f} [{low:.2f}, {high:.2f}]"


def ci(column: str) -> list[str]:
    """A column, its 95% interval bounds and its sample size, which make_table shows as one cell."""
    return [column, f"{column}_ci_low", f"{column}_ci_high", f"{column}_n"]


def header(column: str, with_ci: bool = False) -> str:
    """The shown header of a raw column, marked when it carries a confidence interval."""
    return HEADERS.get(column, column) + (" [95% CI]" if with_ci else "")


def make_table(name: str, caption: str, data: pd.DataFrame) -> Table:
    """Format a numeric table: the ci() columns of x become one 'x [low, high]' or 'x (n=2)'."""
    shown = pd.DataFrame(index=data.index)
    folded = {c for x in data.columns if f"{x}_ci_low" in data.columns for c in ci(x)[1:]}
    for column in data.columns:
        if column in folded:
            continue
        low, high, n = ci(column)[1:]
        if low in data.columns:
            sizes = data[n] if n in data.columns else [None] * len(data)
            cells = [
                fmt_ci(*t) for t in zip(data[column], data[low], data[high], sizes, strict=True)
            ]
            shown[header(column, with_ci=True)] = cells
        else:
            shown[header(column)] = [fmt(v) for v in data[column]]
    return Table(name, caption, data, shown.reset_index(drop=True))


def markdown(shown: pd.DataFrame) -> str:
    """Pipe table; numparse off so tabulate keeps '1.20' as written instead of '1.2'."""
    return shown.to_markdown(index=False, disable_numparse=True)


def write_table(table: Table, folder: Path) -> list[Path]:
    """tables/<name>.md (pipe table), .tex (booktabs) and .csv (unformatted numbers)."""
    folder.mkdir(parents=True, exist_ok=True)
    md, tex, csv = (folder / f"{table.name}.{ext}" for ext in ("md", "tex", "csv"))
    md.write_text(markdown(table.shown) + "\n")
    # to_latex renders through Styler with booktabs rules; escape keeps '_' and '%' literal.
    columns = "l" + "r" * (len(table.shown.columns) - 1)  # names left, numbers right
    latex = table.shown.to_latex(
        index=False,
        escape=True,
        column_format=columns,
        caption=table.caption,
        label=f"tab:{table.name}",
    )
    tex.write_text(latex)
    table.data.to_csv(csv, index=False)
    return [md, tex, csv]
