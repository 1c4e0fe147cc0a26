"""CPU fp32 verification near the cost of a decode step: oneDNN's prepacked weights from 4 rows.

Measured on a 2-core Xeon (AVX-512, no AMX) with the 1.5B's 8960x1536 MLP weight: MKL's matmul
(what nn.Linear calls) streams the weights at the bandwidth limit for 1-3 rows, but from 4 rows
on it switches to a blocked GEMM that repacks the weights on every call and takes 2-3.4x as
long, so a 5-token verification cost 1.8-2.0x a decode step. oneDNN's matmul on weights
reordered once into its blocked layout costs about the same for 4..16 rows (1.3-1.6x a 1-row
MKL matmul) but is slower than MKL for 1-3 rows, so each linear keeps both: the original weight
for 1-3 rows (decode unchanged) and the packed copy for verification steps. Whole 1.5B model
(lab bench-engine, interleaved): a 5-token forward 1.81x -> 1.33x a decode step, 9 tokens
2.71x -> 1.57x. The copy doubles the weight memory of the model it is applied to.

MKL is Intel's library, and off Intel CPUs its small-M path is slow: on an AMD EPYC (AVX2, 2
threads, 8960x1536) MKL took 2.9 / 6.0 / 8.9 ms for 1 / 2 / 3 rows where oneDNN's packed weights
took 2.2 / 2.0 / 2.1, and the 1.5B's baseline decoded about 1.45x faster with every step on
oneDNN. So min_rows(vendor) is MIN_ROWS on Intel and 1 elsewhere.
"""

from __future__ import annotations

from typing import TypeVar

import torch
from torch import nn

# Below this many rows MKL's matrix-vector path is the faster one on Intel (see the module doc).
MIN_ROWS = 4


def min_rows(vendor: str | None) -> int:
    """Rows from which linears take the packed weights on a CPU of this vendor_id (the caller
    reads it: lab.machine.cpu_vendor); unknown vendors get Intel's threshold."""
    return 1 if vendor is not None and vendor != "GenuineIntel" else MIN_ROWS


class PrepackedLinear(nn.Linear):
    """An nn.Linear (same weight, MKL's path below min_rows rows) that multiplies min_rows or
    more rows with oneDNN's packed copy; a subclass, so code that looks for the LM head's
    nn.Linear finds it."""

    packed: torch.Tensor  # the weight in oneDNN's blocked layout

    def __init__(self, linear: nn.Linear, min_rows: int = MIN_ROWS) -> None:
        nn.Module.__init__(self)  # nn.Linear's own __init__ would allocate a second weight
        self.min_rows = min_rows
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.register_buffer(
            "packed", torch.ops.mkldnn._reorder_linear_weight(linear.weight.detach(), 8),
            persistent=False,
        )  # fmt: skip

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() // self.in_features < self.min_rows:
            return nn.functional.linear(x, self.weight, self.bias)
        return packed_linear(x, self.packed, self.bias)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T (+ bias) with oneDNN on W's packed copy (torch.ops.mkldnn._reorder_linear_weight)."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def applies(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether prepacking applies: a CPU float32 model and a torch built with oneDNN."""
    return device.type == "cpu" and dtype == torch.float32 and torch.backends.mkldnn.is_available()


def prepack(model: nn.Module, min_rows: int = MIN_ROWS) -> int:
    """Replace every nn.Linear of a CPU fp32 model in place, packed from min_rows rows on; the
    number replaced."""
    weight = next(model.parameters())
    if not applies(weight.device, weight.dtype):
        raise ValueError("prepacked linears need a float32 model on the CPU and oneDNN (mkldnn)")
    if is_prepacked(model):
        raise ValueError("the model's linears are prepacked already")
    targets = plain_children(model, nn.Linear)
    for parent, name, child in targets:
        setattr(parent, name, PrepackedLinear(child, min_rows))
    return len(targets)


def unpack(model: nn.Module) -> int:
    """Undo prepack in place (the weights were shared, never copied); the number restored."""
    targets = plain_children(model, PrepackedLinear)
    for parent, name, child in targets:
        linear = nn.Linear(child.in_features, child.out_features, bias=child.bias is not None,
                           device="meta")  # fmt: skip
        linear.weight, linear.bias = child.weight, child.bias
        setattr(parent, name, linear)
    return len(targets)


def is_prepacked(model: nn.Module) -> bool:
    """Whether any linear of the model runs prepacked."""
    return any(isinstance(m, PrepackedLinear) for m in model.modules())


_M = TypeVar("_M", bound=nn.Module)


def plain_children(model: nn.Module, kind: type[_M]) -> list[tuple[nn.Module, str, _M]]:
    """(parent, attribute, child) for every submodule of exactly type kind (not subclasses)."""
    return [(parent, name, child) for parent in model.modules()
            for name, child in parent.named_children()
            if isinstance(child, kind) and type(child) is kind]  # fmt: skip
