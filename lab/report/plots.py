"""The data files behind the figures, for `dvc plots` (dvc.yaml names these files and columns)."""

from __future__ import annotations

from typing import Any

import pandas as pd

from lab.report.frames import (
    ACCEPTED_LENGTH_COLUMNS,
    POSITION_COLUMNS,
    acceptance_positions,
    accepted_length,
    perplexity_by_item,
    ppl_of,
    spec_row,
)
from lab.report.load import ReportSettings, Results, is_baseline, is_lossy, label, method

# reports/plots/<name>.csv and its columns: always written (header only without data) so DVC
# finds every file.
PLOTS: dict[str, tuple[str, ...]] = {
    "ksweep": ("k", "speedup", "speedup_ci_low", "speedup_ci_high", "acceptance_rate",
               "acceptance_rate_ci_low", "acceptance_rate_ci_high", "mean_accepted_length",
               "predicted_speedup"),
    "speedup": ("configuration", "lossy", "speedup", "speedup_ci_low", "speedup_ci_high",
                "predicted_speedup"),
    "frontier": ("configuration", "policy", "lossy", "perplexity", "speedup", "speedup_ci_low",
                 "speedup_ci_high"),
    "accepted_length": ACCEPTED_LENGTH_COLUMNS,
    "acceptance_by_position": POSITION_COLUMNS,
}  # fmt: skip


def plot_data(results: Results, settings: ReportSettings) -> dict[str, pd.DataFrame]:
    """The data behind each figure (header only when a stage has no data)."""
    spec = [spec_row(i, settings) | {"lossy": is_lossy(i)} for i in results.speculative]
    ksweep = [spec_row(i, settings) for i in results.items.get("ksweep", [])]
    frames = {
        "ksweep": pd.DataFrame(ksweep, columns=list(PLOTS["ksweep"])),
        "speedup": pd.DataFrame(spec, columns=list(PLOTS["speedup"])),
        "frontier": pd.DataFrame(frontier(results), columns=list(PLOTS["frontier"])),
        "accepted_length": accepted_length(results.items.get("drafters", [])),
        "acceptance_by_position": acceptance_positions(results.speculative),
    }
    return {name: frame[list(PLOTS[name])] for name, frame in frames.items()}


def frontier(results: Results) -> list[dict[str, Any]]:
    """The policies' speed-up (with CI) against output perplexity, and the baseline's A/A point
    (speed-up 1 within its noise floor) as the reference, once the policies have data."""
    ppl = perplexity_by_item(results)
    items = results.items.get("policies", [])
    base = results.baseline
    if items and base is not None and base.metrics.get("speedup") is not None:
        items = [base, *items]
    return [
        {
            "configuration": label(i),
            "policy": "baseline (A/A)" if is_baseline(i) else method(i)["policy"],
            "lossy": not is_baseline(i) and is_lossy(i),
            "perplexity": ppl_of(ppl, i),
            "speedup": i.metrics["speedup"],
            "speedup_ci_low": i.metrics.get("speedup_ci_low"),
            "speedup_ci_high": i.metrics.get("speedup_ci_high"),
        }
        for i in items
    ]
