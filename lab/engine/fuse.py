"""Fused projections: each decoder layer's q/k/v as one Linear, and gate/up as one.

At batch 1 every projection is a GEMV whose cost on a GPU is mostly its launch and ramp-up, not
its bytes: on an H200 with the Qwen2.5-1.5B shape the k/v GEMVs stream at 0.16 TB/s, gate/up at
2.8. One GEMV over the concatenated weights reads the same bytes in fewer, larger kernels (the
197 weight GEMVs of one token took 1.65 ms separate and 1.29 ms fused; shared/GPU.md). The
math is unchanged: each output element is the same dot product, so fp32 logits agree to
rounding and greedy outputs match.

`fuse(model)` rewrites the model in place: the q/k/v (gate/up) Linears are replaced by one
`qkv_proj` (`gate_up_proj`) whose weight (and bias, Qwen2's q/k/v have biases) is their
concatenation, and the module's class by a subclass whose forward runs the fused matmul and
splits its output. Only the architectures whose forward the subclasses mirror are fused (the
attention and MLP of transformers 5.24's Llama and Qwen2); other modules stay as they are.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

# Attention and MLP classes whose transformers forward the fused ones below reproduce.
ATTENTION = ("LlamaAttention", "Qwen2Attention")
MLP = ("LlamaMLP", "Qwen2MLP")
_FUSED_ATTENTION = "qkv_proj"
_FUSED_MLP = "gate_up_proj"


def concat_linear(parts: list[nn.Linear]) -> nn.Linear:
    """One Linear computing every part's output, concatenated along the last dim."""
    weight = torch.cat([p.weight for p in parts], dim=0)  # (sum of outs, in)
    biased = [p.bias is not None for p in parts]
    if any(biased) and not all(biased):
        raise ValueError("cannot fuse projections of which only some have a bias")
    fused = nn.Linear(weight.shape[1], weight.shape[0], bias=all(biased),
                      device=weight.device, dtype=weight.dtype)  # fmt: skip
    with torch.no_grad():
        fused.weight.copy_(weight)
        if fused.bias is not None:
            fused.bias.copy_(torch.cat([p.bias for p in parts if p.bias is not None]))
    fused.requires_grad_(parts[0].weight.requires_grad)
    return fused


def _attention_forward(
    self: Any,
    hidden_states: torch.Tensor,
    position_embeddings: tuple[torch.Tensor, torch.Tensor],
    attention_mask: torch.Tensor | None = None,
    cache: Any = None,
    **kwargs: Any,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """LlamaAttention / Qwen2Attention.forward of transformers 5.24 with one q/k/v matmul."""
    modeling = self._fused_modeling
    input_shape = hidden_states.shape[:-1]
    hidden_shape = (*input_shape, -1, self.head_dim)
    query, key, value = self.qkv_proj(hidden_states).split(self.qkv_sizes, dim=-1)
    query_states = query.view(hidden_shape).transpose(1, 2)
    key_states = key.view(hidden_shape).transpose(1, 2)
    value_states = value.view(hidden_shape).transpose(1, 2)
    cos, sin = position_embeddings
    query_states, key_states = modeling.apply_rotary_pos_emb(query_states, key_states, cos, sin)
    if cache is not None:
        key_states, value_states = cache.update(
            key_states, value_states, self.layer_idx, kwargs=kwargs
        )
    interface: Callable[..., tuple[torch.Tensor, torch.Tensor | None]] = (
        modeling.ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, modeling.eager_attention_forward
        )
    )
    if hasattr(self, "sliding_window"):  # Qwen2 passes it; Llama has none
        kwargs["sliding_window"] = self.sliding_window
    attn_output, attn_weights = interface(
        self, query_states, key_states, value_states, attention_mask,
        dropout=0.0 if not self.training else self.attention_dropout, scaling=self.scaling,
        **kwargs,
    )  # fmt: skip
    attn_output = attn_output.reshape(*input_shape, -1).contiguous()
    return self.o_proj(attn_output), attn_weights


def _mlp_forward(self: Any, x: torch.Tensor) -> torch.Tensor:
    """LlamaMLP / Qwen2MLP.forward with one gate/up matmul."""
    gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
    return self.down_proj(self.act_fn(gate) * up)


_SUBCLASSES: dict[type, type] = {}


def _fused_class(cls: type, forward: Callable[..., Any]) -> type:
    """The (cached) subclass of cls whose forward is the fused one."""
    if cls not in _SUBCLASSES:
        _SUBCLASSES[cls] = type(f"Fused{cls.__name__}", (cls,), {
            "forward": forward, "_fused_modeling": sys.modules[cls.__module__],
        })  # fmt: skip
    return _SUBCLASSES[cls]


def _linears(module: nn.Module, names: tuple[str, ...]) -> list[nn.Linear]:
    parts = [getattr(module, name) for name in names]
    if not all(isinstance(p, nn.Linear) for p in parts):
        kinds = ", ".join(type(p).__name__ for p in parts)
        raise ValueError(
            f"{type(module).__name__}: cannot fuse {', '.join(names)} ({kinds}): they must be "
            "plain nn.Linear; fuse before wrapping them (e.g. lab.engine.prepack)"
        )
    return parts


def _fuse_attention(module: nn.Module) -> None:
    parts = _linears(module, ("q_proj", "k_proj", "v_proj"))
    vars(module)["qkv_sizes"] = [p.out_features for p in parts]  # a plain attribute
    module.qkv_proj = concat_linear(parts)
    del module.q_proj, module.k_proj, module.v_proj  # the old weights are freed, not read twice
    module.__class__ = _fused_class(type(module), _attention_forward)


def _fuse_mlp(module: nn.Module) -> None:
    module.gate_up_proj = concat_linear(_linears(module, ("gate_proj", "up_proj")))
    del module.gate_proj, module.up_proj
    module.__class__ = _fused_class(type(module), _mlp_forward)


def fuse(model: nn.Module) -> int:
    """Fuse every supported attention's q/k/v and MLP's gate/up in place; modules fused.

    Idempotent: an already fused module is left alone. 0 means the architecture is not one
    this module knows (nothing changed).
    """
    count = 0
    for module in list(model.modules()):
        name = type(module).__name__
        if name in ATTENTION:
            _fuse_attention(module)
            count += 1
        elif name in MLP:
            _fuse_mlp(module)
            count += 1
    return count


def is_fused(model: nn.Module) -> bool:
    """Whether any module of the model runs fused projections."""
    return any(hasattr(m, _FUSED_ATTENTION) or hasattr(m, _FUSED_MLP) for m in model.modules())


def default_fuse(device: torch.device) -> bool:
    """Whether engines fuse by default on this device: on CUDA, where the GEMVs' launches are
    what costs (measured there); the CPU's default waits for a CPU measurement."""
    return device.type == "cuda"
