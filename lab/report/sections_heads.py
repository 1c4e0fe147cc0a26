"""The heads section: what the Medusa and EAGLE heads trained on, and held-out accuracy against
training tokens seen (experiments/heads/<kind>/ and, once run, pipelines/heads' heads_scale/)."""

from __future__ import annotations

import pandas as pd
from matplotlib.figure import Figure

from lab.report.figures import log_ticks, styles
from lab.report.heads import HeadRecords
from lab.report.load import Results
from lab.report.sections import Section, no_data
from lab.report.tables import Table, fmt, make_table

NOTE = (
    "Each head trains on the target's last hidden states and learns the target's own argmax at "
    "each position (what the target will emit), never the text's next token. The data: the "
    "target's greedy answers to the training prompts (self-distilled), and slices of CPython's "
    "stdlib source and docstrings read by teacher forcing (one batched prefill forward per "
    "sequence, as assistant turns of the chat template). Label agreement: the share of corpus "
    "positions where the target's argmax is the text's next token. Held out: every 8th "
    "sequence of each source (default run). Tokens seen: training positions on the target's "
    "text (answers and corpus slices, prompts not counted), summed over steps; accuracy is "
    "measured before training, after 1/8, 1/4 and 1/2 of the first epoch and after every "
    "epoch, so points past one epoch repeat data. Medusa head i drafts the token i+1 past the "
    "target's own next token; EAGLE's one head drafts the token after it. Run default: the "
    "pipeline's heads stage (the drafters' heads unless drafters.params point elsewhere); run "
    "scale: pipelines/heads (experiments/heads_scale/), where it ran."
)
SHOWN = {
    "generated_tokens": "answer tokens",
    "corpus_tokens": "corpus tokens",
    "corpus_label_agreement": "label agreement",
    "train_tokens": "training tokens",
    "train_seconds": "training (s)",
}


def summary_table(summary: pd.DataFrame) -> Table:
    """Per trained head: its data, training time, final held-out top-1 per head (top-5 of the
    first), and top-1 on held-out answers alone, the text most like what the benchmark decodes."""
    tops = sorted((c for c in summary.columns if c.startswith("top1_")), key=_order)
    answers = sorted((c for c in summary.columns if c.startswith("answer_top1_")), key=_order)
    columns = ["run", "kind", *SHOWN, *tops, "top5_head1", *answers]
    data = summary.reindex(columns=columns)
    table = make_table("heads_training", "Heads: training data and held-out accuracy", data)
    labels = {c: _label(c) for c in [*tops, "top5_head1", *answers]}
    table.shown = table.shown.rename(columns={**SHOWN, **labels})
    return table


def _order(column: str) -> tuple[int, int]:
    """top1_head2 -> (1, 2): top-1 before top-5, heads in order."""
    k, head = column.split("top")[1].split("_head")
    return int(k), int(head)


def _label(column: str) -> str:
    k, head = _order(column)
    prefix = "answers " if column.startswith("answer_") else ""
    return f"{prefix}top-{k} h{head}"


def curve_table(curve: pd.DataFrame) -> Table:
    """Held-out accuracy per checkpoint: a row per run, kind and tokens seen, a column per head."""
    wide = curve.pivot_table(index=["run", "kind", "epoch", "tokens"], columns=["k", "head"],
                             values="accuracy", sort=False)  # fmt: skip
    wide = wide.reindex(columns=sorted(wide.columns))
    wide.columns = [f"top-{k} h{head}" for k, head in wide.columns]
    data = wide.reset_index()
    table = make_table("heads_curve", "Held-out accuracy against training tokens seen", data)
    table.shown["tokens"] = [fmt(int(t)) for t in data["tokens"]]
    table.shown["epoch"] = [fmt(int(e)) for e in data["epoch"]]
    return table


def curve_figure(curve: pd.DataFrame) -> Figure:
    """Held-out top-1 against tokens seen (log scale), a line per run, kind and head."""
    fig = Figure(figsize=(7, 4.2), layout="constrained")
    ax = fig.subplots()
    top1 = curve[(curve["k"] == 1) & (curve["tokens"] > 0)]  # log axis: the start is in the table
    lines = list(top1.groupby(["run", "kind", "head"], sort=False))
    for ((run, kind, head), line), style in zip(lines, styles(len(lines)), strict=True):
        name = f"{kind} h{head}" + ("" if run == "default" else f" ({run})")
        ax.plot(line["tokens"], line["accuracy"], label=name, **style)
    ax.set_xscale("log")
    if len(top1):
        log_ticks(ax, float(top1["tokens"].min()), float(top1["tokens"].max()))
    ax.set(xlabel="training tokens seen (log scale)", ylabel="held-out top-1 accuracy",
           title="Held-out top-1 against training tokens")  # fmt: skip
    ax.set_ylim(0, 1)
    ax.grid(lw=0.4, alpha=0.5)
    ax.legend(fontsize=7, ncol=2)
    return fig


def heads_section(results: Results) -> Section:
    """The heads' data, held-out accuracy at the end, and against training tokens seen."""
    section = Section("Drafter heads")
    records: HeadRecords = results.heads
    if records.empty:  # render leaves the section out then; a caller may still ask for it
        section.text.append(no_data("experiments/heads/ holds no trained heads"))
        return section
    section.text.append(NOTE)
    section.tables += [summary_table(records.summary), curve_table(records.curve)]
    caption = "Held-out top-1 of each head against training tokens seen"
    section.figures.append(("heads_curve", curve_figure(records.curve), caption))
    return section
