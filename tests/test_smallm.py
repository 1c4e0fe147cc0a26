"""lab's small-M kernel (lab.engine.smallm), fp32 and bf16, and prepacked linears that run it."""

from __future__ import annotations

import pandas as pd
import pytest
import torch
from torch import nn

from lab import machine, models
from lab.bench import engine as bench_engine
from lab.drafting.draft_model import DraftModel
from lab.engine import caches, loop, prepack, smallm
from lab.engine.controllers import FixedK
from lab.engine.loop import Speculation
from lab.engine.policies import get_policy
from lab.report.sections_engine import with_linears

pytestmark = pytest.mark.skipif(
    not smallm.cpu_supports(machine.cpu_flags()), reason="needs a CPU with AVX2 + FMA"
)

N = 40


@pytest.mark.parametrize("rows", [1, 2, 5, 6, 7, 13, 17, smallm.MAX_ROWS])
@pytest.mark.parametrize(("out", "inp"), [(16, 8), (256, 1536), (48, 40)])
def test_kernel_matches_a_float64_product(rows, out, inp):
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(out, inp, generator=gen)
    x = torch.randn(1, rows, inp, generator=gen)
    y = smallm.linear(x, smallm.pack(w))
    assert y.shape == (1, rows, out)
    reference = (x.double() @ w.double().T).float()
    # fp32 accumulation over inp terms: relative error a few 1e-7 (red with a row or k dropped)
    assert ((y - reference).abs().max() / reference.abs().max()).item() < 1e-5


@pytest.mark.parametrize("rows", [1, 5, 7, smallm.MAX_ROWS])
def test_bf16_kernel_is_the_rounded_product(rows):
    gen = torch.Generator().manual_seed(rows)
    w = torch.randn(256, 1536, generator=gen).bfloat16()
    x = torch.randn(2, rows, 1536, generator=gen).bfloat16()
    packed = smallm.pack(w)
    assert packed.dtype == torch.bfloat16 and packed.numel() == w.numel()  # half fp32's bytes
    y = smallm.linear(x, packed)
    assert y.dtype == torch.bfloat16 and y.shape == (2, rows, 256)
    reference = x.double() @ w.double().T
    # fp32 accumulation of K products (worst case gamma = K 2^-24 sum |x w|), then one rounding
    # to bf16 (unit roundoff 2^-8): the textbook bound per output. Measured: up to 0.6 of it on
    # the AVX512-BF16 path (red with a row or k dropped, or with no rounding bound for bf16).
    gamma = 1536 * 2**-24 * (x.double().abs() @ w.double().abs().T)
    bound = 2**-8 * (reference.abs() + gamma) + gamma
    assert ((y.double() - reference).abs() <= bound).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_each_row_is_the_same_whatever_the_rows_beside_it(dtype):
    # One FMA chain per output in k order for any M: a decode row and the same row inside a
    # verification step are bit-identical (what keeps greedy speculation exact on this path).
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(64, 96, generator=gen), torch.randn(smallm.MAX_ROWS, 96, generator=gen)
    w, x = w.to(dtype), x.to(dtype)
    packed = smallm.pack(w)
    full = smallm.linear(x, packed)
    for m in range(1, smallm.MAX_ROWS + 1):
        assert torch.equal(smallm.linear(x[:m], packed), full[:m]), m


def test_the_packed_layout_by_hand():
    w = torch.arange(32 * 3, dtype=torch.float32).view(32, 3)  # W[n][k] = 3n + k
    packed = smallm.pack(w)  # (N / 16, K, 16): packed[b][k][r] = W[16 b + r][k]
    assert packed.shape == (2, 3, 16)
    assert packed[1, 2, 5].item() == 3 * 21 + 2
    assert packed[0, 0].tolist() == [3.0 * r for r in range(16)]


def test_bad_shapes_are_refused():
    with pytest.raises(RuntimeError, match="multiple of 16"):
        smallm.pack(torch.ones(20, 8))
    with pytest.raises(RuntimeError, match="does not match"):
        smallm.linear(torch.ones(1, 9), smallm.pack(torch.ones(16, 8)))
    with pytest.raises(RuntimeError, match="float32, bfloat16 or int8 weight"):
        smallm.pack(torch.ones(16, 8, dtype=torch.float16))
    with pytest.raises(RuntimeError, match="both float32 or both bfloat16"):
        smallm.linear(torch.ones(1, 8), smallm.pack(torch.ones(16, 8, dtype=torch.bfloat16)))


def test_prepacked_linear_takes_the_kernel_where_it_applies():
    gen = torch.Generator().manual_seed(1)
    fits, odd = nn.Linear(24, 32), nn.Linear(24, 20)  # 20 channels: not a multiple of 16
    with torch.no_grad():
        for layer in (fits, odd):
            layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen))
    packed_fits, packed_odd = (
        prepack.PrepackedLinear(fits, 1, True),
        prepack.PrepackedLinear(odd, 1, True),
    )
    assert packed_fits.kernel and not packed_odd.kernel  # the odd one keeps oneDNN's copy
    few, many = (
        torch.randn(3, 24, generator=gen),
        torch.randn(smallm.MAX_ROWS + 1, 24, generator=gen),
    )
    assert ops(packed_fits, few) == set()  # up to MAX_ROWS: the kernel, no torch matmul
    torch.testing.assert_close(packed_fits(few), fits(few), rtol=1e-5, atol=1e-5)
    # Past MAX_ROWS (prefill): oneDNN on the plain weight (faster there than MKL, prepack doc).
    assert ops(packed_fits, many) == {"mkldnn::_linear_pointwise"}
    torch.testing.assert_close(packed_fits(many), fits(many), rtol=1e-5, atol=1e-5)
    assert ops(packed_odd, few) == {"mkldnn::_linear_pointwise"}
    torch.testing.assert_close(packed_odd(few), odd(few), rtol=1e-5, atol=1e-5)


def test_bf16_prepacked_linear_runs_the_kernel_up_to_max_rows():
    gen = torch.Generator().manual_seed(2)
    layer = nn.Linear(64, 48).to(torch.bfloat16)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=gen))
    packed = prepack.PrepackedLinear(layer, 1, True)
    assert packed.kernel and packed.packed.dtype == torch.bfloat16
    few = torch.randn(5, 64, generator=gen).bfloat16()
    many = torch.randn(smallm.MAX_ROWS + 1, 64, generator=gen).bfloat16()
    assert ops(packed, few) == set()
    torch.testing.assert_close(packed(few), layer(few), rtol=2e-2, atol=2e-2)  # bf16 rounding
    assert "aten::linear" in ops(packed, many)  # prefill: torch's own bf16 linear
    assert torch.equal(packed(many), layer(many))
    with pytest.raises(ValueError, match="only lab's kernel packs torch.bfloat16 weights, with"):
        prepack.PrepackedLinear(layer, 1, False)


def ops(layer: nn.Module, x: torch.Tensor) -> set[str]:
    """The matmul operators torch's profiler sees when layer runs on x."""
    with torch.profiler.profile() as prof:
        layer(x)
    matmuls = ("mkldnn::_linear_pointwise", "aten::linear", "aten::addmm", "aten::mm")
    return {e.name for e in prof.events()} & set(matmuls)


def test_use_kernel_follows_the_cpu_vendor_and_flags():
    avx2 = frozenset({"sse4_2", "avx", "avx2", "fma"})
    assert not prepack.use_kernel("GenuineIntel", avx2)  # MKL + oneDNN stay Intel's (prepack doc)
    assert not prepack.use_kernel(None, avx2)
    assert prepack.use_kernel("AuthenticAMD", avx2)
    assert not prepack.use_kernel("AuthenticAMD", avx2 - {"fma"})
    assert not prepack.use_kernel("AuthenticAMD", frozenset({"avx", "fma"}))
    here = prepack.plan()
    assert here == (prepack.min_rows(machine.cpu_vendor()),
                    prepack.use_kernel(machine.cpu_vendor(), machine.cpu_flags()))  # fmt: skip


def test_kernel_model_decodes_the_same_tokens(qwen2, qwen2_draft, prompt_ids):
    lm = models.load("tiny-random-qwen2", device="cpu", dtype="float32")
    prepack.prepack(lm.model, min_rows=1, kernel=True)
    assert prepack.runs_kernel(lm.model)
    kernels = sum(isinstance(m, prepack.PrepackedLinear) and m.kernel for m in lm.model.modules())
    assert kernels == sum(isinstance(m, nn.Linear) for m in lm.model.modules()) - 1  # LM head: 259
    engine = caches.DynamicEngine(lm)
    engine.start(prompt_ids)
    step = torch.tensor([prompt_ids[-5:]])
    reference = caches.DynamicEngine(qwen2)
    reference.start(prompt_ids)
    torch.testing.assert_close(engine.forward(step, 5)[0], reference.forward(step, 5)[0],
                               rtol=1e-4, atol=1e-4)  # fmt: skip
    expected = loop.generate(qwen2, prompt_ids, N).token_ids
    assert loop.generate(lm, prompt_ids, N).token_ids == expected
    for k in (1, 4, 8):
        spec = Speculation(DraftModel(qwen2_draft), get_policy("exact"), FixedK(k))
        assert loop.generate(lm, prompt_ids, N, speculation=spec).token_ids == expected


def test_bf16_kernel_model_speculates_to_its_own_baseline(qwen2_draft, prompt_ids):
    # bf16 greedy speculation on the kernel is token-identical to the same model's greedy
    # decode: its linears are batch-invariant (above), so verification rows equal decode rows.
    lm = models.load("tiny-random-qwen2", device="cpu", dtype="bfloat16")
    plain = models.load("tiny-random-qwen2", device="cpu", dtype="bfloat16")
    assert prepack.prepack(lm.model, min_rows=1, kernel=True) == 14  # all but the 259-row head
    assert prepack.runs_kernel(lm.model)
    step = torch.tensor([prompt_ids[-5:]])
    ours, theirs = (caches.DynamicEngine(m) for m in (lm, plain))
    for engine in (ours, theirs):
        engine.start(prompt_ids)
    torch.testing.assert_close(ours.forward(step, 5)[0].float(), theirs.forward(step, 5)[0].float(),
                               rtol=0.05, atol=0.05)  # fmt: skip
    expected = loop.generate(lm, prompt_ids, N).token_ids
    for k in (1, 4, 8):
        spec = Speculation(DraftModel(qwen2_draft), get_policy("exact"), FixedK(k))
        assert loop.generate(lm, prompt_ids, N, speculation=spec).token_ids == expected


def test_report_and_file_names_say_kernel():
    flags = {"prepack_kernel": [True, False, None], "prepacked": [True, True, None]}
    assert list(with_linears(pd.DataFrame(flags))["linears"]) == ["kernel", "prepacked", "plain"]
    entry = {"model": "m", "dtype": "float32", "engine": "dynamic", "prepacked": True}
    assert bench_engine.file_name(entry) == "m-float32-dynamic-prepacked.json"
    assert (
        bench_engine.file_name(entry | {"prepack_kernel": True}) == "m-float32-dynamic-kernel.json"
    )
