"""The report's matplotlib figures, each drawn from a frame the sections already built."""

from __future__ import annotations

from typing import Any

import pandas as pd
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter, ScalarFormatter


def _errorbar(ax: Any, x: pd.Series, data: pd.DataFrame, column: str, name: str) -> None:
    """Points with their bootstrap 95% interval as asymmetric error bars."""
    mid = data[column].astype(float)
    low = (mid - data[f"{column}_ci_low"].astype(float)).clip(lower=0)
    high = (data[f"{column}_ci_high"].astype(float) - mid).clip(lower=0)
    ax.errorbar(x, mid, yerr=[low, high], fmt="o-", capsize=3, label=name)


def ksweep_figure(data: pd.DataFrame) -> Figure:
    """Speed-up (measured with CI, predicted) and acceptance rate (with CI) against K."""
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    _errorbar(left, data["k"], data, "speedup", "measured")
    left.plot(data["k"], data["predicted_speedup"], "s--", label="predicted (Leviathan)")
    left.axhline(1.0, color="grey", lw=0.8)
    left.set(xlabel="K (draft length)", ylabel="speed-up over baseline", xticks=data["k"])
    left.legend()
    _errorbar(right, data["k"], data, "acceptance_rate", "acceptance rate")
    right.set(xlabel="K (draft length)", ylabel="acceptance rate", ylim=(0, 1.05), xticks=data["k"])
    return fig


def frontier_figure(data: pd.DataFrame, baseline_ppl: float | None) -> Figure:
    """Speed-up against output perplexity; lossy policies drawn as crosses."""
    fig = Figure(figsize=(5.5, 4), layout="constrained")
    ax = fig.subplots()
    for lossy, marker, name in ((False, "o", "lossless"), (True, "X", "lossy")):
        part = data[data["lossy"] == lossy]
        if len(part):
            # astype: ends are None (object column) where too few prompts gave no interval.
            mid = part["speedup"].astype(float)
            err = [
                (mid - part["speedup_ci_low"].astype(float)).clip(lower=0),
                (part["speedup_ci_high"].astype(float) - mid).clip(lower=0),
            ]
            ax.errorbar(
                part["perplexity"], part["speedup"], yerr=err, fmt=marker, capsize=3, label=name
            )
    for row in data.itertuples():
        ax.annotate(
            str(row.policy),
            (row.perplexity, row.speedup),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    if baseline_ppl is not None:
        ax.plot([baseline_ppl], [1.0], "k*", markersize=10, label="baseline")
    ax.set(xlabel="output perplexity under the scorer (lower is better)", ylabel="speed-up")
    ax.legend()
    return fig


def accepted_length_figure(hist: pd.DataFrame) -> Figure:
    """Grouped bars: share of steps by tokens emitted, one colour per drafter."""
    fig = Figure(figsize=(6, 3.6), layout="constrained")
    ax = fig.subplots()
    wide = hist.pivot(index="emitted", columns="drafter", values="share").fillna(0.0)
    width = 0.8 / max(len(wide.columns), 1)
    for n, name in enumerate(wide.columns):
        ax.bar(
            wide.index + (n - (len(wide.columns) - 1) / 2) * width,
            wide[name],
            width,
            label=str(name),
        )
    ax.set(xlabel="tokens emitted per step (accepted + bonus)", ylabel="share of steps")
    ax.set_xticks(wide.index)
    ax.legend()
    return fig


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
    ax.xaxis.set_major_formatter(ScalarFormatter())  # 2, 5, 10 ms rather than 10^0 labels
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.invert_yaxis()  # first configuration on top, as in the tables
    ax.set(xlabel="step wall time (ms, log scale)")
    return fig


def position_figure(data: pd.DataFrame) -> Figure:
    """One line per configuration: acceptance probability at each draft position."""
    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.subplots()
    for name, part in data.groupby("configuration", sort=False):
        ax.plot(part["position"], part["acceptance"], "o-", label=str(name))
    ax.set(xlabel="draft position i", ylabel="P(accepted | proposed at least i)", ylim=(0, 1.05))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7)
    return fig


def forward_cost_figure(data: pd.DataFrame) -> Figure:
    """One line per engine configuration: a forward's cost relative to one token, against n."""
    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.subplots()
    for name, part in data.groupby("line", sort=False):
        ax.plot(part["tokens"], part["ratio"], "o-", label=str(name))
    ax.axhline(1.0, color="grey", lw=0.8)  # Leviathan's assumption: verifying costs one decode
    ax.set(
        xlabel="tokens in the forward (n = K + 1 when verifying K drafts)",
        ylabel="forward time / one-token forward time (x)",
        xticks=sorted(data["tokens"].unique()),
    )
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    return fig
