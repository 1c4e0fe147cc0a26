"""Section, the unit of the report, and the sections on quality, step time, GPU and HTTP."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pandas as pd
from matplotlib.figure import Figure

from lab import stats
from lab.pipeline import store
from lab.report.figures import (
    MIN_POSITION_STEPS,
    enough_positions,
    latency_figure,
    position_figure,
)
from lab.report.frames import acceptance_positions, perplexity_by_item
from lab.report.http import NOTE, SECTION_COLUMNS
from lab.report.load import (
    CORPUS_COLUMNS,
    LOSSLESS_COLUMNS,
    ReportError,
    Results,
    first,
    label,
    method,
    read_csv,
)
from lab.report.tables import Table, fmt, make_table


@dataclass
class Section:
    """One report section: paragraphs, tables and figures (name, figure, caption)."""

    title: str
    text: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[tuple[str, Figure, str]] = field(default_factory=list)


def no_data(what: str) -> str:
    """The one line a section without data shows."""
    return f"_No data: {what}._"


LOSSLESS_VERDICTS = ("identical", "numerics", "violation")  # lab.pipeline.lossless.VERDICTS


def _fork(r: Any) -> str:
    """One differing prompt: where it forks, its verdict, and the numbers that decided it."""
    gap = "no fork pair" if pd.isna(r.fork_gap) else f"gap {fmt(r.fork_gap)}"
    return (
        f"{r.question_id} at token {fmt(int(r.first_diff))}: {r.verdict} ({gap}, tolerance "
        f"{fmt(r.tolerance)}, margin {fmt(r.logit_margin)})"
    )


def lossless_table(checks: dict[str, pd.DataFrame]) -> Table:
    """Per configuration: identical / numerics / violation counts, and where the others fork."""
    rows = []
    for name, check in checks.items():
        unknown = set(check["verdict"]) - set(LOSSLESS_VERDICTS)
        if unknown:
            raise ReportError(f"{name}: lossless.csv has unknown verdicts {sorted(unknown)}")
        differing = check[check["verdict"] != "identical"]
        counts = {v: int((check["verdict"] == v).sum()) for v in LOSSLESS_VERDICTS}
        rows.append(
            {
                "configuration": name,
                **counts,
                "prompts": len(check),
                "tolerance_max": differing["tolerance"].max() if len(differing) else None,
                "differing": "; ".join(_fork(r) for r in differing.itertuples()) or "none",
            }
        )
    data = pd.DataFrame(rows)
    table = make_table("lossless", "Lossless check against the greedy baseline", data)
    table.shown = table.shown.rename(
        columns={"tolerance_max": "largest tolerance", "differing": "differing prompts"}
    )
    return table


def lossless_section(results: Results) -> Section:
    """Lossless configurations under greedy must reproduce the baseline token for token."""
    section = Section("Lossless check")
    checks = {
        label(i): read_csv(i.path / store.LOSSLESS, LOSSLESS_COLUMNS) for i in results.speculative
    }
    # write_item leaves a header-only lossless.csv where no check ran (lossy or sampled runs).
    present = {name: f for name, f in checks.items() if f is not None and len(f)}
    if not present:
        section.text.append(no_data("no lossless check ran (it needs a lossless method, greedy)"))
        return section
    section.text.append(
        "A prompt that differs from the baseline is judged at its first differing token, on the "
        "baseline's prefix: numerics when both the baseline's and the method's token lie within "
        "the tolerance of the target's top logit there (gap = top logit - the lower of the two), "
        "a rounding-level near-tie that batched and single-token kernels may break either way; "
        "violation otherwise, which fails the stage. Tolerance = a few ulps of the target's dtype "
        "at the position's largest |logit| (lab/pipeline/lossless.py derives it)."
    )
    section.tables.append(lossless_table(present))
    unchecked = [name for name in checks if name not in present]
    if unchecked:
        section.text.append(f"Not checked (lossy or sampled): {', '.join(unchecked)}.")
    return section


def perplexity_section(results: Results) -> Section:
    """Output perplexity per configuration and target/draft perplexity on a reference corpus."""
    section = Section("Perplexity")
    if results.outputs_ppl is None and results.corpus_ppl is None:
        section.text.append(no_data("experiments/perplexity/ is absent"))
        return section
    if results.outputs_ppl is not None:
        data = perplexity_by_item(results)
        labels = {
            (i.path.parent.name, i.path.name): label(i) for s in results.items.values() for i in s
        }
        names = [
            labels.get((s, i), f"{s}/{i}") for s, i in zip(data["stage"], data["item"], strict=True)
        ]
        data.insert(0, "configuration", names)
        data = data.drop(columns=["stage", "item"])
        caption = "Perplexity of each configuration's outputs under the scorer"
        section.tables.append(make_table("perplexity_outputs", caption, data))
    if results.corpus_ppl is not None:
        data = results.corpus_ppl[list(CORPUS_COLUMNS)]
        caption = "Perplexity of target and draft on the reference corpus"
        section.tables.append(make_table("perplexity_corpus", caption, data))
    return section


def latency_section(results: Results) -> Section:
    """Distribution of per-step wall time for every configuration."""
    section = Section("Per-step latency")
    if not results.runs:
        section.text.append(no_data("no configuration has results"))
        return section
    steps = {label(i): first(i.steps)["step_ms"] for i in results.runs}
    data = pd.DataFrame(
        {
            "configuration": list(steps),
            "step_ms_median": [s.median() for s in steps.values()],
            "step_ms_p90": [s.quantile(0.9) for s in steps.values()],
            "steps": [len(s) for s in steps.values()],
        }
    )
    section.tables.append(make_table("step_latency", "Per-step wall time (ms)", data))
    section.figures.append(("step_latency", latency_figure(steps), "Per-step wall time"))
    return section


def breakdown_section(results: Results) -> Section:
    """Where each step's time goes per configuration; peak memory per configuration and stage."""
    section = Section("Step time breakdown and memory")
    if not results.runs:
        section.text.append(no_data("no configuration has results"))
        return section
    rows = [
        {
            "configuration": label(i),
            "drafter": method(i)["drafter"],
            **stats.step_breakdown(first(i.steps)),
            "peak_rss_mb": i.metrics["peak_rss_mb"],
            "peak_cuda_mb": i.metrics.get("peak_cuda_mb"),
        }
        for i in results.runs
    ]
    data = pd.DataFrame(rows)
    if data["peak_cuda_mb"].isna().all():  # a CPU run measures no CUDA memory
        data = data.drop(columns="peak_cuda_mb")
    caption = "Mean ms per step (first repetition) by phase, and peak memory"
    section.tables.append(make_table("step_breakdown", caption, data))
    section.tables.append(make_table("memory", "Peak memory per stage", memory_by_stage(data)))
    # store.write_item moves a profile folder in only when the run was profiled.
    profiles = [i.path / store.PROFILE for i in results.runs]
    profiled = [f"`{p}`" for p in profiles if p.is_dir()]
    if profiled:
        section.text.append(
            "Profiled with torch.profiler (timings include its overhead; Chrome traces, top "
            f"operators and per-step phases in): {', '.join(profiled)}."
        )
    return section


def memory_by_stage(breakdown: pd.DataFrame) -> pd.DataFrame:
    """Peak RSS (and CUDA, when measured) per stage: the max over the stage's configurations."""
    stage = breakdown["configuration"].str.split("/").str[0]
    columns = [c for c in ("peak_rss_mb", "peak_cuda_mb") if c in breakdown]
    grouped = breakdown[columns].groupby(stage, sort=False)
    data = grouped.max().add_suffix("_max").reset_index(names="stage")
    data.insert(1, "items", grouped.size().to_numpy())
    return data


def position_section(results: Results) -> Section:
    """How acceptance decays along the draft: P(position i kept | i proposed)."""
    section = Section("Acceptance by draft position")
    data = acceptance_positions(results.speculative)
    if data.empty:
        section.text.append(no_data("no speculative configuration has results"))
        return section
    fig = position_figure(data)
    dropped = len(data) - len(enough_positions(data))
    caption = (
        f"Acceptance by draft position; a position offered in fewer than {MIN_POSITION_STEPS} "
        f"steps is not drawn ({dropped} of {len(data)} points left out; all of them in "
        "plots/acceptance_by_position.csv)"
    )
    section.figures.append(("acceptance_by_position", fig, caption))
    return section


# What a reader of the GPU table needs, one row per device, model, method and cache; every
# other recorded column (driver, torch, bound, decode-only speeds, the K sweeps) stays in its CSV.
GPU_KEYS = ("device", "model", "method", "cache")
GPU_COLUMNS = ("device", "model", "dtype", "method", "cache", "k", "tokens_per_s", "speedup",
               "speedup_over", "acceptance_rate", "identical", "numerics", "violation")  # fmt: skip
# numerics / violation: prompts whose output forks from the reference method's, classified as the
# pipeline's lossless check does (files written before `lab bench` classified them have none).
GPU_SHOWN = {"speed-up": "speed-up (x)", "speedup_over": "over", "identical": "identical output",
             "numerics": "numerics flips", "violation": "violations"}  # fmt: skip


def gpu_table(full: pd.DataFrame) -> pd.DataFrame:
    """One row per device, model, method and cache: where a K sweep repeats a method, the row at
    the K most rows use (the default K); otherwise the first file (files sort by name)."""
    keys = [k for k in GPU_KEYS if k in full]
    frame = full.copy()
    if "k" in frame and frame["k"].notna().any():
        usual = frame["k"].mode().iloc[0]
        frame["_other_k"] = frame["k"].notna() & (frame["k"] != usual)
        frame = frame.sort_values("_other_k", kind="stable")
        frame["k"] = frame["k"].astype("Int64")  # 4, not 4.00 (NaN made the column float)
    for count in LOSSLESS_VERDICTS[1:]:  # prompt counts: 6, not 6.00 (older files: NaN)
        if count in frame:
            frame[count] = frame[count].astype("Int64")
    curated = (frame.drop_duplicates(keys) if keys else frame).sort_index()
    return curated[[c for c in GPU_COLUMNS if c in curated]].reset_index(drop=True)


def gpu_section(results: Results) -> Section:
    """GPU measurements (experiments/gpu/*.json): one row per device, model, method and cache."""
    section = Section("GPU")
    if results.gpu is None:
        section.text.append(no_data("experiments/gpu/ has no results"))
        return section
    caption = "GPU and CPU runs of `lab bench`, one row per method (all columns in the CSV)"
    table = make_table("gpu", caption, gpu_table(results.gpu))
    table.shown = table.shown.rename(columns=GPU_SHOWN)
    table.data = results.gpu
    section.tables.append(table)
    return section


def http_section(results: Results) -> Section:
    """The HTTP load runs of pipelines/http (experiments/loadtest/), one row per run."""
    section = Section("Serving over HTTP", [NOTE])
    shown = results.http.rename(columns=SECTION_COLUMNS)
    section.tables.append(make_table("http", "HTTP load runs", shown))
    return section
