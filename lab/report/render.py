"""Rendering reports/ (report.md, tables, figures, dvc plots data) from experiments/ alone."""

from __future__ import annotations

import shutil
from pathlib import Path

from lab.report.load import ReportSettings, Results, load_results
from lab.report.plots import plot_data
from lab.report.sections import (
    Section,
    breakdown_section,
    gpu_section,
    http_section,
    latency_section,
    lossless_section,
    perplexity_section,
    position_section,
)
from lab.report.sections_engine import engine_section
from lab.report.sections_heads import heads_section
from lab.report.sections_methods import methods_section
from lab.report.sections_speed import (
    baseline_section,
    categories_section,
    controllers_section,
    drafters_section,
    ksweep_section,
    policies_section,
    predicted_section,
    protocol_section,
)
from lab.report.sections_trees import tree_items, trees_section
from lab.report.summary import summary_section
from lab.report.tables import markdown, write_table


def sections(results: Results, settings: ReportSettings) -> list[Section]:
    """Every section, in report order."""
    return [
        summary_section(results, settings),  # the result first, generated from the data
        methods_section(results, settings),
        baseline_section(results),
        protocol_section(results),
        ksweep_section(results, settings),
        policies_section(results, settings),
        drafters_section(results, settings),
        # Tree sizes, where a drafter proposed trees (the default run's, or pipelines/trees').
        *([trees_section(results, settings)] if tree_items(results) else []),
        # What the Medusa and EAGLE heads learned from, where the heads stage ran.
        *([heads_section(results)] if not results.heads.empty else []),
        controllers_section(results, settings),
        predicted_section(results, settings),
        categories_section(results, settings),
        lossless_section(results),
        perplexity_section(results),
        latency_section(results),
        breakdown_section(results),
        position_section(results),
        gpu_section(results),
        engine_section(results),
        # pipelines/http is optional: its section appears once it has run.
        *([http_section(results)] if not results.http.empty else []),
    ]


def _clear(reports: Path) -> None:
    """Remove what an earlier render wrote, so a stage that vanished leaves no stale table."""
    for folder in ("tables", "figures", "plots"):
        shutil.rmtree(reports / folder, ignore_errors=True)
    (reports / "report.md").unlink(missing_ok=True)


def _write_section(section: Section, reports: Path, written: list[Path]) -> list[str]:
    """Write a section's tables and figures; return its markdown."""
    lines = [f"## {section.title}", "", *(f"{t}\n" for t in section.text)]
    for table in section.tables:
        written += write_table(table, reports / "tables")
        lines += [
            f"**{table.caption}** (`tables/{table.name}.csv`)",
            "",
            markdown(table.shown),
            "",
        ]
    for name, fig, caption in section.figures:
        path = reports / "figures" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        written.append(path)
        lines += [f"![{caption}](figures/{name}.png)", ""]
    return lines


def render(experiments: Path, reports: Path, settings: ReportSettings) -> list[Path]:
    """Regenerate reports/ (report.md, tables, figures, plot data) from experiments/."""
    results = load_results(experiments)  # everything is read and checked before anything goes
    built = sections(results, settings)
    plots = plot_data(results, settings)
    _clear(reports)
    reports.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    lines = ["# Speculative decoding benchmark", ""]
    for section in built:
        lines += _write_section(section, reports, written)
    (reports / "plots").mkdir(parents=True, exist_ok=True)
    for name, frame in plots.items():
        frame.to_csv(reports / "plots" / f"{name}.csv", index=False)
        written.append(reports / "plots" / f"{name}.csv")
    (reports / "report.md").write_text("\n".join(lines).rstrip() + "\n")
    written.append(reports / "report.md")
    return written


def main(settings: ReportSettings) -> None:
    """Stage body: experiments/ -> reports/ in the working directory."""
    written = render(Path("experiments"), Path("reports"), settings)
    print(f"report: wrote {len(written)} files under reports/")
