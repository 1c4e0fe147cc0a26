"""Prepacked linears (lab.engine.prepack): same numbers within fp32 rounding, same greedy tokens."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from lab import models
from lab.bench import engine as bench_engine
from lab.bench.roofline import weight_bytes_per_token
from lab.drafting import heads
from lab.drafting.draft_model import DraftModel
from lab.engine import caches, loop, prepack
from lab.engine.controllers import FixedK
from lab.engine.loop import Speculation
from lab.engine.model import LoadedModel
from lab.engine.policies import get_policy
from lab.method import Method
from lab.pipeline import params as P
from lab.pipeline import stage

N = 40
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def packed() -> LoadedModel:
    """A fresh tiny model (the session's shared ones must stay unpacked), prepacked."""
    lm = models.load("tiny-random-qwen2", device="cpu", dtype="float32")
    prepack.prepack(lm.model)
    return lm


def _logits(lm: LoadedModel, ids: list[int], n: int) -> torch.Tensor:
    """(n, V) logits of the last n of ids, after prefilling the rest."""
    engine = caches.DynamicEngine(lm)
    engine.start(ids[:-n])
    return engine.forward(torch.tensor([ids[-n:]]), n)[0]


def test_every_linear_is_replaced_and_restored(packed, qwen2):
    linears = sum(type(m) is nn.Linear for m in qwen2.model.modules())
    assert linears > 0
    # The packed copies are buffers: a decode step still reads each weight once.
    assert weight_bytes_per_token(packed.model) == weight_bytes_per_token(qwen2.model)
    assert heads.vocab_size(packed.model) == heads.vocab_size(qwen2.model)  # an nn.Linear still
    assert sum(isinstance(m, prepack.PrepackedLinear) for m in packed.model.modules()) == linears
    with pytest.raises(ValueError, match="prepacked already"):
        prepack.prepack(packed.model)
    assert prepack.unpack(packed.model) == linears
    assert not prepack.is_prepacked(packed.model)


@pytest.mark.parametrize("n", [1, 2, 3, 5, 9])
def test_logits_match_within_fp32_rounding(packed, qwen2, prompt_ids, n):
    plain = _logits(qwen2, prompt_ids, n)
    with torch.profiler.profile() as prof:
        fast = _logits(packed, prompt_ids, n)
    onednn = [e for e in prof.events() if e.name == "mkldnn::_linear_pointwise"]
    # Prefill (the prompt's many rows) takes oneDNN but for the LM head (it scores one row);
    # the n-row step, LM head included, only from MIN_ROWS rows on.
    linears = sum(isinstance(m, prepack.PrepackedLinear) for m in packed.model.modules())
    assert len(onednn) == linears - 1 + linears * (n >= prepack.MIN_ROWS)
    torch.testing.assert_close(fast, plain, rtol=1e-4, atol=1e-4)


def test_greedy_tokens_equal_generate_and_speculation(packed, qwen2, qwen2_draft, prompt_ids):
    ids = torch.tensor([prompt_ids])
    reference = qwen2.model.generate(ids, max_new_tokens=N, do_sample=False, min_new_tokens=N)
    expected = reference[0, len(prompt_ids) :].tolist()
    assert loop.generate(packed, prompt_ids, N).token_ids == expected
    for k in (2, 4, 8):  # verification steps of 3, 5 and 9 rows: the oneDNN path
        spec = Speculation(DraftModel(qwen2_draft), get_policy("exact"), FixedK(k))
        assert loop.generate(packed, prompt_ids, N, speculation=spec).token_ids == expected


def _kernel(monkeypatch: pytest.MonkeyPatch, on: bool) -> None:
    """Pretend the CPU's plan does (or does not) run lab's kernel, whatever CPU this is."""
    monkeypatch.setattr(prepack, "plan", lambda: prepack.Plan(1, on))


def test_refuses_models_it_does_not_apply_to(monkeypatch):
    lm = models.load("tiny-random-qwen2", device="cpu", dtype="bfloat16")
    with pytest.raises(ValueError, match="float32 model on the CPU"):
        prepack.prepack(lm.model)  # bf16 without the kernel: oneDNN's packing is fp32 only
    cpu = torch.device("cpu")
    assert prepack.applies(cpu, torch.float32) == torch.backends.mkldnn.is_available()
    _kernel(monkeypatch, False)
    assert not prepack.applies(cpu, torch.bfloat16)
    _kernel(monkeypatch, True)  # bf16 is packed for lab's kernel only (lab.engine.smallm)
    assert prepack.applies(cpu, torch.bfloat16) and not prepack.applies(cpu, torch.float16)
    assert not prepack.applies(torch.device("meta"), torch.bfloat16)


def test_bench_engine_measures_both_where_it_applies(qwen2, monkeypatch):
    assert bench_engine._prepack_variants(qwen2, None) == [False, True]
    assert bench_engine._prepack_variants(qwen2, False) == [False]
    lm = models.load("tiny-random-qwen2", device="cpu", dtype="bfloat16")
    _kernel(monkeypatch, False)
    assert bench_engine._prepack_variants(lm, None) == [False]
    with pytest.raises(ValueError, match="CPU float32"):
        bench_engine._prepack_variants(lm, True)
    _kernel(monkeypatch, True)
    assert bench_engine._prepack_variants(lm, None) == [False, True]


def _params(dtype: str, setting: bool | None) -> P.Params:
    """The default params on the CPU with a dtype and a models.prepack setting."""
    params = P.load(ROOT / "params.yaml")
    where = {"device": "cpu", "dtype": dtype, "prepack": setting}
    return params.model_copy(update={"models": params.models.model_copy(update=where)})


@pytest.mark.parametrize(
    ("dtype", "setting", "kernel", "expected"),
    [("float32", None, False, True), ("float32", False, False, False),
     ("bfloat16", None, False, False), ("bfloat16", None, True, True),
     ("bfloat16", False, True, False)],
)  # fmt: skip
def test_stage_config_records_the_choice(dtype, setting, kernel, expected, monkeypatch):
    _kernel(monkeypatch, kernel)
    params = _params(dtype, setting)
    assert stage.prepacked(params) is (expected and torch.backends.mkldnn.is_available())
    run = stage.run_config(params, Method())
    assert run.get("prepack", False) is stage.prepacked(params)


def test_stage_refuses_prepack_where_it_does_not_apply(monkeypatch):
    _kernel(monkeypatch, False)
    params = _params("bfloat16", True)
    with pytest.raises(ValueError, match="models.prepack: true needs a CPU float32 run"):
        stage.prepacked(params)


def test_min_rows_follow_the_cpu_vendor():
    # MKL's small-M path is Intel's: elsewhere (an AMD EPYC) oneDNN is faster from one row.
    assert prepack.min_rows("GenuineIntel") == prepack.MIN_ROWS == 4
    assert prepack.min_rows("AuthenticAMD") == 1
    assert prepack.min_rows(None) == prepack.MIN_ROWS


def test_packed_from_one_row_decodes_the_same_tokens(qwen2, qwen2_draft, prompt_ids):
    lm = models.load("tiny-random-qwen2", device="cpu", dtype="float32")
    prepack.prepack(lm.model, min_rows=1)
    with torch.profiler.profile() as prof:
        fast = _logits(lm, prompt_ids, 1)
    onednn = [e for e in prof.events() if e.name == "mkldnn::_linear_pointwise"]
    linears = sum(isinstance(m, prepack.PrepackedLinear) for m in lm.model.modules())
    assert len(onednn) == 2 * linears  # prefill and the one-row step, LM head included
    torch.testing.assert_close(fast, _logits(qwen2, prompt_ids, 1), rtol=1e-4, atol=1e-4)
    expected = loop.generate(qwen2, prompt_ids, N).token_ids
    assert loop.generate(lm, prompt_ids, N).token_ids == expected
    spec = Speculation(DraftModel(qwen2_draft), get_policy("exact"), FixedK(4))
    assert loop.generate(lm, prompt_ids, N, speculation=spec).token_ids == expected
