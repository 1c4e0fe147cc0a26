"""The trained heads' records (experiments/heads*/<kind>/): torch-free, like the report."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

# Folders of trained heads, by the run that wrote them: the default pipeline's heads stage and
# the optional pipelines/heads (lab.pipeline.heads_stages.SCALE).
RUNS = {"default": "heads", "scale": "heads_scale"}
CURVE = "curve.csv"  # lab.pipeline.heads_stages.CURVE
ACCURACY = re.compile(r"^top(\d+)_head(\d+)$")  # lab.drafting.training's held-out metric names
CURVE_COLUMNS = ("run", "kind", "step", "epoch", "tokens", "head", "k", "accuracy")
SUMMARY_KEYS = ("train_tokens", "train_seconds", "steps", "heldout_loss")
DATA_KEYS = ("generated_tokens", "corpus_tokens", "corpus_label_agreement")


@dataclass
class HeadRecords:
    """Held-out accuracy against tokens seen (long), and one summary row per trained head."""

    curve: pd.DataFrame = field(default_factory=lambda: pd.DataFrame(columns=CURVE_COLUMNS))
    summary: pd.DataFrame = field(default_factory=pd.DataFrame)

    @property
    def empty(self) -> bool:
        return self.summary.empty


def _long(curve: pd.DataFrame, run: str, kind: str) -> pd.DataFrame:
    """curve.csv's top{k}_head{i} columns as rows (head, k, accuracy)."""
    rows = []
    for column in curve.columns:
        if match := ACCURACY.match(column):
            part = curve[["step", "epoch", "tokens"]].copy()
            part["k"], part["head"] = int(match[1]), int(match[2])
            part["accuracy"] = curve[column]
            rows.append(part)
    frame = pd.concat(rows, ignore_index=True)
    frame["run"], frame["kind"] = run, kind
    return frame[list(CURVE_COLUMNS)]


def head_records(experiments: Path) -> HeadRecords:
    """Every trained head's curve.csv, metrics.json and config.json's data summary."""
    curves, rows = [], []
    for run, folder in RUNS.items():
        for path in sorted((experiments / folder).glob(f"*/{CURVE}")):
            kind = path.parent.name
            curves.append(_long(pd.read_csv(path), run, kind))
            metrics = json.loads((path.parent / "metrics.json").read_text())
            data = json.loads((path.parent / "config.json").read_text()).get("data", {})
            rows.append({"run": run, "kind": kind, **{k: data.get(k) for k in DATA_KEYS},
                         **{k: metrics.get(k) for k in SUMMARY_KEYS},
                         **{k: v for k, v in metrics.items() if "top" in k}})  # fmt: skip
    if not rows:
        return HeadRecords()
    return HeadRecords(pd.concat(curves, ignore_index=True), pd.DataFrame(rows))
