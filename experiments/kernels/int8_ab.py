"""The 0.5B draft's decode step with int8 linears on torch's kernel, int8 on lab's kernel, and the
plain model on lab's kernel, timed alternately (6 rounds of 8 steps) in bf16 and fp32. 2026-12-07,
2-core AMD EPYC with AVX512-BF16, median ms: bf16 50.2 / 32.7 / 47.0, fp32 51.6 / 25.9 / 62.9.
Run: python experiments/kernels/int8_ab.py
"""

from steps import alternating_step_ms, medians

from lab import models
from lab.engine import caches, prepack, quantize

ids = list(range(1000, 1128))
for dt in ("bfloat16", "float32"):
    engines = {}
    for variant in ("torch-int8", "kernel-int8", "kernel-plain"):
        lm = models.load("qwen2.5-coder-0.5b-instruct", device="cpu", dtype=dt)
        if variant == "kernel-plain":
            prepack.prepack(lm.model, *prepack.plan())
        else:
            quantize.quantize(lm.model, kernel=variant == "kernel-int8")
        engines[variant] = caches.DynamicEngine(lm)
    print(dt, medians(alternating_step_ms(engines, ids, rounds=6)))
    del engines
