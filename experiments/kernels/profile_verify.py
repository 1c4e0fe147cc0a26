"""Where a 5-token forward's extra time goes (against a 1-token one): torch.profiler's CPU time
per op, 1.5B fp32 on the dynamic engine with lab's prepacked linears (the default on CPU fp32).

usage: python experiments/kernels/profile_verify.py [MODEL] [--rounds 4]
"""

from __future__ import annotations

import json
import sys
from collections import defaultdict

import torch
from torch.profiler import ProfilerActivity, profile

from lab import models
from lab.bench.engine import token_ids
from lab.engine import prepack
from lab.engine.caches import DynamicEngine


def op_ms(engine: DynamicEngine, prompt: list[int], n: int, rounds: int) -> dict[str, float]:
    """Self CPU ms per op name for one forward of n tokens (mean over rounds), after a warm-up."""
    fed = torch.tensor([token_ids(engine.lm, n, 1)])
    engine.start(prompt)
    engine.forward(fed, n)
    engine.rollback(len(prompt))
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(rounds):
            engine.forward(fed, n)
            engine.rollback(len(prompt))
    out: dict[str, float] = defaultdict(float)
    for event in prof.key_averages():
        out[event.key] += event.self_cpu_time_total / 1000 / rounds
    return out


def main() -> None:
    args = [a for a in sys.argv[1:] if not a.startswith("--")]
    name = args[0] if args else "qwen2.5-coder-1.5b-instruct"
    rounds = int(sys.argv[sys.argv.index("--rounds") + 1]) if "--rounds" in sys.argv else 4
    torch.set_num_threads(2)
    lm = models.load(name, device="cpu", dtype="float32")
    prepack.prepack(lm.model)
    engine = DynamicEngine(lm)
    prompt = token_ids(lm, 128, 0)
    one, five = op_ms(engine, prompt, 1, rounds), op_ms(engine, prompt, 5, rounds)
    # The linears: MKL (addmm / mm) below 4 rows, oneDNN's packed matmul from 4 rows.
    linear = ("aten::addmm", "aten::mm", "mkldnn::_linear_pointwise")
    for sizes in (one, five):
        sizes["linears (addmm + mm + mkldnn)"] = sum(sizes.pop(k, 0.0) for k in linear)
    rows = sorted(set(one) | set(five), key=lambda k: -(five.get(k, 0) - one.get(k, 0)))
    table = [{"op": k, "ms_1": round(one.get(k, 0), 1), "ms_5": round(five.get(k, 0), 1),
              "extra_ms": round(five.get(k, 0) - one.get(k, 0), 1)} for k in rows[:12]]  # fmt: skip
    print(
        json.dumps(
            {
                "model": name,
                "total_ms_1": round(sum(one.values()), 1),
                "total_ms_5": round(sum(five.values()), 1),
                "top": table,
            },
            indent=1,
        )
    )


if __name__ == "__main__":
    main()
