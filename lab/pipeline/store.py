"""The files of one stage item, experiments/<stage>/<item>/: write atomically, read back, find."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd

from lab.engine.records import STEP_COLUMNS

# Files of one stage item, experiments/<stage>/<item>/:
CONFIG = "config.json"  # the resolved configuration (method, models, prompts, generation)
PROMPTS = "prompts.jsonl"  # one line per prompt and repetition: summary, tokens, text
STEPS = "steps.csv"  # one row per step: question_id, repetition and the StepRecord fields
METRICS = "metrics.json"  # summary metrics (a DVC out: the root metrics.json is the DVC metric)
LOSSLESS = "lossless.csv"  # per prompt, for lossless methods: identical to baseline or where not
# lossless.csv's columns (lab.pipeline.lossless writes them; verdict: identical, numerics or
# violation).
LOSSLESS_COLUMNS = ("question_id", "identical", "first_diff", "logit_margin", "fork_gap",
                    "tolerance", "verdict")  # fmt: skip
PROFILE = "profile"  # folder, only when profiled: trace.json, top_ops.csv, step_breakdown.csv


def _replace_dir(tmp: Path, final: Path) -> None:
    """Swap a fully written folder into place, so a killed stage never leaves half an output."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_item(
    out_dir: Path,
    config: dict[str, Any],
    rows: list[dict[str, Any]],
    metrics: dict[str, Any],
    lossless: pd.DataFrame | None = None,
    profile: Path | None = None,
) -> None:
    """Write one stage item's files (atomically, as a folder); profile is a folder moved in."""
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if profile is not None:
        os.replace(profile, tmp / PROFILE)
    (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    with open(tmp / PROMPTS, "w") as f:
        for row in rows:
            f.write(json.dumps({k: v for k, v in row.items() if k != "steps"}) + "\n")
    step_frame(rows).to_csv(tmp / STEPS, index=False)
    (tmp / METRICS).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    # Always written (empty when not applicable) so DVC can declare it for every item.
    if lossless is None:
        lossless = pd.DataFrame(columns=list(LOSSLESS_COLUMNS))
    lossless.to_csv(tmp / LOSSLESS, index=False)
    _replace_dir(tmp, out_dir)


def step_frame(rows: list[dict[str, Any]]) -> pd.DataFrame:
    """One row per step of every generation in rows (steps nested per row), in STEP_COLUMNS."""
    steps = [
        {"question_id": str(r["question_id"]), "repetition": r["repetition"], **s}
        for r in rows
        for s in r["steps"]
    ]
    return pd.DataFrame(steps, columns=list(STEP_COLUMNS))


@dataclass
class Item:
    """One stage item read back from disk."""

    path: Path
    config: dict[str, Any]
    rows: pd.DataFrame
    steps: pd.DataFrame
    metrics: dict[str, Any]


def read_item(path: Path) -> Item:
    """Read experiments/<stage>/<item>/ (raises FileNotFoundError naming the missing file)."""
    rows = pd.read_json(path / PROMPTS, lines=True)
    rows["question_id"] = rows["question_id"].astype(str)  # ids may be ints or strings
    return Item(
        path=path,
        config=json.loads((path / CONFIG).read_text()),
        rows=rows,
        steps=_steps(path / STEPS),
        metrics=json.loads((path / METRICS).read_text()),
    )


def _steps(path: Path) -> pd.DataFrame:
    """steps.csv; one written before token trees has no depth column, and its steps were all
    chains, whose depth is the number proposed: filled in, so those results stay readable."""
    steps = pd.read_csv(path, dtype={"question_id": str})
    if "depth" not in steps.columns and "proposed" in steps.columns:
        steps.insert(steps.columns.get_loc("proposed") + 1, "depth", steps["proposed"])
    return steps


def find_same(config: dict[str, Any], roots: list[Path]) -> Path | None:
    """An item under roots whose run-defining config equals this one (to reuse, not re-run)."""
    for root in roots:
        for candidate in sorted(root.glob(f"*/{CONFIG}")):
            if json.loads(candidate.read_text()).get("run") == config["run"]:
                return candidate.parent
    return None
