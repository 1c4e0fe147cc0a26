"""`python -m lab.bench.overhead`: what profiling off costs, as a ratio with its spread."""

from __future__ import annotations

import argparse
import time
from contextlib import nullcontext

import numpy as np
import torch

from lab import models
from lab.engine.sampling import SamplingParams
from lab.method import Method, generate_one
from lab.pipeline.profiling import profiled


def overhead(repetitions: int = 30, max_new_tokens: int = 32) -> dict[str, float]:
    """Wall time of one generation inside profiled(None) over the same generation bare."""
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
    """Time profiled(None) against no wrapper on a tiny random model, in interleaved pairs."""
    parser = argparse.ArgumentParser(prog="python -m lab.bench.overhead", description=main.__doc__)
    parser.add_argument("--repetitions", type=int, default=30, help="interleaved pairs")
    parser.add_argument("--max-new-tokens", type=int, default=32)
    args = parser.parse_args(argv)
    if args.repetitions <= 0 or args.max_new_tokens <= 0:
        parser.error("--repetitions and --max-new-tokens must be positive integers")
    torch.set_num_threads(1)  # tiny model: a second thread only adds hand-off noise
    r = overhead(args.repetitions, args.max_new_tokens)
    print(
        f"profiled(None) / no wrapper, wall time per generation ({r['pairs']} interleaved pairs, "
        f"{args.max_new_tokens} new tokens, bare median {r['bare_ms_median']:.1f} ms): "
        f"ratio median {r['ratio_median']:.4f}, IQR [{r['ratio_q1']:.4f}, {r['ratio_q3']:.4f}]"
    )


if __name__ == "__main__":
    main()
