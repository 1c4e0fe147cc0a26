"""The data files behind the figures, for `dvc plots` (dvc.yaml names these files and columns)."""

from __future__ import annotations

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
from lab.report.load import ReportSettings, Results, is_lossy, label, method

# reports/plots/<name>.csv and its columns: always written (header only without data) so DVC
# finds every file.
PLOTS: dict[str, tuple[str, ...]] = {
    "ksweep": ("k", "speedup", "speedup_ci_low", "speedup_ci_high", "acceptance_rate",
               "acceptance_rate_ci_low", "acceptance_rate_ci_high", "mean_accepted_length",
               "predicted_speedup"),
    "speedup": ("configuration", "speedup", "speedup_ci_low", "speedup_ci_high",
                "predicted_speedup"),
    "frontier": ("configuration", "policy", "lossy", "perplexity", "speedup"),
    "accepted_length": ACCEPTED_LENGTH_COLUMNS,
    "acceptance_by_position": POSITION_COLUMNS,
}  # fmt: skip


def plot_data(results: Results, settings: ReportSettings) -> dict[str, pd.DataFrame]:
    """The data behind each figure (header only when a stage has no data)."""
    spec = [spec_row(i, settings) for i in results.speculative]
    ksweep = [spec_row(i, settings) for i in results.items.get("ksweep", [])]
    ppl = perplexity_by_item(results)
    frontier = [
        {
            "configuration": label(i),
            "policy": method(i)["policy"],
            "lossy": is_lossy(i),
            "perplexity": ppl_of(ppl, i),
            "speedup": i.metrics["speedup"],
        }
        for i in results.items.get("policies", [])
    ]
    frames = {
        "ksweep": pd.DataFrame(ksweep, columns=list(PLOTS["ksweep"])),
        "speedup": pd.DataFrame(spec, columns=list(PLOTS["speedup"])),
        "frontier": pd.DataFrame(frontier, columns=list(PLOTS["frontier"])),
        "accepted_length": accepted_length(results.items.get("drafters", [])),
        "acceptance_by_position": acceptance_positions(results.speculative),
    }
    return {name: frame[list(PLOTS[name])] for name, frame in frames.items()}
