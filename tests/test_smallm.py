"""lab's small-M fp32 kernel (lab.engine.smallm) and prepacked linears that run it."""

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


def test_each_row_is_the_same_whatever_the_rows_beside_it():
    # One FMA chain per output in k order for any M: a decode row and the same row inside a
    # verification step are bit-identical (what keeps greedy speculation exact on this path).
    gen = torch.Generator().manual_seed(0)
    w, x = torch.randn(64, 96, generator=gen), torch.randn(smallm.MAX_ROWS, 96, generator=gen)
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


def test_report_and_file_names_say_kernel():
    flags = {"prepack_kernel": [True, False, None], "prepacked": [True, True, None]}
    assert list(with_linears(pd.DataFrame(flags))["linears"]) == ["kernel", "prepacked", "plain"]
    entry = {"model": "m", "dtype": "float32", "engine": "dynamic", "prepacked": True}
    assert bench_engine.file_name(entry) == "m-float32-dynamic-prepacked.json"
    assert (
        bench_engine.file_name(entry | {"prepack_kernel": True}) == "m-float32-dynamic-kernel.json"
    )
