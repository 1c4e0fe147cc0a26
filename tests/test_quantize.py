"""int8 weight-only linears (lab.engine.quantize): scales by hand, the kernel against the
dequantized weight, bytes per token, and greedy speculation equal to the int8 baseline."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml
from torch import nn

from lab import cli, machine, models
from lab.bench import engine as bench_engine
from lab.bench.roofline import weight_bytes_per_token
from lab.drafting import heads
from lab.drafting.draft_model import DraftModel
from lab.engine import loop, prepack, quantize, smallm
from lab.engine.controllers import FixedK
from lab.engine.loop import Speculation
from lab.engine.model import LoadedModel
from lab.engine.policies import get_policy
from lab.method import Method
from lab.models import random as random_models
from lab.pipeline import params as P
from lab.pipeline import stage
from lab.report.sections_engine import with_linears

N = 40
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def int8() -> LoadedModel:
    """A fresh tiny model (the session's shared ones must stay float), quantized."""
    lm = models.load("tiny-random-qwen2", device="cpu", dtype="float32")
    quantize.quantize(lm.model)
    return lm


def test_quantize_weight_by_hand():
    weight = torch.tensor([[1.0, -2.0, 0.5], [0.0, 0.25, -0.25]])
    q, scales = quantize.quantize_weight(weight)
    # Row 0: scale 2/127; 1 -> 63.5 rounds to the even 64, 0.5 -> 31.75 -> 32.
    # Row 1: scale 0.25/127; +-0.25 -> +-127.
    assert q.dtype == torch.int8
    assert q.tolist() == [[64, -127, 32], [0, 127, -127]]
    torch.testing.assert_close(scales, torch.tensor([2.0 / 127, 0.25 / 127]))


def test_a_zero_row_gets_a_finite_scale():
    q, scales = quantize.quantize_weight(torch.zeros(2, 4))
    assert q.abs().sum() == 0 and torch.isfinite(scales).all()


@pytest.mark.parametrize("rows", [1, 5, 16])
def test_short_steps_multiply_the_dequantized_weight(rows):
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    int8 = quantize.Int8Linear(linear)
    x = torch.randn(1, rows, 64)
    q, scales = quantize.quantize_weight(linear.weight)
    # What the kernel should compute: bf16 activations times the dequantized weight, plus bias.
    expected = x.bfloat16().float() @ (q.float() * scales[:, None]).T + linear.bias
    out = int8(x)
    assert out.shape == (1, rows, 48) and out.dtype == torch.float32
    torch.testing.assert_close(out, expected.detach(), rtol=2e-2, atol=2e-2)
    # And it is not the float weight's answer: the int8 path really ran.
    assert not torch.equal(out, linear(x))


needs_kernel = pytest.mark.skipif(
    not smallm.cpu_supports(machine.cpu_flags()), reason="needs a CPU with AVX2 + FMA"
)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 5, 13, smallm.MAX_ROWS])
def test_kernel_multiplies_the_dequantized_weight_in_fp32(rows, dtype):
    gen = torch.Generator().manual_seed(rows)
    linear = nn.Linear(96, 48).to(dtype)
    with torch.no_grad():
        linear.weight.copy_(torch.randn(48, 96, generator=gen))
    int8 = quantize.Int8Linear(linear, kernel=True)
    assert int8.kernel and int8.scales.dtype == torch.float32
    x = torch.randn(1, rows, 96, generator=gen).to(dtype)
    q, scales = quantize.quantize_weight(linear.weight)
    # Unlike torch's int8 kernel, x is not rounded to bf16: fp32 x times the dequantized weight.
    exact = x.double() @ (q.double() * scales.double()[:, None]).T + linear.bias.double()
    out = int8(x)
    assert out.shape == (1, rows, 48) and out.dtype == dtype
    tolerance = 1e-5 if dtype == torch.float32 else 2**-7  # bf16: one rounding of the output
    assert ((out.double() - exact).abs() / exact.abs().max()).max().item() < tolerance
    assert ops(int8, x) == set()  # no torch matmul: the kernel ran
    # One accumulation order per row: a decode row equals the same row inside a verify step.
    assert torch.equal(int8(x[:, :1]), out[:, :1])


@needs_kernel
def test_greedy_speculation_with_a_kernel_int8_draft_equals_the_target(qwen2, prompt_ids):
    draft = models.load("tiny-random-llama-draft", device="cpu", dtype="float32")
    assert quantize.quantize(draft.model, kernel=True) > 0 and quantize.runs_kernel(draft.model)
    expected = loop.generate(qwen2, prompt_ids, N).token_ids
    for k in (1, 4):
        spec = Speculation(DraftModel(draft), get_policy("exact"), FixedK(k))
        assert loop.generate(qwen2, prompt_ids, N, speculation=spec).token_ids == expected


def ops(layer: nn.Module, x: torch.Tensor) -> set[str]:
    """The matmul operators torch's profiler sees when layer runs on x."""
    with torch.profiler.profile() as prof:
        layer(x)
    matmuls = ("aten::_weight_int8pack_mm", "aten::linear", "aten::addmm", "aten::mm")
    return {e.name for e in prof.events()} & set(matmuls)


def test_long_steps_keep_the_float_weight():
    torch.manual_seed(0)
    linear = nn.Linear(64, 48)
    x = torch.randn(1, quantize.MAX_ROWS + 1, 64)
    assert torch.equal(quantize.Int8Linear(linear)(x), linear(x))


def test_every_linear_is_replaced(int8, qwen2):
    linears = [m for m in qwen2.model.modules() if type(m) is nn.Linear]
    assert sum(isinstance(m, quantize.Int8Linear) for m in int8.model.modules()) == len(linears)
    assert heads.vocab_size(int8.model) == heads.vocab_size(qwen2.model)  # an nn.Linear still
    with pytest.raises(ValueError, match="int8 already"):
        quantize.quantize(int8.model)


def test_bytes_per_token_count_the_int8_copy(int8, qwen2):
    # Every linear reads 1 byte per weight + 2 per output channel (bf16 scales) instead of 4.
    linears = [m for m in qwen2.model.modules() if type(m) is nn.Linear]
    saved = sum(m.weight.numel() * 4 - m.weight.numel() - m.out_features * 2 for m in linears)
    embed = qwen2.model.get_input_embeddings().weight
    tied = embed is qwen2.model.get_output_embeddings().weight
    # A tied matrix was read whole as the float LM head; quantized, the lookup reads one row.
    row = embed.shape[1] * 4 if tied else 0
    assert weight_bytes_per_token(int8.model) == weight_bytes_per_token(qwen2.model) - saved + row


def test_greedy_int8_speculation_equals_the_int8_baseline(int8, qwen2_draft, prompt_ids):
    expected = loop.generate(int8, prompt_ids, N).token_ids
    for k in (1, 4, 8):  # verification steps of 2, 5 and 9 rows: the int8 kernel's many rows
        spec = Speculation(DraftModel(qwen2_draft), get_policy("exact"), FixedK(k))
        assert loop.generate(int8, prompt_ids, N, speculation=spec).token_ids == expected


def test_refuses_models_it_does_not_apply_to():
    lm = models.load("tiny-random-qwen2", device="cpu", dtype="float16")
    with pytest.raises(ValueError, match="float32 or bfloat16 model on the CPU"):
        quantize.quantize(lm.model)
    assert not quantize.applies(torch.device("cuda"), torch.float32)
    packed = models.load("tiny-random-qwen2", device="cpu", dtype="float32")
    prepack.prepack(packed.model)
    with pytest.raises(ValueError, match="prepacked"):
        quantize.quantize(packed.model)


def test_bench_engine_does_not_prepack_int8_models(int8):
    assert bench_engine._prepack_variants(int8, None) == [False]
    with pytest.raises(ValueError, match="not both"):
        bench_engine.Settings(quantize=True, prepack=True)
    assert bench_engine.file_name({"model": "m", "dtype": "float32", "engine": "static",
                                   "int8": True}) == "m-float32-static-int8.json"  # fmt: skip


@pytest.mark.parametrize("command", ["serve", "bench-engine"])
def test_cli_refuses_int8_off_the_cpu_before_loading(capsys, monkeypatch, command):
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the arguments were checked")

    for module in (models, random_models):
        monkeypatch.setattr(module, "load", refuse)
    monkeypatch.setattr(models, "available_devices", lambda: ["cpu", "cuda"])
    target = "tiny-random-qwen2" if command == "serve" else "random-qwen2.5-0.5b"
    int8 = ["--int8", "all"] if command == "serve" else ["--int8"]
    assert cli.main([command, "--target", target, "--device", "cuda", *int8]) == 2
    assert "--int8 needs --device cpu" in capsys.readouterr().err
    if command == "serve":  # a draft to quantize must be there
        assert cli.main([command, "--target", target, "--device", "cpu", "--int8", "draft"]) == 2
        assert "--int8 draft quantizes the draft model: give --draft" in capsys.readouterr().err


def test_report_names_int8_linears():
    flags = {"int8": [True, False, False, None], "prepacked": [False, True, False, None],
             "fused": [False, False, True, None]}  # fmt: skip
    assert list(with_linears(pd.DataFrame(flags))["linears"]) == [
        "int8", "prepacked", "fused", "plain"
    ]  # fmt: skip
    on_kernel = pd.DataFrame({"int8": [True, True], "int8_kernel": [True, False]})
    assert list(with_linears(on_kernel)["linears"]) == ["int8 kernel", "int8"]
    entry = {"model": "m", "dtype": "bfloat16", "engine": "dynamic", "int8": True}
    assert (
        bench_engine.file_name(entry | {"int8_kernel": True})
        == "m-bfloat16-dynamic-int8-kernel.json"
    )
    assert bench_engine.file_name(entry) == "m-bfloat16-dynamic-int8.json"


def _params(**models_update: object) -> P.Params:
    """The default params on the CPU in float32, with models.* overridden."""
    params = P.load(ROOT / "params.yaml")
    where = {"device": "cpu", "dtype": "float32", **models_update}
    return params.model_copy(update={"models": params.models.model_copy(update=where)})


def test_stage_runs_int8_in_place_of_prepack_and_records_it():
    off = _params(int8=None)
    assert not stage.quantized(off) and "int8" not in stage.run_config(off, Method())
    everything = _params(int8="all")
    assert stage.quantized(everything) and not stage.prepacked(everything)
    run = stage.run_config(everything, Method())
    assert run["int8"] == "all" and "prepack" not in run
    # int8: draft quantizes only the draft model: the baseline's config stays as it was.
    draft = _params(int8="draft")
    assert stage.run_config(draft, Method()) == stage.run_config(off, Method())
    speculative = Method("draft_model", "exact", 4)
    assert stage.run_config(draft, speculative)["int8"] == "draft"


@pytest.mark.parametrize(
    ("update", "message"),
    [({"int8": "all", "prepack": True}, "models.int8: all replaces prepacked linears"),
     ({"int8": "all", "dtype": "float16"}, "models.int8 needs a CPU float32 or bfloat16")],
)  # fmt: skip
def test_stage_refuses_int8_where_it_cannot_run(update, message):
    with pytest.raises(ValueError, match=message):
        stage.run_config(_params(**update), Method("draft_model", "exact", 4))


def test_params_name_the_allowed_int8_values():
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    raw["models"]["int8"] = "both"
    with pytest.raises(ValueError, match="draft, all or null"):
        P.Params.model_validate(raw)
