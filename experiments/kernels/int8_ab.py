"""The 0.5B draft's decode step with int8 linears on torch's kernel, int8 on lab's kernel, and the
plain model on lab's kernel, timed alternately (6 rounds of 8 steps) in bf16 and fp32. 2026-12-07,
2-core AMD EPYC with AVX512-BF16, median ms: bf16 50.2 / 32.7 / 47.0, fp32 51.6 / 25.9 / 62.9.
Run: python experiments/kernels/int8_ab.py
"""

import statistics
import time

import torch

from lab import models
from lab.engine import caches, prepack, quantize

ids = list(range(1000, 1128))
tok = torch.tensor([[ids[-1]]])
name = "qwen2.5-coder-0.5b-instruct"
for dt in ("bfloat16", "float32"):
    engines = {}
    for variant in ("torch-int8", "kernel-int8", "kernel-plain"):
        lm = models.load(name, device="cpu", dtype=dt)
        if variant == "kernel-plain":
            prepack.prepack(lm.model, *prepack.plan())
        else:
            quantize.quantize(lm.model, kernel=variant == "kernel-int8")
        engines[variant] = caches.DynamicEngine(lm)
    times = {v: [] for v in engines}
    for r in range(6):
        order = list(engines) if r % 2 == 0 else list(reversed(engines))
        for v in order:
            eng = engines[v]
            eng.start(ids)
            eng.forward(tok, 1)
            t = time.perf_counter()
            for _ in range(8):
                eng.forward(tok, 1)
            times[v].append((time.perf_counter() - t) / 8 * 1e3)
    print(dt, {v: round(statistics.median(ts), 1) for v, ts in times.items()})
    del engines
