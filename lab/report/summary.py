"""The report's opening summary: its result in a few generated sentences, and one figure.

Every number comes from the items: the best lossless and the best configuration overall with
their intervals, which configurations beat the baseline (interval above 1), the A/A noise floor,
and, where measured and predicted speed-ups disagree, what the per-step records say the steps
cost (the prediction assumes a verify step costs one decode step).
"""

from __future__ import annotations

from typing import Any

import pandas as pd

from lab.report.figures import speedup_figure
from lab.report.frames import STEP_COST_COLUMNS, spec_frame, step_costs
from lab.report.load import ReportSettings, Results, is_lossy
from lab.report.sections import Section, no_data
from lab.report.tables import fmt_ci

SUMMARY_COLUMNS = ("configuration", "lossy", "speedup", "speedup_ci_low", "speedup_ci_high",
                   "speedup_n", "predicted_speedup", "mean_accepted_length",
                   *STEP_COST_COLUMNS)  # fmt: skip
Floor = tuple[float, float | None, float | None, int | None]  # A/A estimate, interval, n


def summary_frame(results: Results, settings: ReportSettings) -> pd.DataFrame:
    """One row per speculative configuration that ran (SUMMARY_COLUMNS)."""
    items = results.speculative
    columns = [c for c in SUMMARY_COLUMNS if c not in ("lossy", *STEP_COST_COLUMNS)]
    if not items:
        return pd.DataFrame(columns=list(SUMMARY_COLUMNS))
    data = spec_frame(items, settings, columns)
    data.insert(1, "lossy", [is_lossy(i) for i in items])
    costs = pd.DataFrame([step_costs(i, results.baseline) for i in items], index=data.index)
    return pd.concat([data, costs], axis=1)[list(SUMMARY_COLUMNS)]


def aa_floor(results: Results) -> Floor | None:
    """The baseline against its own interleaved reference (A/A), when that pair ran."""
    base = results.baseline
    if base is None or base.metrics.get("speedup") is None:
        return None
    m = base.metrics
    return (m["speedup"], m.get("speedup_ci_low"), m.get("speedup_ci_high"), m.get("speedup_n"))


def _has_ci(row: Any) -> bool:
    return not (pd.isna(row.speedup_ci_low) or pd.isna(row.speedup_ci_high))


def verdict(row: Any) -> str:
    """faster / slower (interval wholly above / below 1), noise (it holds 1), or no interval."""
    if not _has_ci(row):
        return "no interval"
    if row.speedup_ci_low > 1:
        return "faster"
    return "slower" if row.speedup_ci_high < 1 else "noise"


PHRASES = {
    "faster": "faster than the baseline",
    "slower": "slower than the baseline",
    "noise": "its interval holds 1: no measured difference from the baseline",
    "no interval": "too few prompts for an interval",
}


def cell(row: Any) -> str:
    return fmt_ci(row.speedup, row.speedup_ci_low, row.speedup_ci_high, row.speedup_n)


def _best(data: pd.DataFrame) -> Any:
    return next(data.loc[[data["speedup"].astype(float).idxmax()]].itertuples())


def headline(data: pd.DataFrame) -> list[str]:
    """The best lossless and the best overall configuration, with their intervals."""
    lossless = data[~data["lossy"].astype(bool)]
    best = _best(data)
    if lossless.empty:
        return [f"No lossless configuration ran. The best configuration is {best.configuration} "
                f"at a speed-up of {cell(best)} ({PHRASES[verdict(best)]})."]  # fmt: skip
    top = _best(lossless)
    lines = [f"The best lossless configuration is {top.configuration} at a speed-up of "
             f"{cell(top)} (95% CI; {PHRASES[verdict(top)]})."]  # fmt: skip
    if best.configuration == top.configuration:
        lines.append("It is also the best configuration overall.")
    else:
        lines.append(f"The best overall is {best.configuration} at {cell(best)} "
                     f"({PHRASES[verdict(best)]}).")  # fmt: skip
    return lines


def _names(rows: pd.DataFrame) -> str:
    return ", ".join(rows["configuration"])


def winners(data: pd.DataFrame) -> list[str]:
    """Which configurations beat the baseline (interval above 1), and how the lossless fare."""
    verdicts = pd.Series([verdict(r) for r in data.itertuples()], index=data.index)
    if (verdicts == "no interval").all():
        return ["No speed-up has an interval (fewer than 3 prompts each), so no configuration "
                "is shown to beat the baseline."]  # fmt: skip
    faster = data[verdicts == "faster"]
    if faster.empty:
        lines = ["No configuration beats the baseline: no speed-up interval lies above 1."]
    elif len(faster) == 1:
        lines = [f"Only {_names(faster)} beats the baseline (its interval lies above 1)."]
    else:
        lines = [f"{len(faster)} configurations beat the baseline (interval above 1): "
                 f"{_names(faster)}."]  # fmt: skip
    lossless = verdicts[~data["lossy"].astype(bool)]
    if len(lossless) and (lossless == "slower").all():
        lines.append(f"Every lossless configuration ({len(lossless)}) is slower than the "
                     "baseline (interval below 1).")  # fmt: skip
    elif len(lossless):
        counts = lossless.value_counts()
        parts = [f"{counts[v]} {'is' if counts[v] == 1 else 'are'} {words}" for v, words in (
            ("slower", "slower (interval below 1)"), ("faster", "faster (interval above 1)"),
            ("noise", "within noise (interval holds 1)"), ("no interval", "without an interval"),
        ) if v in counts]  # fmt: skip
        listed = ", ".join(parts[:-1]) + (" and " if len(parts) > 1 else "") + parts[-1]
        lines.append(f"Of the {len(lossless)} lossless configurations, {listed}.")
    return lines


def floor_line(floor: Floor | None) -> list[str]:
    if floor is None:
        return ["No A/A run of the baseline, so no noise floor."]
    return [f"Noise floor: the baseline timed against itself (A/A) gives {fmt_ci(*floor)}; a "
            "speed-up whose interval overlaps it is no measured effect."]  # fmt: skip


def disagreeing(data: pd.DataFrame) -> pd.DataFrame:
    """Configurations whose predicted speed-up lies outside their measured 95% interval."""
    predicted = data["predicted_speedup"].astype(float)
    low, high = data["speedup_ci_low"].astype(float), data["speedup_ci_high"].astype(float)
    return data[(predicted < low) | (predicted > high)]


def reason(data: pd.DataFrame) -> list[str]:
    """Where measured and predicted disagree: the measured cost of a step, in decode steps."""
    judged = data[data["predicted_speedup"].notna() & data["speedup_ci_low"].notna()]
    off = disagreeing(judged)
    if judged.empty:
        return []
    if off.empty:
        return ["Every predicted speed-up (Leviathan et al.) lies within its measured interval."]
    lines = [f"Measured and predicted speed-ups disagree for {len(off)} of {len(judged)} "
             "configurations (the prediction lies outside the measured interval)."]  # fmt: skip
    costed = off[off["verify_cost"].notna()]
    if costed.empty:
        return [*lines, "The per-step records needed to say why are missing."]
    lossless = costed[~costed["lossy"].astype(bool)]
    row = _best(lossless if len(lossless) else costed)
    tau, steps = float(row.mean_accepted_length), float(row.step_cost)
    lines.append(
        f"The per-step records say why, for {row.configuration}: a verify step costs "
        f"{row.verify_cost:.2f}x a decode step of the baseline, where the prediction assumes 1, "
        f"and drafting adds {row.draft_cost:.2f}x; a step costs {steps:.2f} decode steps and "
        f"emits tau = {tau:.2f} tokens, so tau / cost = {tau / steps:.2f} against the measured "
        f"{row.speedup:.2f} and the predicted {row.predicted_speedup:.2f}."
    )
    if len(costed) > 1:
        low, high = costed["verify_cost"].min(), costed["verify_cost"].max()
        lines.append(f"Across the {len(costed)} that disagree, verify steps cost {low:.2f}x to "
                     f"{high:.2f}x a decode step.")  # fmt: skip
    return lines


def summary_text(data: pd.DataFrame, floor: Floor | None) -> str:
    """The summary paragraph from a SUMMARY_COLUMNS frame and the A/A floor."""
    return " ".join([*headline(data), *winners(data), *floor_line(floor), *reason(data)])


def summary_section(results: Results, settings: ReportSettings) -> Section:
    """The opening section: the result in a few sentences and every speed-up with its CI."""
    section = Section("Summary")
    data = summary_frame(results, settings)
    if data.empty:
        section.text.append(no_data("no speculative configuration has results"))
        return section
    floor = aa_floor(results)
    section.text.append(summary_text(data, floor))
    band = (floor[1], floor[2]) if floor and floor[1] is not None and floor[2] is not None else None
    caption = ("Speed-up of every configuration with its 95% interval; grey band: the A/A "
               "noise floor")  # fmt: skip
    section.figures.append(("speedup", speedup_figure(data, band), caption))
    return section
