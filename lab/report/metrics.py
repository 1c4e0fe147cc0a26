"""The headline metrics file, the one DVC metric: what `dvc exp show` and `dvc metrics show` list.

Per-item metrics.json files stay on disk as DVC outs (the report and MLflow read them); this file
holds the few numbers a researcher compares across experiments, nested by configuration so that
DVC's flattened column names say which configuration each number belongs to (`k4.speedup`).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pandas as pd

from lab.pipeline import store
from lab.report.load import (
    OPTIONAL_STAGES,
    Results,
    is_baseline,
    is_lossy,
    load_results,
    read_csv,
)

# Written by the report stage, declared under `metrics:` in dvc.yaml (the only metrics file).
HEADLINE = Path("metrics.json")
# Issue 12's bound on `dvc exp show`'s metric columns ("about 40"); the default pipeline's 8
# configurations give 41 (tests/test_metrics_view.py checks the bound on the smoke run). The full
# grid (README) gives more: a wider table for a deliberate, larger experiment.
MAX_COLUMNS = 42
# One row per configuration, in report order (the baseline first).
CONFIG_COLUMNS = ("name", "stage", "item", "baseline", "lossy", "speedup", "ci_low",
                  "ci_high", "acceptance", "tau", "tok_s", "ppl", "identical", "numerics",
                  "violation")  # fmt: skip
VERDICTS = ("identical", "numerics", "violation")  # lab.pipeline.lossless.VERDICTS


def _name(stage: str, item: str, taken: set[str]) -> str:
    """The configuration's key: the item's name (stage_item where two stages share it)."""
    if stage == "baseline":
        return "baseline"
    return item if item not in taken else f"{stage}_{item}"


def _verdicts(path: Path) -> dict[str, float]:
    """Counts of lossless.csv verdicts; NaN each where no check ran (lossy or sampled runs)."""
    check = read_csv(path / store.LOSSLESS, store.LOSSLESS_COLUMNS)
    if check is None or check.empty:  # write_item leaves a header-only file where none ran
        return dict.fromkeys(VERDICTS, math.nan)
    return {v: float((check["verdict"] == v).sum()) for v in VERDICTS}


def _mean_ppl(results: Results) -> dict[tuple[str, str], float]:
    """Mean output perplexity per (stage, item), as the perplexity stage's own summary takes it."""
    outputs = results.outputs_ppl
    if outputs is None:
        return {}
    means = outputs.groupby(["stage", "item"])["perplexity"].mean()
    return {key: float(v) for key, v in means.items()}


def _number(value: Any) -> float:
    """A metrics.json value as a float; NaN where the metric does not apply (null) or is absent."""
    return math.nan if value is None else float(value)


def configurations(results: Results) -> pd.DataFrame:
    """One row per configuration of the default pipeline that ran its own generations (reused
    copies appear once; optional pipelines' sweeps stay in the report, off `dvc exp show`)."""
    ppl = _mean_ppl(results)
    rows: list[dict[str, Any]] = []
    taken: set[str] = set()
    for item in results.runs:
        stage, name, m = item.path.parent.name, item.path.name, item.metrics
        if stage in OPTIONAL_STAGES:
            continue
        key = _name(stage, name, taken)
        taken.add(key)
        rows.append({
            "name": key, "stage": stage, "item": name, "baseline": is_baseline(item),
            "lossy": not is_baseline(item) and is_lossy(item),
            "speedup": _number(m.get("speedup")), "ci_low": _number(m.get("speedup_ci_low")),
            "ci_high": _number(m.get("speedup_ci_high")),
            "acceptance": _number(m.get("acceptance_rate")),
            "tau": _number(m.get("mean_accepted_length")), "tok_s": _number(m.get("tokens_per_s")),
            "ppl": ppl.get((stage, name), math.nan), **_verdicts(item.path),
        })  # fmt: skip
    return pd.DataFrame(rows, columns=list(CONFIG_COLUMNS))


def _measured(entry: dict[str, Any], key: str, value: float) -> None:
    """Set entry[key] only when measured: DVC shows a missing key as '-', a null as a load error."""
    if not math.isnan(value):
        entry[key] = value


def interval(low: float, high: float) -> str:
    """The 95% interval as one cell: '[0.656, 1.011]'."""
    # One string column, not two numbers: a speed-up, its interval, acceptance, tau and tokens/s
    # for every configuration fit the column budget. DVC keeps string metrics but drops lists;
    # each item's metrics.json keeps the exact bounds.
    return f"[{low:.3f}, {high:.3f}]"


def _entry(row: pd.Series) -> dict[str, Any]:
    """One configuration's headline numbers."""
    entry: dict[str, Any] = {}
    _measured(entry, "speedup", row["speedup"])
    if not (math.isnan(row["ci_low"]) or math.isnan(row["ci_high"])):
        entry["ci"] = interval(row["ci_low"], row["ci_high"])
    if row["baseline"]:
        # The A/A speed-up and interval are the noise floor; tokens/s and perplexity the reference.
        _measured(entry, "tok_s", row["tok_s"])
        _measured(entry, "ppl", row["ppl"])
        return entry
    _measured(entry, "acceptance", row["acceptance"])
    _measured(entry, "tau", row["tau"])
    _measured(entry, "tok_s", row["tok_s"])
    if row["lossy"]:  # a lossless configuration's output is the baseline's: so is its perplexity
        _measured(entry, "ppl", row["ppl"])
    return entry


def headline(frame: pd.DataFrame) -> dict[str, Any]:
    """The headline file's content: {configuration: {metric: value}}, no nulls, report order."""
    out: dict[str, Any] = {}
    for _, row in frame.iterrows():
        entry = _entry(row)
        if entry:
            out[row["name"]] = entry
    checked = frame.dropna(subset=["identical"])
    if len(checked):
        # Prompts of lossless configurations whose output differs from the baseline's within the
        # dtype's rounding; a violation fails its stage, so none reaches this file.
        out["lossless"] = {"numerics": int(checked["numerics"].sum())}
    return out


def columns(content: dict[str, Any]) -> list[str]:
    """The column names `dvc exp show` makes of the file: nested keys joined with '.'."""
    return list(pd.json_normalize(content, sep=".").columns)


def write(content: dict[str, Any], path: Path = HEADLINE) -> None:
    """Write the headline file (allow_nan=False: a NaN here would be a bug, never a value)."""
    path.write_text(json.dumps(content, indent=2, allow_nan=False) + "\n")


def main(experiments: Path = Path("experiments"), path: Path = HEADLINE) -> None:
    """Stage body: experiments/ -> the headline metrics file."""
    content = headline(configurations(load_results(experiments)))
    write(content, path)
    print(f"report: {path} with {len(columns(content))} headline metrics")
