"""Tree size against tau and speed-up, for the drafters that propose token trees."""

from __future__ import annotations

import pandas as pd

from lab.pipeline.store import Item
from lab.report.figures import tree_figure
from lab.report.frames import cost_model, spec_frame, step_costs
from lab.report.load import ReportSettings, Results, first, method
from lab.report.sections import Section, no_data
from lab.report.tables import ci, make_table

# Stages whose items may be tree drafters: the default run's drafters, and pipelines/trees.
TREE_STAGES = ("drafters", "trees")


def tree_size(item: Item) -> int | None:
    """The tree_size the drafter was asked for (None: it has none, or proposes a chain)."""
    size = method(item).get("drafter_params", {}).get("tree_size")
    return int(size) if size is not None else None


def tree_items(results: Results) -> list[Item]:
    """Every item of a drafter with a tree size, by drafter then size (reused copies left out)."""
    found = [
        i for i in results.runs if i.path.parent.name in TREE_STAGES and tree_size(i) is not None
    ]
    return sorted(found, key=lambda i: (method(i)["drafter"], tree_size(i)))


def tree_frame(results: Results, settings: ReportSettings) -> pd.DataFrame:
    """One row per tree item: its size, the nodes and depth it verified, tau, speed-up, cost."""
    items = tree_items(results)
    if not items:
        return pd.DataFrame()
    columns = ["configuration", *ci("acceptance_rate"), "mean_accepted_length", *ci("speedup")]
    data = spec_frame(items, settings, columns)
    data.insert(1, "drafter", [method(i)["drafter"] for i in items])
    data.insert(2, "tree_size", [tree_size(i) for i in items])
    data.insert(3, "nodes", [float(first(i.steps)["proposed"].mean()) for i in items])
    data.insert(4, "depth", [float(first(i.steps)["depth"].mean()) for i in items])
    costs = pd.DataFrame([step_costs(i, results.baseline) for i in items], index=data.index)
    data["step_cost"] = costs["step_cost"]
    data["predicted_from_costs"] = cost_model(data)
    return data


def trees_section(results: Results, settings: ReportSettings) -> Section:
    """Tree size against tau and speed-up (drafters@medusa/eagle and pipelines/trees items)."""
    section = Section("Tree size")
    data = tree_frame(results, settings)
    if data.empty:
        section.text.append(no_data("no drafter with a tree_size has results"))
        return section
    section.text.append(
        "Each row verifies a token tree of up to tree_size nodes in one target forward; nodes "
        "and depth are the means per step, tau the tokens a step emits. A larger tree raises "
        "tau only as far as the heads' later guesses are right, and costs a wider verify "
        "forward (step cost, in decode steps of the interleaved reference). Sizes besides the "
        "default come from the optional pipelines/trees (dvc repro pipelines/trees/dvc.yaml)."
    )
    if data["tree_size"].nunique() == 1:
        section.text.append("Only one tree size has run: run pipelines/trees for the sweep.")
    section.tables.append(make_table("trees", "tau and speed-up against tree size", data))
    if len(data) > 1:
        caption = "tau and speed-up against tree size, per drafter"
        section.figures.append(("trees", tree_figure(data), caption))
    return section
