"""Variants timed side by side in one process: every prompt runs every variant, in a fresh
random order per prompt, after one untimed warm-up of each (experiments/kernels/ab.py and
experiments/int8/speculative.py)."""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

from lab.engine.records import PromptResult


def interleaved(
    run: Callable[[str, list[int]], PromptResult], variants: Sequence[str],
    prompts: Sequence[list[int]], seed: int = 0,
) -> dict[str, list[PromptResult]]:  # fmt: skip
    """Per variant, its result on every prompt (prompt order); prints one line per prompt."""
    for variant in variants:  # every arm meets its shapes before anything is timed
        run(variant, prompts[0])
    rng = random.Random(seed)
    results: dict[str, list[PromptResult]] = {v: [] for v in variants}
    for i, ids in enumerate(prompts):
        order = list(variants)
        rng.shuffle(order)
        for variant in order:
            results[variant].append(run(variant, ids))
        line = ", ".join(f"{v} {results[v][-1].total_ms / 1000:.1f} s" for v in variants)
        print(f"prompt {i} ({len(ids)} tokens): {line}", flush=True)
    return results
