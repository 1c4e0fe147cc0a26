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
"""

from __future__ import annotations

import torch
from torch import nn

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

    qweight: torch.Tensor  # (out, in) int8
    scales: torch.Tensor  # (out,) bf16, the kernel's dtype

    def __init__(self, linear: nn.Linear) -> None:
        nn.Module.__init__(self)  # nn.Linear's own __init__ would allocate a second weight
        self.in_features, self.out_features = linear.in_features, linear.out_features
        self.weight, self.bias = linear.weight, linear.bias
        q, scales = quantize_weight(linear.weight)
        self.register_buffer("qweight", q, persistent=False)
        self.register_buffer("scales", scales.to(torch.bfloat16), persistent=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.numel() // self.in_features
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


def quantize(model: nn.Module) -> int:
    """Replace every plain nn.Linear of a CPU model in place; the number replaced."""
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
        setattr(parent, name, Int8Linear(child))
    return len(targets)


def is_quantized(model: nn.Module) -> bool:
    """Whether any linear of the model runs in int8."""
    return any(isinstance(m, Int8Linear) for m in model.modules())
