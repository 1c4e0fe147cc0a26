"""Fused q/k/v and gate/up projections compute what the separate ones compute, token for token."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch
from torch import nn

from lab import models
from lab.bench.roofline import weight_bytes_per_token
from lab.drafting.draft_model import DraftModel
from lab.engine import caches, fuse, loop
from lab.engine.controllers import FixedK
from lab.engine.loop import Speculation
from lab.engine.model import LoadedModel
from lab.engine.policies import get_policy

N = 40
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device: torch.cuda.is_available() is False"
)


def fused_copy(lm: LoadedModel) -> LoadedModel:
    """A fused deep copy: the session's fixtures stay unfused for every other test."""
    model = copy.deepcopy(lm.model)
    assert fuse.fuse(model) == 2 * model.config.num_hidden_layers  # attention + MLP per layer
    return replace(lm, model=model)


def _hf_greedy(lm: LoadedModel, prompt_ids: list[int]) -> list[int]:
    inputs = torch.tensor([prompt_ids], device=lm.device)
    out = lm.model.generate(  # type: ignore[operator]
        inputs, attention_mask=torch.ones_like(inputs), do_sample=False, max_new_tokens=N,
        eos_token_id=None, pad_token_id=0,
    )  # fmt: skip
    return [int(t) for t in out[0, len(prompt_ids) :]]


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_fused_logits_equal_unfused(request, name, prompt_ids):
    lm = request.getfixturevalue(name)
    fused = fused_copy(lm)
    ids = torch.tensor([prompt_ids])  # (1, T)
    with torch.inference_mode():
        expected = lm.model(input_ids=ids).logits
        got = fused.model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    attention = fused.model.model.layers[0].self_attn
    assert not hasattr(attention, "q_proj") and hasattr(attention, "qkv_proj")
    if name == "qwen2":  # Qwen2's q/k/v have biases: the fused Linear keeps them
        assert attention.qkv_proj.bias is not None
    # The same weights, read once: the bandwidth limit does not move.
    assert weight_bytes_per_token(fused.model) == weight_bytes_per_token(lm.model)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_fused_greedy_is_token_identical(request, name, prompt_ids):
    lm = request.getfixturevalue(name)
    fused = fused_copy(lm)
    base = loop.generate(lm, prompt_ids, N).token_ids
    assert loop.generate(fused, prompt_ids, N).token_ids == base
    assert _hf_greedy(fused, prompt_ids) == _hf_greedy(lm, prompt_ids)
    static = caches.StaticEngine(fused, caches.cache_length([prompt_ids], N, 4), sizes=(1, 5))
    assert static.fused
    assert loop.generate(static, prompt_ids, N).token_ids == base
    out = loop.generate(
        static, prompt_ids, N,
        speculation=Speculation(DraftModel(fused_copy(lm)), get_policy("exact"), FixedK(4)),
    )  # fmt: skip
    assert out.token_ids == base and out.acceptance_rate == 1.0


def test_fuse_is_idempotent_and_leaves_unknown_modules(qwen2):
    fused = fused_copy(qwen2)
    assert fuse.fuse(fused.model) == 0 and fuse.is_fused(fused.model)
    other = nn.Sequential(nn.Linear(4, 4), nn.ReLU())
    assert fuse.fuse(other) == 0 and not fuse.is_fused(other)
    assert not fuse.is_fused(qwen2.model)


def test_wrapped_projections_are_refused(qwen2):
    model = copy.deepcopy(qwen2.model)
    model.model.layers[0].self_attn.k_proj = nn.Sequential(model.model.layers[0].self_attn.k_proj)
    with pytest.raises(ValueError, match=r"cannot fuse q_proj, k_proj, v_proj \(Linear, Seq"):
        fuse.fuse(model)


def test_concat_linear_refuses_mixed_biases():
    with pytest.raises(ValueError, match="only some have a bias"):
        fuse.concat_linear([nn.Linear(4, 2), nn.Linear(4, 2, bias=False)])


def test_engines_fuse_on_request_and_by_device(qwen2, prompt_ids):
    lm = replace(qwen2, model=copy.deepcopy(qwen2.model))
    max_len = caches.cache_length([prompt_ids], N, 4)
    assert not caches.make_engine(lm, "static", max_len).fused  # CPU default: unfused
    assert not isinstance(caches.make_engine(lm, "dynamic"), caches.StaticEngine)
    assert caches.make_engine(lm, "static", max_len, fuse=True).fused
    assert fuse.is_fused(lm.model)  # in place: the model itself now runs fused
    assert fuse.default_fuse(torch.device("cuda")) and not fuse.default_fuse(torch.device("cpu"))


@pytest.mark.slow
def test_fused_compiled_on_cpu_equals_baseline(llama, prompt_ids):
    # Inductor's C++ kernels: slow to build, so one size per K.
    base = loop.generate(llama, prompt_ids, N).token_ids
    engine = caches.StaticEngine(
        fused_copy(llama), caches.cache_length([prompt_ids], N, 2), compile=True, sizes=(1, 3)
    )
    engine.warmup(prompt_ids)
    assert loop.generate(engine, prompt_ids, N).token_ids == base


@pytest.mark.cuda
@needs_cuda
def test_fused_cuda_graphs_equal_unfused_baseline(prompt_ids):
    # fp32 without TF32: the fused and separate GEMMs agree far inside the logit margins.
    torch.set_float32_matmul_precision("highest")
    lm = models.load("tiny-random-qwen2", device="cuda", dtype="float32")
    base = loop.generate(lm, prompt_ids, N).token_ids
    fused = fused_copy(lm)
    engine = caches.StaticEngine(
        fused, caches.cache_length([prompt_ids], N, 4), compile=True, sizes=(1, 5)
    )
    engine.warmup(prompt_ids)
    assert engine.fused and loop.generate(engine, prompt_ids, N).token_ids == base
    out = loop.generate(
        engine, prompt_ids, N,
        speculation=Speculation(DraftModel(fused), get_policy("exact"), FixedK(4)),
    )  # fmt: skip
    assert out.token_ids == base and out.acceptance_rate == 1.0
