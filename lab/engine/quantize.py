"""CPU int8 weight-only linears: a decode step reads a quarter of the fp32 weight bytes.

Decode on these CPUs is bound by reading the weights (experiments/engine), so fewer bytes per
weight is the lever left where the CPU has no bf16 matrix units. Each nn.Linear gets an int8 copy
of its weight with one scale per output channel (symmetric: scale = max |w| / 127), and steps of up
to MAX_ROWS rows run torch's `_weight_int8pack_mm` (gpt-fast's CPU kernel). That kernel takes bf16
activations: its fp32 path was 3-6x slower than fp32 MKL on an AMD EPYC (AVX2) and an Intel Xeon
(AVX-512), its bf16 path 1.7-3x faster (one row, 2 cores). Its cost grows with the rows (8960x1536
on the EPYC: 1 row 1.0 ms, 16 rows 5.7, 64 rows 25 against fp32's 18), so longer steps (prefill)
keep using the original float weight, as prepacked linears keep it for short ones: the model holds
both, 1.25x its fp32 weight memory. Quantizing changes the model's outputs (measure perplexity
beside speed); the model's dtype and every other op stay as they were.

Where linears run lab's small-M kernel (prepack.plan().kernel), the int8 copy runs on it instead
(kernel=True: same int8 weights and scales, fp32 accumulation, up to smallm.MAX_ROWS rows): on an
AMD EPYC with AVX512-BF16, torch's int8 kernel on bf16 activations had made the 0.5B draft slower
(c 0.50) than lab's bf16 kernel did (c 0.38).
"""

from __future__ import annotations

import torch
from torch import nn

from lab.engine import smallm
from lab.engine.prepack import is_prepacked, plain_children

# Up to this many rows the int8 kernel beats the float matmul (see the module doc).
MAX_ROWS = 16


def quantize_weight(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(out, in) float weight -> (out, in) int8 and (out,) float32 scales, w ~ q * scale."""
    scales = weight.detach().float().abs().amax(dim=1).clamp(min=1e-12) / 127.0  # (out,)
    q = torch.round(weight.detach().float() / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q, scales


class Int8Linear(nn.Linear):
    """An nn.Linear (same float weight, kept for long steps) that multiplies up to MAX_ROWS rows
    with its int8 copy; a subclass, so code that looks for the LM head's nn.Linear finds it."""

    qweight: torch.Tensor  # (out, in) int8; with kernel, in lab's kernel's layout (smallm.pack)
    scales: torch.Tensor  # (out,) bf16, torch's kernel's dtype; float32 with kernel

    def __init__(self, linear: nn.Linear, kernel: bool = False) -> None:
        nn.Module.__init__(self)  # nn.Linear's own __init__ would allocate a second weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        self.kernel = kernel and smallm.applies(linear)  # other shapes: torch's int8 kernel
        q, scales = quantize_weight(linear.weight)
        if self.kernel:
            q = smallm.pack(q)
        self.register_buffer("qweight", q, persistent=False)
        scale_dtype = torch.float32 if self.kernel else torch.bfloat16
        self.register_buffer("scales", scales.to(scale_dtype), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
        if self.kernel and rows <= smallm.MAX_ROWS:
            y = smallm.linear_int8(x, self.qweight, self.scales)
            return y if self.bias is None else y + self.bias
        if rows > MAX_ROWS:
            return nn.functional.linear(x, self.weight, self.bias)
        flat = x.reshape(rows, self.in_features).to(torch.bfloat16)  # (rows, in)
        out = torch._weight_int8pack_mm(flat, self.qweight, self.scales).to(x.dtype)  # (rows, out)
        if self.bias is not None:
            out = out + self.bias
        return out.reshape(*x.shape[:-1], self.out_features)


def applies(device: torch.device, dtype: torch.dtype) -> bool:
    """Whether int8 linears apply: a CPU model in float32 or bfloat16."""
    return device.type == "cpu" and dtype in (torch.float32, torch.bfloat16)


def quantize(model: nn.Module, kernel: bool = False) -> int:
    """Replace every plain nn.Linear of a CPU model in place, on lab's kernel where kernel is set
    (prepack.plan().kernel gives it for this CPU); the number replaced."""
    weight = next(model.parameters())
    if not applies(weight.device, weight.dtype):
        raise ValueError(f"int8 linears need a float32 or bfloat16 model on the CPU, not "
                         f"{weight.dtype} on {weight.device}")  # fmt: skip
    if is_quantized(model):
        raise ValueError("the model's linears are int8 already")
    if is_prepacked(model):
        raise ValueError("the model's linears are prepacked: quantize instead, not both")
    targets = plain_children(model, nn.Linear)
    for parent, name, child in targets:
        setattr(parent, name, Int8Linear(child, kernel))
    return len(targets)


def runs_kernel(model: nn.Module) -> bool:
    """Whether any int8 linear of the model runs on lab's small-M kernel."""
    return any(isinstance(m, Int8Linear) and m.kernel for m in model.modules())


def is_quantized(model: nn.Module) -> bool:
    """Whether any linear of the model runs in int8."""
    return any(isinstance(m, Int8Linear) for m in model.modules())
