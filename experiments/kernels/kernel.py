"""Build the packed small-M fp32 linear (smallm.cpp) for this CPU, and an nn.Linear that uses it.

An experiment, not part of lab/: see README.md here for what it measures and what integrating it
into lab.engine.prepack would take. Built once per machine with torch's C++ extension loader
(g++ -O3 -march=native: AVX-512 where the CPU has it, else AVX2; ninja), cached under
~/.cache/torch_extensions.
"""

from __future__ import annotations

from pathlib import Path
from types import ModuleType

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.cpp_extension import load

HERE = Path(__file__).resolve().parent
MIN_ROWS, MAX_ROWS = 4, 9  # MKL's matrix-vector path below 4 rows; prefill-sized steps stay MKL's


def has_avx512() -> bool:
    return "avx512f" in Path("/proc/cpuinfo").read_text()


def build(vec: int | None = None) -> ModuleType:
    """The extension with `vec` float lanes per vector (16: AVX-512, 8: AVX2; None: this CPU's)."""
    vec = vec or (16 if has_avx512() else 8)
    flags = ["-O3", "-march=native", "-fopenmp", f"-DVEC={vec}"]
    if vec == 8:
        flags.append("-mprefer-vector-width=256")
    return load(f"smallm{vec}", [str(HERE / "smallm.cpp")], extra_cflags=flags,
                extra_ldflags=["-fopenmp"])  # fmt: skip


class KernelLinear(nn.Linear):
    """nn.Linear (shared weight) whose 4-9 row steps run the packed kernel on a packed copy."""

    def __init__(self, linear: nn.Linear, ext: ModuleType, vec: int, v: int = 2,
                 prefetch: int = 2048) -> None:  # fmt: skip
        nn.Module.__init__(self)
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.ext, self.v, self.prefetch = ext, v, prefetch
        rows = vec * v
        packed = ext.pack(linear.weight.detach(), rows) if self.out_features % rows == 0 else None
        self.register_buffer("packed", packed, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if self.packed is None or not MIN_ROWS <= rows <= MAX_ROWS:
            return F.linear(x, self.weight, self.bias)
        y = self.ext.linear(x, self.packed, self.v, self.prefetch, 0)
        return y if self.bias is None else y + self.bias


def wrap(model: nn.Module, ext: ModuleType, vec: int) -> int:
    """Replace every plain nn.Linear in place; how many."""
    targets = [(p, n, c) for p in model.modules() for n, c in p.named_children()
               if type(c) is nn.Linear]  # fmt: skip
    for parent, name, child in targets:
        setattr(parent, name, KernelLinear(child, ext, vec))
    return len(targets)


def unwrap(model: nn.Module) -> None:
    """Undo wrap (the weights were shared)."""
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if isinstance(child, KernelLinear):
                linear = nn.Linear(child.in_features, child.out_features,
                                   bias=child.bias is not None, device="meta")  # fmt: skip
                linear.weight, linear.bias = child.weight, child.bias
                setattr(parent, name, linear)
