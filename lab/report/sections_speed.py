"""The speed sections: baseline, K sweep, policies, drafters, controllers, predicted, category."""

from __future__ import annotations

import json

import pandas as pd

from lab import stats
from lab.report.figures import accepted_length_figure, frontier_figure, ksweep_figure
from lab.report.frames import (
    STEP_COST_COLUMNS,
    accepted_length,
    cost_model,
    perplexity_by_item,
    ppl_of,
    spec_frame,
    step_costs,
)
from lab.report.load import ReportSettings, Results, first, is_lossy, label, method
from lab.report.sections import Section, no_data
from lab.report.tables import MISSING, ci, fmt, fmt_ci, header, make_table

# An item whose interleaved reference ran this much faster or slower than the median item's ran
# on a machine under another load; its pairs still compare like with like, but the report says so.
LOAD_DRIFT = 0.10


def noise_floor(results: Results) -> str | None:
    """The A/A line: the baseline against its own interleaved reference, as every speed-up is."""
    base = results.baseline
    if base is None or "speedup" not in base.metrics:
        return None
    m = base.metrics
    cell = fmt_ci(m["speedup"], m["speedup_ci_low"], m["speedup_ci_high"], m.get("speedup_n"))
    return (
        f"Noise floor: the baseline timed against itself under the same protocol (A/A) gives "
        f"{cell}; a speed-up whose interval overlaps this one is no measured effect."
    )


def _with_floor(section: Section, results: Results) -> Section:
    line = noise_floor(results)
    if line is not None and section.tables:
        section.text.append(line)
    return section


def baseline_section(results: Results) -> Section:
    """The target alone: the reference every speed-up divides by, and its A/A noise floor."""
    section = Section("Baseline")
    base = results.baseline
    if base is None:
        section.text.append(no_data("experiments/baseline/ is absent"))
        return section
    m, step_ms = base.metrics, first(base.steps)["step_ms"]
    row = {
        "configuration": label(base),
        "prompts": m["prompts"],
        "new_tokens": m["new_tokens"],
        "tokens_per_s": m["tokens_per_s"],
        "ttft_ms": m["ttft_ms"],
        "step_ms_median": step_ms.median(),
        "peak_rss_mb": m["peak_rss_mb"],
    }
    if m.get("peak_cuda_mb") is not None:
        row["peak_cuda_mb"] = m["peak_cuda_mb"]
    section.tables.append(make_table("baseline", "Baseline (target alone)", pd.DataFrame([row])))
    return _with_floor(section, results)


def protocol_section(results: Results) -> Section:
    """How speed-ups are timed, and how fast the machine ran for each item (load drift)."""
    section = Section("Timing protocol and machine load")
    items = [i for i in results.runs if "reference_tokens_per_s" in i.metrics]
    if not items:
        section.text.append(no_data("no item has interleaved reference runs"))
        return section
    section.text.append(
        "Every timed generation is paired with a plain-decoding generation of the same prompt "
        "run right before or after it (order random per prompt, balanced); a speed-up is the "
        "geometric mean of the per-prompt ratios within pairs, so load that changes between or "
        "during stages moves both arms alike. Each item first runs one full-length warm-up "
        "generation of both arms. The reference's speed below shows the load each item saw."
    )
    speeds = pd.Series([i.metrics["reference_tokens_per_s"] for i in items])
    relative = speeds / speeds.median()
    data = pd.DataFrame(
        {
            "configuration": [label(i) for i in items],
            "reference_tokens_per_s": speeds,
            "relative_speed": relative,
            "load_changed": (relative - 1).abs() > LOAD_DRIFT,
        }
    )
    section.tables.append(make_table("protocol", "Interleaved reference speed per item", data))
    drifted = data[data["load_changed"]]
    if len(drifted):
        names = ", ".join(drifted["configuration"])
        section.text.append(
            f"Load changed: the reference ran more than {LOAD_DRIFT:.0%} off the median speed "
            f"for {names}. Their speed-ups are still paired; their tokens/s are not comparable."
        )
    return _with_floor(section, results)


def ksweep_section(results: Results, settings: ReportSettings) -> Section:
    """Fixed K: speed-up and acceptance against the draft length."""
    section = Section("K sweep")
    items = results.items.get("ksweep", [])
    if not items:
        section.text.append(no_data("experiments/ksweep/ is absent or empty"))
        return section
    columns = [
        "k",
        *ci("acceptance_rate"),
        "mean_accepted_length",
        "tokens_per_s",
        *ci("speedup"),
        "throughput_ratio",
        "cost_ratio",
        "predicted_speedup",
    ]
    data = spec_frame(items, settings, columns)
    section.tables.append(make_table("ksweep", "Speed-up and acceptance against K", data))
    section.figures.append(("ksweep", ksweep_figure(data), "Speed-up and acceptance against K"))
    return _with_floor(section, results)


def policies_section(results: Results, settings: ReportSettings) -> Section:
    """Acceptance rules: speed-up against quality (perplexity, greedy match)."""
    section = Section("Acceptance policies")
    items = results.items.get("policies", [])
    if not items:
        section.text.append(no_data("experiments/policies/ is absent or empty"))
        return section
    ppl = perplexity_by_item(results)
    columns = [
        "configuration",
        *ci("acceptance_rate"),
        "mean_accepted_length",
        *ci("speedup"),
        "greedy_match_rate",
    ]
    data = spec_frame(items, settings, columns)
    data.insert(1, "policy", [method(i)["policy"] for i in items])
    data.insert(2, "lossy", [is_lossy(i) for i in items])
    data["perplexity"] = [ppl_of(ppl, i) for i in items]
    section.tables.append(
        make_table("policies", "Acceptance policies: speed against quality", data)
    )
    if results.outputs_ppl is None:
        section.text.append(no_data("experiments/perplexity/outputs.csv is absent, no frontier"))
        return section
    base = ppl_of(ppl, results.baseline) if results.baseline else None
    section.text.append(f"Baseline output perplexity: {fmt(base)}.")
    fig = frontier_figure(data, base)
    section.figures.append(("frontier", fig, "Speed-quality frontier of the acceptance policies"))
    return _with_floor(section, results)


def drafters_section(results: Results, settings: ReportSettings) -> Section:
    """Draft sources at the default K: speed-up and tokens per step."""
    section = Section("Drafters")
    items = results.items.get("drafters", [])
    if not items:
        section.text.append(no_data("experiments/drafters/ is absent or empty"))
        return section
    scaled = results.items.get("drafters_scale", [])
    if scaled:
        section.text.append(
            "drafters_scale/<kind>: the same drafter with the heads pipelines/heads trained on "
            "more data (experiments/heads_scale/; Drafter heads shows how much)."
        )
    items = [*items, *scaled]
    columns = [
        "configuration",
        "k",
        *ci("acceptance_rate"),
        "mean_accepted_length",
        "tokens_per_s",
        *ci("speedup"),
        "cost_ratio",
        "predicted_speedup",
    ]
    data = spec_frame(items, settings, columns)
    data.insert(1, "drafter", [method(i)["drafter"] for i in items])
    section.tables.append(make_table("drafters", "Drafters", data))
    fig = accepted_length_figure(accepted_length(items))
    section.figures.append(("accepted_length", fig, "Tokens emitted per step, per drafter"))
    return _with_floor(section, results)


def controllers_section(results: Results, settings: ReportSettings) -> Section:
    """Adaptive K against the best fixed K in hindsight."""
    section = Section("K controllers")
    items = results.items.get("adaptive", [])
    if not items:
        section.text.append(no_data("experiments/adaptive/ is absent or empty"))
        return section
    columns = [
        "configuration",
        "k",
        "mean_k",
        *ci("acceptance_rate"),
        "mean_accepted_length",
        *ci("speedup"),
    ]
    data = spec_frame(items, settings, columns)
    data.insert(
        1,
        "controller_params",
        [json.dumps(method(i)["controller_params"], sort_keys=True) for i in items],
    )
    fixed = results.items.get("ksweep", [])
    if fixed:
        best = max(fixed, key=lambda i: float(i.metrics["speedup"]))
        data["best_fixed_k"] = int(method(best)["k"])
        data["best_fixed_speedup"] = float(best.metrics["speedup"])
        data["regret"] = data["best_fixed_speedup"] / data["speedup"] - 1.0
        data["regret_oracle"] = [
            stats.oracle_regret(i.rows, [f.rows for f in fixed]) for i in items
        ]
    else:
        section.text.append(no_data("no K sweep, so no regret against the best fixed K"))
    section.tables.append(make_table("controllers", "K controllers and their regret", data))
    return _with_floor(section, results)


def predicted_section(results: Results, settings: ReportSettings) -> Section:
    """Measured speed-up beside two predictions: Leviathan's from measured a, K and c (chains),
    and the cost model tau / (wall time per step), which holds for trees too."""
    section = Section("Measured vs predicted speed-up")
    items = results.speculative
    if not items:
        section.text.append(no_data("no speculative configuration has results"))
        return section
    columns = ["configuration", "mean_k", "acceptance_rate", "mean_accepted_length", "cost_ratio",
               "predicted_speedup", *ci("speedup")]  # fmt: skip
    data = spec_frame(items, settings, columns)
    data["measured_over_predicted"] = data["speedup"] / data["predicted_speedup"].astype(float)
    costs = pd.DataFrame([step_costs(i, results.baseline) for i in items], index=data.index)
    data[list(STEP_COST_COLUMNS)] = costs[list(STEP_COST_COLUMNS)]
    data["predicted_from_costs"] = cost_model(data)
    data["measured_over_costs"] = data["speedup"] / data["predicted_from_costs"]
    section.text.append(
        "Leviathan et al.'s prediction assumes a verify step costs one decode step and i.i.d. "
        "acceptance along a chain, so token trees get none. The cost model divides the measured "
        "tokens per step (tau) by the measured wall time of a step (drafting, verifying and "
        "the acceptance bookkeeping), in decode steps of the interleaved reference; what it "
        "leaves out (prefill, the geometric mean over prompts) is the gap to the measured "
        "speed-up."
    )
    caption = "Measured speed-up against Leviathan's prediction and the measured-cost model"
    section.tables.append(make_table("predicted", caption, data))
    return section


def categories_section(results: Results, settings: ReportSettings) -> Section:
    """Speed-up per prompt category, paired with the baseline on that category's prompts."""
    section = Section("Per-category speed-up")
    base, items = results.baseline, results.speculative
    if base is None or not items:
        section.text.append(
            no_data("needs the baseline and at least one speculative configuration")
        )
        return section
    frames = [
        stats.category_speedups(i.rows, settings.seed).assign(configuration=label(i)) for i in items
    ]
    data = pd.concat(frames, ignore_index=True)
    # speedup_n (the paired prompts) makes a category with fewer than 3 show 'x (n=1)'.
    data = data[["configuration", "category", *ci("speedup")]]
    table = make_table("categories", "Speed-up per prompt category [95% CI]", data)
    # Shown wide (configurations x categories); the CSV stays long, one row per pair.
    table.shown = (
        table.shown.pivot(index="configuration", columns="category", values=header("speedup", True))
        .reindex(index=data["configuration"].unique(), columns=data["category"].unique())
        .fillna(MISSING)
        .reset_index()
    )
    table.shown.columns.name = None
    section.tables.append(table)
    return section
