"""GPU: where one compiled decode step's time goes (lab's StaticEngine, CUDA graph replay).

usage: python profile_step.py MODEL MAX_LEN OUT.json [--no-fuse] [--autotune] [--attn NAME]

Builds the compiled engine with step size 1 (MAX_LEN as lab bench-engine's, so inductor's cache
from an earlier run in the same machine is reused), then times 200 replays of a one-token step
(wall) and profiles 50 of them (CUPTI: kernel device time, grouped by kind of kernel).
--autotune: inductor's max-autotune GEMM search (Triton against cuBLAS per shape) and coordinate
descent tuning of its own kernels, set before the step compiles (gpt-fast's settings).
--attn NAME: the attention kernel, one of lab.bench.engine.ATTENTIONS (default sdpa).
"""

from __future__ import annotations

import json
import sys
import time
from collections import defaultdict

import torch

from lab.bench.engine import set_attention
from lab.bench.roofline import weight_bytes_per_token
from lab.engine.caches import StaticEngine
from lab.engine.fuse import is_fused
from lab.models import random as random_models

# Substrings of kernel names, in the order they are tried: the first match names the kind.
KINDS = (
    ("attention", ("cudnn", "flash", "fmha", "sdpa", "attention")),
    ("matmul", ("gemv", "gemm", "nvjet", "xmma", "cutlass", "cublas", "splitk", "sm90")),
    ("triton", ("triton",)),
    ("copy", ("memcpy", "memset", "copy")),
)


def kind(name: str) -> str:
    lower = name.lower()
    return next((k for k, keys in KINDS if any(s in lower for s in keys)), "other")


def main() -> None:
    name, max_len, out = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    fuse = "--no-fuse" not in sys.argv
    autotune = "--autotune" in sys.argv
    attn = sys.argv[sys.argv.index("--attn") + 1] if "--attn" in sys.argv else "sdpa"
    if autotune:
        from torch._inductor import config as inductor

        inductor.max_autotune = True
        inductor.coordinate_descent_tuning = True
    lm = random_models.load(name, "cuda", "bfloat16")
    set_attention(lm, attn)
    engine = StaticEngine(lm, max_len, compile=True, sizes=(1,), fuse=fuse)
    prompt = list(range(1000, 1128))  # 128 tokens: lab bench-engine's cache length
    engine.warmup(prompt)
    engine.start(prompt)
    fed = torch.tensor([[7]], device="cuda")

    def step() -> None:
        engine.forward(fed, 1)
        engine.rollback(len(prompt))

    for _ in range(20):
        step()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(200):
        step()
    torch.cuda.synchronize()
    wall_ms = (time.perf_counter() - start) / 200 * 1000
    steps = 50
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for _ in range(steps):
            step()
        torch.cuda.synchronize()
    kernels: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for event in prof.key_averages():
        us = getattr(event, "device_time_total", None) or getattr(event, "cuda_time_total", 0)
        if us and event.device_type == torch.autograd.DeviceType.CUDA:
            kernels[event.key][0] += us / steps
            kernels[event.key][1] += event.count / steps
    by_kind: dict[str, list[float]] = defaultdict(lambda: [0.0, 0])
    for key, (us, count) in kernels.items():
        by_kind[kind(key)][0] += us
        by_kind[kind(key)][1] += count
    gpu_ms = sum(us for us, _ in kernels.values()) / 1000
    weight_bytes = weight_bytes_per_token(lm.model)
    top = sorted(kernels.items(), key=lambda kv: -kv[1][0])[:25]
    result = {
        "model": name, "fused": is_fused(lm.model), "max_len": max_len, "autotune": autotune,
        "attention": attn,
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "step_wall_ms": wall_ms, "step_gpu_ms": gpu_ms,
        "kernels_per_step": sum(c for _, c in kernels.values()),
        "weight_bytes_per_token": weight_bytes,
        "weights_tb_per_s_at_gpu_time": weight_bytes / gpu_ms / 1e9,
        "by_kind": {k: {"us": us, "kernels": c} for k, (us, c) in by_kind.items()},
        "top_kernels": [{"name": k[:160], "us": us, "per_step": c} for k, (us, c) in top],
    }  # fmt: skip
    with open(out, "w") as f:
        json.dump(result, f, indent=1)
    print(json.dumps({k: v for k, v in result.items() if k != "top_kernels"}))


if __name__ == "__main__":
    main()
