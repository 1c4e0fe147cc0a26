"""torch.profiler over decode loops: a Chrome trace, the top operators, per-step breakdowns."""

from __future__ import annotations

import argparse
import json
import time
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pandas as pd
import torch
from torch.profiler import ProfilerActivity, profile

from lab.engine.records import PromptResult, StepRecord
from lab.engine.sampling import SamplingParams
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


def overhead(repetitions: int = 30, max_new_tokens: int = 32) -> dict[str, float]:
    """Wall time of one generation inside profiled(None) over the same generation bare."""
    from lab import models
    from lab.method import Method, generate_one  # method imports this module: import when used

    target = models.load("tiny-random-qwen2", device="cpu")
    draft = models.load("tiny-random-qwen2-draft", device="cpu")
    method = Method("draft_model", "exact", 4)
    ids = target.tokenizer.encode("def fibonacci(n):\n    if n < 2:\n        return n\n")

    def once(wrapped: bool) -> float:
        start = time.perf_counter()
        with profiled(None, target.device) if wrapped else nullcontext():
            generate_one(method, target, draft, ids, max_new_tokens, SamplingParams(), 0)
        return time.perf_counter() - start

    once(False)  # warm-up: first calls pay one-off allocation costs
    ratios, bare = [], []
    for rep in range(repetitions):
        # Interleaved pairs, order alternating, so drift and contention hit both sides alike.
        first = rep % 2 == 0
        a, b = once(first), once(not first)
        wrapped, plain = (a, b) if first else (b, a)
        ratios.append(wrapped / plain)
        bare.append(plain)
    q1, median, q3 = np.percentile(ratios, [25, 50, 75])
    return {"ratio_median": float(median), "ratio_q1": float(q1), "ratio_q3": float(q3),
            "pairs": repetitions, "bare_ms_median": 1000.0 * float(np.median(bare))}  # fmt: skip


def main(argv: list[str] | None = None) -> None:
    """`python -m lab.pipeline.profiling --overhead`: the cost of profiling off, as a ratio with spread."""
    parser = argparse.ArgumentParser(
        prog="python -m lab.pipeline.profiling", description=main.__doc__
    )
    what = "time profiled(None) against no wrapper on a tiny random model"
    parser.add_argument("--overhead", action="store_true", required=True, help=what)
    parser.add_argument("--repetitions", type=int, default=30, help="interleaved pairs")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    torch.set_num_threads(1)  # tiny model: a second thread only adds hand-off noise
    r = overhead(args.repetitions, args.max_new_tokens)
    print(
        f"profiled(None) / no wrapper, wall time per generation ({r['pairs']} interleaved pairs, "
        f"{args.max_new_tokens} new tokens, bare median {r['bare_ms_median']:.1f} ms): "
        f"ratio median {r['ratio_median']:.4f}, IQR [{r['ratio_q1']:.4f}, {r['ratio_q3']:.4f}]"
    )


if __name__ == "__main__":
    main()
