"""The report's matplotlib figures, each drawn from a frame the sections already built.

Every axis is titled with its unit ("x" for ratios over the baseline), K axes tick at integers,
every speed-up is drawn with its 95% interval, and series differ in colour, marker and line style
so that more series than the colour cycle has stay apart.
"""

from __future__ import annotations

from itertools import cycle, islice
from typing import Any

import numpy as np
import pandas as pd
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.ticker import FuncFormatter, LogLocator, MaxNLocator, NullFormatter

# A position offered in fewer steps than this gets no point: its share rests on too few draws.
MIN_POSITION_STEPS = 10

SPEEDUP_LABEL = "speed-up over the baseline (x, 95% CI)"
K_LABEL = "K (draft tokens per step)"
COLOURS = tuple(f"C{i}" for i in range(10))  # matplotlib's default (tab10) cycle
MARKERS = ("o", "s", "^", "D", "v", "P", "X")
LINES = ("-", "--", ":", "-.")


def styles(n: int) -> list[dict[str, Any]]:
    """n distinct (colour, marker, line style) triples: colours first, then the line style
    changes with each pass over the ten colours, so no two of up to 40 series look alike."""
    markers = list(islice(cycle(MARKERS), n))
    return [
        {"color": COLOURS[i % 10], "marker": markers[i], "linestyle": LINES[(i // 10) % 4]}
        for i in range(n)
    ]


def interval(data: pd.DataFrame, column: str) -> np.ndarray:
    """Asymmetric error-bar lengths (2, n) from column's _ci_low/_ci_high; 0 where no interval.

    astype: the ends are None (object column) where too few prompts gave no interval.
    """
    mid = data[column].astype(float)
    low = (mid - data[f"{column}_ci_low"].astype(float)).clip(lower=0).fillna(0.0)
    high = (data[f"{column}_ci_high"].astype(float) - mid).clip(lower=0).fillna(0.0)
    return np.vstack([low.to_numpy(), high.to_numpy()])


def integer_ticks(ax: Axes, values: pd.Series) -> None:
    """Ticks at the integer values the data has (K, n), never at 2.5; many values: integers."""
    found = sorted({int(v) for v in values})
    if len(found) <= 12:
        ax.set_xticks(found)
    else:
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))


def _errorbar(ax: Axes, x: pd.Series, data: pd.DataFrame, column: str, name: str) -> None:
    """Points with their bootstrap 95% interval as asymmetric error bars."""
    ax.errorbar(x, data[column].astype(float), yerr=interval(data, column), fmt="o-", capsize=3,
                label=name)  # fmt: skip


def ksweep_figure(data: pd.DataFrame) -> Figure:
    """Speed-up (measured with CI, predicted) and acceptance rate (with CI) against K."""
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    _errorbar(left, data["k"], data, "speedup", "measured (95% CI)")
    predicted = data["predicted_speedup"].astype(float)
    left.plot(data["k"], predicted, "s--", label="predicted (Leviathan et al.)")
    left.axhline(1.0, color="grey", lw=0.8, label="_baseline")
    left.set(xlabel=K_LABEL, ylabel=SPEEDUP_LABEL, title="Speed-up")
    integer_ticks(left, data["k"])
    left.legend()
    _errorbar(right, data["k"], data, "acceptance_rate", "acceptance rate (95% CI)")
    right.set(xlabel=K_LABEL, ylabel="acceptance rate (accepted / proposed)", ylim=(0, 1.05),
              title="Acceptance")  # fmt: skip
    integer_ticks(right, data["k"])
    return fig


def frontier_figure(data: pd.DataFrame, baseline_ppl: float | None) -> Figure:
    """Speed-up (with CI) against output perplexity; lossy policies drawn as crosses.

    The axes fit the points (matplotlib's autoscale, not from 0), and every point is labelled.
    """
    fig = Figure(figsize=(6, 4.2), layout="constrained")
    ax = fig.subplots()
    for lossy, marker, name in ((False, "o", "lossless"), (True, "X", "lossy")):
        part = data[data["lossy"] == lossy]
        if len(part):
            ax.errorbar(part["perplexity"].astype(float), part["speedup"].astype(float),
                        yerr=interval(part, "speedup"), fmt=marker, capsize=3,
                        label=f"{name} (95% CI)")  # fmt: skip
    for row in data.itertuples():
        ax.annotate(str(row.policy), (row.perplexity, row.speedup), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)  # fmt: skip
    if baseline_ppl is not None:
        ax.plot([baseline_ppl], [1.0], "k*", markersize=10, label="baseline")
    ax.axhline(1.0, color="grey", lw=0.8, label="_no speed-up")
    ax.margins(x=0.15, y=0.1)  # room for the labels
    ax.set(xlabel="output perplexity under the scorer (lower is better)", ylabel=SPEEDUP_LABEL,
           title="Speed against quality")  # fmt: skip
    ax.legend()
    return fig


def accepted_length_figure(hist: pd.DataFrame) -> Figure:
    """Grouped bars: each drafter's share of steps by tokens emitted (a drafter's bars sum to 1)."""
    fig = Figure(figsize=(6.5, 3.8), layout="constrained")
    ax = fig.subplots()
    wide = hist.pivot(index="emitted", columns="drafter", values="share").fillna(0.0)
    width = 0.8 / max(len(wide.columns), 1)
    hatches = cycle(("", "//", "..", "xx", "\\\\", "oo"))
    for n, (name, style) in enumerate(zip(wide.columns, styles(len(wide.columns)), strict=True)):
        offset = (n - (len(wide.columns) - 1) / 2) * width
        ax.bar(wide.index + offset, wide[name], width, label=str(name), color=style["color"],
               hatch=next(hatches), edgecolor="white", linewidth=0.5)  # fmt: skip
    ax.set(xlabel="tokens emitted per step (accepted + 1 bonus/correction)",
           ylabel="share of the drafter's steps", title="Tokens per step, per drafter")  # fmt: skip
    integer_ticks(ax, pd.Series(wide.index))
    ax.legend(fontsize=8)
    return fig


def log_ticks(ax: Axes, low: float, high: float) -> None:
    """Labelled ticks on a log x axis: 1-2-5 per decade, or every integer multiple when the data
    spans too little for three of those (a narrow range would otherwise show one label)."""
    subs: tuple[float, ...] = (1.0, 2.0, 5.0)
    decades = np.arange(np.floor(np.log10(low)), np.ceil(np.log10(high)) + 1)
    ticks = [s * 10**d for d in decades for s in subs]
    if sum(low <= t <= high for t in ticks) < 3:
        subs = tuple(float(s) for s in range(1, 10))
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=subs))
    ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.xaxis.set_minor_formatter(NullFormatter())


def latency_figure(steps: dict[str, pd.Series]) -> Figure:
    """Horizontal box plots of step_ms, one per configuration, on a log axis."""
    fig = Figure(figsize=(7, 0.4 * len(steps) + 1.5), layout="constrained")
    ax = fig.subplots()
    ax.boxplot(
        [s.to_numpy() for s in steps.values()],
        orientation="horizontal",
        tick_labels=list(steps),
        flierprops={"markersize": 2},
    )
    ax.set_xscale("log")
    values = pd.concat(list(steps.values()))
    positive = values[values > 0]
    if len(positive):
        log_ticks(ax, float(positive.min()), float(positive.max()))
    ax.invert_yaxis()  # first configuration on top, as in the tables
    ax.set(xlabel="step wall time (ms, log scale)", title="Per-step wall time")
    ax.grid(axis="x", which="major", lw=0.4, alpha=0.5)
    return fig


def enough_positions(data: pd.DataFrame, minimum: int = MIN_POSITION_STEPS) -> pd.DataFrame:
    """The positions offered in at least `minimum` steps (POSITION_COLUMNS rows)."""
    return data[data["proposed"] >= minimum]


def position_figure(data: pd.DataFrame) -> Figure:
    """One line per configuration: acceptance probability at each draft position, drawn only
    where at least MIN_POSITION_STEPS steps offered that position."""
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    shown = enough_positions(data)
    names = list(dict.fromkeys(shown["configuration"]))
    for name, style in zip(names, styles(len(names)), strict=True):
        part = shown[shown["configuration"] == name]
        ax.plot(part["position"], part["acceptance"], label=str(name), **style)
    ax.set(xlabel="draft position i", ylabel="P(position i accepted | at least i proposed)",
           ylim=(0, 1.05), title="Acceptance by draft position")  # fmt: skip
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    if names:
        ax.legend(fontsize=7, ncols=2 if len(names) > 6 else 1)
    return fig


def forward_cost_figure(data: pd.DataFrame) -> Figure:
    """One line per engine configuration: a forward's cost relative to one token, against n."""
    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.subplots()
    names = list(dict.fromkeys(data["line"]))
    for name, style in zip(names, styles(len(names)), strict=True):
        part = data[data["line"] == name]
        ax.plot(part["tokens"], part["ratio"], label=str(name), **style)
    ax.axhline(1.0, color="grey", lw=0.8)  # Leviathan's assumption: verifying costs one decode
    ax.set(
        xlabel="tokens in the forward (n = K + 1 when verifying K drafts)",
        ylabel="forward time / one-token forward time (x)",
        title="Forward cost against tokens",
    )
    integer_ticks(ax, data["tokens"])
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    return fig


def speedup_figure(data: pd.DataFrame, floor: tuple[float, float] | None) -> Figure:
    """Every configuration's speed-up with its 95% interval (a forest plot), the A/A noise floor
    as a band around 1. data: configuration, lossy, speedup and its _ci_low/_ci_high."""
    fig = Figure(figsize=(7, 0.32 * len(data) + 1.6), layout="constrained")
    ax = fig.subplots()
    y = np.arange(len(data))
    if floor is not None:
        ax.axvspan(*floor, color="grey", alpha=0.2, label="noise floor (A/A 95% CI)")
    ax.axvline(1.0, color="grey", lw=0.8)
    for lossy, marker, name in ((False, "o", "lossless"), (True, "X", "lossy")):
        chosen = (data["lossy"] == lossy).to_numpy()
        if chosen.any():
            part = data[chosen]
            ax.errorbar(part["speedup"].astype(float), y[chosen], xerr=interval(part, "speedup"),
                        fmt=marker, capsize=3, label=f"{name} (95% CI)")  # fmt: skip
    ax.set_yticks(y, list(data["configuration"]))
    ax.invert_yaxis()  # first configuration on top, as in the tables
    ax.set(xlabel=SPEEDUP_LABEL, title="Speed-up of every configuration")
    ax.legend(fontsize=8)
    return fig


def tree_figure(data: pd.DataFrame) -> Figure:
    """tau and speed-up (with its 95% interval) against tree size, one line per drafter."""
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    groups = list(data.groupby("drafter", sort=False))
    for (drafter, part), style in zip(groups, styles(len(groups)), strict=True):
        left.plot(part["tree_size"], part["mean_accepted_length"].astype(float), label=drafter,
                  **style)  # fmt: skip
        _errorbar(right, part["tree_size"], part, "speedup", f"{drafter} (95% CI)")
    left.set(xlabel="tree size (nodes besides the root)", ylabel="tau (tokens per step)",
             title="Tokens per step")  # fmt: skip
    right.axhline(1.0, color="grey", lw=0.8, label="_baseline")
    right.set(xlabel="tree size (nodes besides the root)", ylabel=SPEEDUP_LABEL,
              title="Speed-up")  # fmt: skip
    for ax in (left, right):
        integer_ticks(ax, data["tree_size"])
        ax.legend(fontsize=8)
    return fig
