"""A small-M fp32 linear of our own for CPUs where neither MKL nor oneDNN streams the weights for
a few rows (smallm.cpp; built for this machine on first use with torch's cpp_extension).

Measured on a 2-core AMD EPYC (AVX2), the Qwen2.5-Coder 1.5B, whole-model forwards of n tokens
against n = 1 (interleaved rounds): with oneDNN's packed weights on every linear a decode step took
281-304 ms and 5 tokens 1.27-1.41x that; with this kernel 217-240 ms and 1.00-1.04x. MKL's
small-M path was slower still there (lab.engine.prepack). On an Intel Xeon (AVX-512) an earlier
version saved only 2-3% of a 5-token step over oneDNN (experiments/kernels/README.md), so Intel
CPUs keep MKL + oneDNN (prepack.use_kernel).
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
    flags = ["-O3", "-mavx2", "-mfma", "-fopenmp"]  # OpenMP: at::parallel_for's thread pool
    return load("lab_smallm", [str(SOURCE)], extra_cflags=flags, extra_ldflags=["-fopenmp"])


def applies(linear: torch.nn.Linear) -> bool:
    """Whether a linear's weight can be packed: float32 on the CPU, channels a multiple of 16."""
    w = linear.weight
    return w.device.type == "cpu" and w.dtype == torch.float32 and w.shape[0] % BLOCK == 0


def pack(weight: torch.Tensor) -> torch.Tensor:
    """The (N, K) weight as (N / 16, K, 16) blocks: the kernel's layout (a copy)."""
    return extension().pack(weight.detach().contiguous())


def linear(x: torch.Tensor, packed: torch.Tensor) -> torch.Tensor:
    """x @ W^T for x of up to MAX_ROWS rows (any leading shape), W given as pack(W)."""
    return extension().linear(x, packed)
