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
oneDNN. So min_rows(vendor) is MIN_ROWS on Intel and 1 elsewhere. There oneDNN itself still cost
1.3-1.4x a decode step for 5 rows, and lab's own kernel (lab.engine.smallm) about 1.0x, at a
faster decode step too: off Intel, with AVX2 and FMA, the packed copy is the kernel's
(use_kernel) for 1..smallm.MAX_ROWS rows. Longer steps (prefill) take oneDNN on the plain weight:
past 32 rows the kernel's passes over each block make it compute-bound, and there oneDNN was
1.15x faster than it at 48 rows and 1.19x faster than MKL over six prompts' prefills (76-191
tokens, whole 1.5B on the EPYC). plan() is the choice for the CPU at hand.

bf16 models (the default dtype on CPUs with AMX or AVX512-BF16) are packed only for lab's kernel,
which reads bf16 weights (lab.engine.smallm); longer steps keep torch's bf16 linear.
"""

from __future__ import annotations

from typing import NamedTuple, TypeVar

import torch
from torch import nn

from lab import machine
from lab.engine import smallm

# Below this many rows MKL's matrix-vector path is the faster one on Intel (see the module doc).
MIN_ROWS = 4


def min_rows(vendor: str | None) -> int:
    """Rows from which linears take the packed weights on a CPU of this vendor_id (the caller
    reads it: lab.machine.cpu_vendor); unknown vendors get Intel's threshold."""
    return 1 if vendor is not None and vendor != "GenuineIntel" else MIN_ROWS


def use_kernel(vendor: str | None, flags: frozenset[str]) -> bool:
    """Whether packed linears run lab's small-M kernel (lab.engine.smallm) rather than oneDNN
    on a CPU of this vendor_id and these flags: off Intel, with AVX2 and FMA (module doc)."""
    return vendor is not None and vendor != "GenuineIntel" and smallm.cpu_supports(flags)


class Plan(NamedTuple):
    """How prepack packs a model's linears: from how many rows, and whether for lab's kernel."""

    min_rows: int
    kernel: bool


def plan() -> Plan:
    """The packing for the CPU this process runs on (lab.machine reads it)."""
    vendor = machine.cpu_vendor()
    return Plan(min_rows(vendor), use_kernel(vendor, machine.cpu_flags()))


class PrepackedLinear(nn.Linear):
    """An nn.Linear (same weight, MKL's path below min_rows rows) that multiplies min_rows or
    more rows with a packed copy: oneDNN's, or with kernel=True lab's small-M kernel's (up to
    smallm.MAX_ROWS rows; longer steps take oneDNN on the plain weight). A subclass, so code
    that looks for the LM head's nn.Linear finds it."""

    packed: torch.Tensor  # the weight in oneDNN's blocked layout, or in the kernel's

    def __init__(self, linear: nn.Linear, min_rows: int = MIN_ROWS, kernel: bool = False) -> None:
        nn.Module.__init__(self)  # nn.Linear's own __init__ would allocate a second weight
        self.min_rows = min_rows
        self.kernel = kernel and smallm.applies(linear)  # other shapes keep oneDNN
        if not self.kernel and linear.weight.dtype != torch.float32:
            raise ValueError(f"only lab's kernel packs {linear.weight.dtype} weights, with kernel "
                             f"set and a multiple of 16 output channels (this one has "
                             f"{linear.out_features})")  # fmt: skip
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        weight = linear.weight.detach()
        packed = smallm.pack(weight) if self.kernel else reorder(weight)
        self.register_buffer("packed", packed, persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if rows < self.min_rows:
            return nn.functional.linear(x, self.weight, self.bias)
        if not self.kernel:
            return packed_linear(x, self.packed, self.bias)
        if rows > smallm.MAX_ROWS:  # oneDNN reorders the plain weight itself (module doc)
            if self.weight.dtype != torch.float32:
                return nn.functional.linear(x, self.weight, self.bias)
            return packed_linear(x, self.weight, self.bias)
        y = smallm.linear(x, self.packed)
        return y if self.bias is None else y + self.bias


def reorder(weight: torch.Tensor) -> torch.Tensor:
    """The weight in oneDNN's blocked layout (for a batch of 8 rows; any count runs on it)."""
    return torch.ops.mkldnn._reorder_linear_weight(weight, 8)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """x @ W^T (+ bias) with oneDNN on W's packed copy (torch.ops.mkldnn._reorder_linear_weight)
    or on W itself."""
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


def applies(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether prepacking applies: a CPU float32 model and a torch built with oneDNN, or a CPU
    bfloat16 model where linears run lab's kernel (plan)."""
    if device.type != "cpu":
        return False
    if dtype == torch.bfloat16:
        return plan().kernel
    return dtype == torch.float32 and torch.backends.mkldnn.is_available()


def prepack(model: nn.Module, min_rows: int = MIN_ROWS, kernel: bool = False) -> int:
    """Replace every nn.Linear of a CPU fp32 model in place, packed from min_rows rows on (for
    lab's kernel where kernel is set; plan() gives both for this CPU); the number replaced."""
    weight = next(model.parameters())
    if not applies(weight.device, weight.dtype) or (weight.dtype != torch.float32 and not kernel):
        raise ValueError(
            "prepacked linears need a float32 model on the CPU and oneDNN (mkldnn), "
            "or a bfloat16 one on lab's kernel (AVX2 + FMA, off Intel)"
        )
    if is_prepacked(model):
        raise ValueError("the model's linears are prepacked already")
    targets = plain_children(model, nn.Linear)
    if weight.dtype != torch.float32:  # no oneDNN copy for the shapes the kernel cannot take
        targets = [t for t in targets if smallm.applies(t[2])]
    for parent, name, child in targets:
        setattr(parent, name, PrepackedLinear(child, min_rows, kernel))
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


def runs_kernel(model: nn.Module) -> bool:
    """Whether any linear of the model runs lab's small-M kernel (lab.engine.smallm)."""
    return any(isinstance(m, PrepackedLinear) and m.kernel for m in model.modules())


def is_prepacked(model: nn.Module) -> bool:
    """Whether any linear of the model runs prepacked."""
    return any(isinstance(m, PrepackedLinear) for m in model.modules())


_M = TypeVar("_M", bound=nn.Module)


def plain_children(model: nn.Module, kind: type[_M]) -> list[tuple[nn.Module, str, _M]]:
    """(parent, attribute, child) for every submodule of exactly type kind (not subclasses)."""
    return [(parent, name, child) for parent in model.modules()
            for name, child in parent.named_children()
            if isinstance(child, kind) and type(child) is kind]  # fmt: skip
