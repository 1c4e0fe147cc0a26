"""torch.profiler over decode loops: a Chrome trace, the top operators, per-step breakdowns."""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict
from pathlib import Path

import pandas as pd
import torch
from torch.profiler import ProfilerActivity, profile

from lab.engine.records import PromptResult, StepRecord
from lab.stats import phases, step_breakdown

TRACE = "trace.json"
TOP_OPS = "top_ops.csv"
BREAKDOWN = "step_breakdown.csv"


@contextmanager
def profiled(out_dir: Path | None, device: torch.device, top: int = 30) -> Iterator[None]:
    """Profile the body into out_dir (trace + top ops); None profiles nothing, at no cost."""
    if out_dir is None:
        yield
        return
    activities = [ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(ProfilerActivity.CUDA)
    with profile(activities=activities, profile_memory=True) as prof:
        yield
    out_dir.mkdir(parents=True, exist_ok=True)
    prof.export_chrome_trace(str(out_dir / TRACE))
    top_ops(prof, top).to_csv(out_dir / TOP_OPS, index=False)


def top_ops(prof: profile, top: int) -> pd.DataFrame:
    """The operators that took the most self time (CPU, and CUDA when profiled)."""
    rows = [
        {
            "op": e.key,
            "calls": e.count,
            "self_cpu_ms": e.self_cpu_time_total / 1000.0,
            "cpu_total_ms": e.cpu_time_total / 1000.0,
            "self_device_ms": getattr(e, "self_device_time_total", 0.0) / 1000.0,
        }
        for e in prof.key_averages()
    ]
    frame = pd.DataFrame(rows)
    sort = "self_device_ms" if frame["self_device_ms"].sum() > 0 else "self_cpu_ms"
    return frame.sort_values(sort, ascending=False).head(top).reset_index(drop=True)


def write_breakdown(out_dir: Path, steps: pd.DataFrame, **extra: float) -> Path:
    """Per-step phase times (step_breakdown.csv) and their means plus extra (breakdown.json)."""
    out_dir.mkdir(parents=True, exist_ok=True)
    keys = [c for c in ("question_id", "repetition", "step") if c in steps]
    pd.concat([steps[keys], phases(steps)], axis=1).to_csv(out_dir / BREAKDOWN, index=False)
    path = out_dir / "breakdown.json"
    summary = step_breakdown(steps) if len(steps) else {}
    path.write_text(json.dumps({**extra, **summary}, indent=2) + "\n")
    return path


def result_steps(result: PromptResult) -> pd.DataFrame:
    """One generation's step records as a frame (one row per step)."""
    columns = list(StepRecord.__dataclass_fields__)
    return pd.DataFrame([asdict(s) for s in result.steps], columns=columns)
