"""A small-M fp32 linear of our own for CPUs where neither MKL nor oneDNN streams the weights for
a few rows (smallm.cpp; built for this machine on first use with torch's cpp_extension). It also
runs bf16 models: bf16 weights (half the bytes) widened to fp32 in registers, fp32 accumulation.

Measured on a 2-core AMD EPYC (AVX2), the Qwen2.5-Coder 1.5B, whole-model forwards of n tokens
against n = 1 (interleaved rounds): with oneDNN's packed weights on every linear a decode step took
281-304 ms and 5 tokens 1.27-1.41x that; with this kernel 217-240 ms and 1.00-1.04x. MKL's
small-M path was slower still there (lab.engine.prepack). On an Intel Xeon (AVX-512) an earlier
version saved only 2-3% of a 5-token step over oneDNN (experiments/kernels/README.md), so Intel
CPUs keep MKL + oneDNN (prepack.use_kernel).

bf16, on a 2-core AMD EPYC with AVX512-BF16 (2026-12-07; experiments/engine/amd-epyc-avx512-bf16/,
one lab bench-engine run): the 1.5B decodes at 4.40 tok/s on torch's own bf16 linears and 8.23 on
this kernel's pair path, a 5-token verify costs 0.98 / 1.07 decode steps, c 0.38 / 0.36. Decode
steps timed alternately in one process: bf16 on the kernel 116 ms, fp32 on the kernel 211 ms.
The AVX2 bf16 path (widen, then FMA) cost 1.3-1.6 decode steps for 5 tokens: compute-bound once
the weights are half the bytes, hence vdpbf16ps where the CPU has it.
"""

from __future__ import annotations

import functools
import os
import sys
from pathlib import Path
from types import ModuleType

import torch

from lab import machine

MAX_ROWS = 32  # longer steps (prefill) take the float weight: a GEMM there is compute-bound
BLOCK = 16  # output channels per packed block (smallm.cpp's R)
SOURCE = Path(__file__).with_name("smallm.cpp")


def cpu_supports(flags: frozenset[str]) -> bool:
    """Whether a CPU with these flags (lab.machine.cpu_flags) has the AVX2 and FMA instructions
    the kernel is compiled for."""
    return {"avx2", "fma"} <= flags


@functools.cache
def extension() -> ModuleType:
    """The kernel, compiled for this machine (cached by torch under ~/.cache/torch_extensions)."""
    if not cpu_supports(machine.cpu_flags()):
        raise RuntimeError("the small-M kernel needs a CPU with AVX2 and FMA")
    from torch.utils.cpp_extension import load

    # cpp_extension runs `ninja` from PATH; pip installs it next to this interpreter.
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = bin_dir + os.pathsep + os.environ.get("PATH", "")
    wide = bf16_flags(machine.cpu_flags())
    flags = ["-O3", "-mavx2", "-mfma", "-fopenmp", *wide]  # OpenMP: at::parallel_for's pool
    name = "lab_smallm_bf16" if wide else "lab_smallm"  # differs by build: torch caches by name
    return load(name, [str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"])


def bf16_flags(flags: frozenset[str]) -> list[str]:
    """Compiler flags for the bf16 dot-product path (smallm.cpp), where the CPU has it."""
    return ["-mavx512f", "-mavx512bf16"] if {"avx512f", "avx512_bf16"} <= flags else []


DTYPES = (torch.float32, torch.bfloat16)  # the weights the kernel reads (smallm.cpp)


def applies(linear: torch.nn.Linear) -> bool:
    """Whether a linear's weight can be packed: float32 or bfloat16 on the CPU, channels a
    multiple of 16."""
    w = linear.weight
    return w.device.type == "cpu" and w.dtype in DTYPES and w.shape[0] % BLOCK == 0


def pack(weight: torch.Tensor) -> torch.Tensor:
    """The (N, K) weight as (N / 16, K, 16) blocks: the kernel's layout (a copy)."""
    return extension().pack(weight.detach().contiguous())


def linear_int8(x: torch.Tensor, packed: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x @ (q * scales)^T in x's dtype for x of up to MAX_ROWS rows, q given as pack(q) (int8)
    and scales (out,) float32: fp32 accumulation, then the per-channel scale, then one rounding."""
    return (extension().linear(x, packed) * scales).to(x.dtype)


def linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x @ W^T for x of up to MAX_ROWS rows (any leading shape), W given as pack(W) in x's dtype."""
    return extension().linear(x, packed)
