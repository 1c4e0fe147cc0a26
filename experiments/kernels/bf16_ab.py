"""Decode steps of the 1.5B on lab's kernel, fp32 against bf16, timed alternately in one process
(8 rounds of 8 steps, order flipped each round). 2026-12-07, 2-core AMD EPYC with AVX512-BF16:
median step fp32 211 ms, bf16 116 ms. Run: python experiments/kernels/bf16_ab.py
"""

from steps import alternating_step_ms, medians

from lab import models
from lab.engine import caches, prepack

ids = list(range(1000, 1128))
engines = {}
for dt in ("float32", "bfloat16"):
    lm = models.load("qwen2.5-coder-1.5b-instruct", device="cpu", dtype=dt)
    prepack.prepack(lm.model, *prepack.plan())
    engines[dt] = caches.DynamicEngine(lm)
times = alternating_step_ms(engines, ids, rounds=8)
print("median step ms", medians(times), {dt: [round(t) for t in ts] for dt, ts in times.items()})
print(
    "fp32/bf16 step ratio per round",
    [round(a / b, 2) for a, b in zip(times["float32"], times["bfloat16"], strict=True)],
)
