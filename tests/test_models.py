"""Model sources, devices and dtypes."""

from __future__ import annotations

import pytest
import torch

from lab import models


def test_tiny_models_are_seeded_and_real_architectures():
    a = models.load("tiny-random-llama", device="cpu")
    b = models.load("tiny-random-llama", device="cpu")
    assert type(a.model).__name__ == "LlamaForCausalLM"
    assert type(models.load("tiny-random-qwen2").model).__name__ == "Qwen2ForCausalLM"
    for pa, pb in zip(a.model.parameters(), b.model.parameters(), strict=True):
        assert torch.equal(pa, pb)
    assert a.eos_token_ids == (a.tokenizer.convert_tokens_to_ids("<|im_end|>"),)


def test_byte_tokenizer_round_trips_and_has_chat_template():
    tokenizer = models.byte_tokenizer()
    text = "déf f(x):\n    return x  # ünïcode"
    assert tokenizer.decode(tokenizer.encode(text)) == text
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("<|im_start|>assistant\n")


def test_device_and_dtype_defaults():
    assert models.resolve_dtype(torch.device("cpu")) == models.cpu_dtype()[0]  # by the CPU's flags
    assert models.resolve_dtype(torch.device("cuda")) == torch.bfloat16
    assert models.resolve_dtype(torch.device("mps")) == torch.float16
    assert models.resolve_dtype(torch.device("cpu"), "bfloat16") == torch.bfloat16
    with pytest.raises(models.ModelError, match="unknown dtype 'fp8'"):
        models.resolve_dtype(torch.device("cpu"), "fp8")
    expected = "cuda" if torch.cuda.is_available() else "cpu"
    if not torch.backends.mps.is_available():
        assert models.resolve_device().type == expected
    assert models.load("tiny-random-llama", dtype="bfloat16").model.dtype == torch.bfloat16


def test_names_paths_and_hub_ids(tmp_path, monkeypatch):
    from huggingface_hub import constants

    models.check_name("tiny-random-llama")
    models.check_name("qwen2.5-coder-0.5b-instruct")
    models.check_name(str(tmp_path))
    with pytest.raises(models.ModelError, match="unknown model 'nope'"):
        models.check_name("nope")
    # A hub id works online, or offline once it is in the local cache; else it fails now.
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    models.check_name("HuggingFaceTB/SmolLM2-135M")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(models.ModelError, match="not in the Hugging Face cache"):
        models.check_name("HuggingFaceTB/SmolLM2-135M")
    snapshot = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc")
    models.check_name("HuggingFaceTB/SmolLM2-135M")


def test_devices_are_checked_by_name_and_by_what_is_here(monkeypatch):
    for bad in ("cdua", "gpu", "cuda:x", "cpu:0", ""):
        with pytest.raises(models.ModelError, match=f"unknown device '{bad}': choose from cpu"):
            models.check_device(bad)
    models.check_device("cpu")
    assert models.resolve_device("cpu") == torch.device("cpu")
    monkeypatch.setattr(models, "available_devices", lambda: ["cpu"])
    for absent in ("cuda", "cuda:1", "mps"):
        with pytest.raises(models.ModelError, match=f"'{absent}' is not available.*from cpu$"):
            models.resolve_device(absent)
    assert models.resolve_device() == torch.device("cpu")
    monkeypatch.setattr(models, "available_devices", lambda: ["cpu", "mps"])
    assert models.resolve_device() == torch.device("mps")


def test_byte_vocabulary_is_the_byte_tokenizers():
    # The pair check reads the tiny models' vocabulary without building the tokenizer.
    tokenizer = models.byte_tokenizer()
    assert models.byte_vocabulary() == tokenizer.get_vocab()
    assert models.vocabulary("tiny-random-llama").size == len(tokenizer) == 259


def test_same_vocabulary_pair_is_accepted():
    models.check_pair("tiny-random-qwen2", "tiny-random-llama-draft")


def test_cpu_dtype_by_capability() -> None:
    # bf16 only where the CPU has bf16 matrix units; otherwise fp32 (bf16 would be emulated).
    assert models.cpu_dtype(frozenset({"avx2", "amx_bf16"}))[0] == torch.bfloat16
    assert models.cpu_dtype(frozenset({"avx512f", "avx512_bf16"}))[0] == torch.bfloat16
    dtype, why = models.cpu_dtype(frozenset({"avx2", "avx512f", "avx512_vnni"}))
    assert dtype == torch.float32 and "neither" in why
    cpu = torch.device("cpu")
    assert models.dtype_choice(cpu, "float32") == "float32: set by models.dtype"
    assert models.resolve_dtype(cpu, "float32") == torch.float32
    assert models.resolve_dtype(cpu) == models.cpu_dtype()[0]
