"""One linear of the 1.5B's shapes, per rows M: MKL (nn.Linear), oneDNN prepacked
(lab.engine.prepack) and the packed kernel, each as ms and over MKL's 1-row time, best of 7 rounds
of 20 calls.

usage: python experiments/kernels/layers.py [--threads 2]
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from kernel import build, has_avx512

SHAPES = [(8960, 1536), (1536, 8960), (1536, 1536), (151936, 1536)]  # gate/up, down, q/o, lm head


def best_ms(f: Callable[[], object], reps: int) -> float:
    for _ in range(2):
        f()
    times = []
    for _ in range(7):
        start = time.perf_counter()
        for _ in range(reps):
            f()
        times.append((time.perf_counter() - start) / reps * 1000)
    return min(times)


def main() -> None:
    threads = int(sys.argv[sys.argv.index("--threads") + 1]) if "--threads" in sys.argv else 2
    torch.set_num_threads(threads)
    vec = 16 if has_avx512() else 8
    ext = build(vec)
    torch.manual_seed(0)
    for n, k in SHAPES:
        w = torch.randn(n, k)
        dnnl = torch.ops.mkldnn._reorder_linear_weight(w, 8)
        packed = ext.pack(w, vec * 2)
        reps = 20 if n < 100_000 else 3
        for m in (1, 2, 5, 9):
            x = torch.randn(m, k)
            kernel = partial(ext.linear, x, packed, 2, 2048, 0)
            assert torch.allclose(kernel(), F.linear(x, w), rtol=1e-4, atol=1e-3)
            onednn = partial(torch.ops.mkldnn._linear_pointwise, x, dnnl, None, "none", [], "")
            row = {"n": n, "k": k, "rows": m,
                   "mkl_1row_ms": best_ms(partial(F.linear, x[:1], w), reps),
                   "mkl_ms": best_ms(partial(F.linear, x, w), reps),
                   "onednn_ms": best_ms(onednn, reps),
                   "kernel_ms": best_ms(kernel, reps)}  # fmt: skip
            for key in ("mkl", "onednn", "kernel"):
                row[f"{key}_over_mkl_1row"] = row[f"{key}_ms"] / row["mkl_1row_ms"]
            print(json.dumps({key: round(v, 3) for key, v in row.items()}), flush=True)


if __name__ == "__main__":
    main()
