"""The static-cache engine decodes exactly what the dynamic loops decode, token for token."""

from __future__ import annotations

import pytest
import torch

from lab import models
from lab.bench.roofline import replay_rate
from lab.drafting.draft_model import DraftModel
from lab.drafting.oracle import oracle_for
from lab.engine import caches, loop
from lab.engine.controllers import FixedK
from lab.engine.loop import Speculation
from lab.engine.model import LoadedModel
from lab.engine.policies import get_policy

N = 40
needs_cuda = pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device: torch.cuda.is_available() is False"
)


def engine(lm: LoadedModel, prompt_ids: list[int], **kwargs) -> caches.StaticEngine:
    return caches.StaticEngine(lm, caches.cache_length([prompt_ids], N, 8), **kwargs)


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_static_baseline_equals_dynamic(request, name, prompt_ids):
    lm = request.getfixturevalue(name)
    base = loop.generate(lm, prompt_ids, N)
    static = engine(lm, prompt_ids)
    for _ in range(2):  # the second run reuses the cache: stale entries must stay invisible
        out = loop.generate(static, prompt_ids, N)
        assert out.token_ids == base.token_ids
        assert [s.emitted for s in out.steps] == [1] * (N - 1)


@pytest.mark.parametrize("pair", [("qwen2", "qwen2"), ("qwen2", "qwen2_draft")])
@pytest.mark.parametrize("k", [1, 2, 5, 8])
def test_static_speculative_equals_baseline(request, pair, k, prompt_ids):
    # An unrelated draft is rejected almost every step, so the write position moves back
    # nearly every step: the rollback-by-position path is what this exercises.
    target, draft = (request.getfixturevalue(name) for name in pair)
    base = loop.generate(target, prompt_ids, N)
    out = loop.generate(
        engine(target, prompt_ids),
        prompt_ids,
        N,
        speculation=Speculation(DraftModel(draft), get_policy("exact"), FixedK(k)),
    )
    assert out.token_ids == base.token_ids
    if draft is target:
        assert out.acceptance_rate == 1.0


@pytest.mark.parametrize("k", [1, 3, 8])
def test_fixed_sizes_pad_short_steps(qwen2, qwen2_draft, prompt_ids, k):
    # sizes (1, 9): every verify step, tails included, is padded to 9 positions and cropped.
    base = loop.generate(qwen2, prompt_ids, N)
    static = engine(qwen2, prompt_ids, sizes=(1, 9))
    for draft in (qwen2, qwen2_draft):
        out = loop.generate(
            static,
            prompt_ids,
            N,
            speculation=Speculation(DraftModel(draft), get_policy("exact"), FixedK(k)),
        )
        assert out.token_ids == base.token_ids


def test_dynamic_engine_matches_the_library_loops(llama, llama_draft, prompt_ids):
    base = loop.generate(llama, prompt_ids, N)
    assert loop.generate(caches.DynamicEngine(llama), prompt_ids, N).token_ids == base.token_ids
    spec = loop.generate(
        llama,
        prompt_ids,
        N,
        speculation=Speculation(DraftModel(llama_draft), get_policy("exact"), FixedK(3)),
    )
    out = loop.generate(
        caches.DynamicEngine(llama),
        prompt_ids,
        N,
        speculation=Speculation(DraftModel(llama_draft), get_policy("exact"), FixedK(3)),
    )
    assert out.token_ids == spec.token_ids == base.token_ids
    assert [s.accepted for s in out.steps] == [s.accepted for s in spec.steps]


def test_full_static_cache_fails_loudly(qwen2, prompt_ids):
    static = caches.StaticEngine(qwen2, len(prompt_ids) + 4)
    with pytest.raises(ValueError, match="static cache of .* positions is full"):
        loop.generate(static, prompt_ids, 10)


def test_compiling_needs_sizes(qwen2):
    with pytest.raises(ValueError, match="needs its step sizes"):
        caches.StaticEngine(qwen2, 64, compile=True)


def test_hidden_state_drafters_are_refused(qwen2, prompt_ids):
    class Hidden(DraftModel):
        needs_hidden = True

    with pytest.raises(ValueError, match="dynamic engine only"):
        loop.generate(
            engine(qwen2, prompt_ids),
            prompt_ids,
            N,
            speculation=Speculation(Hidden(qwen2), get_policy("exact"), FixedK(2)),
        )


@pytest.mark.slow
def test_compiled_on_cpu_equals_baseline(llama, prompt_ids):
    # Inductor's C++ kernels: slow to build (about a minute per size), so one size per K.
    base = loop.generate(llama, prompt_ids, N)
    compiled = engine(llama, prompt_ids, compile=True, sizes=(1, 3))
    compiled.warmup(prompt_ids)
    assert loop.generate(compiled, prompt_ids, N).token_ids == base.token_ids
    out = loop.generate(
        compiled,
        prompt_ids,
        N,
        speculation=Speculation(DraftModel(llama), get_policy("exact"), FixedK(2)),
    )
    assert out.token_ids == base.token_ids and out.acceptance_rate == 1.0


@pytest.fixture(scope="module")
def cuda_qwen2() -> LoadedModel:
    # fp32: compiled and eager kernels then agree far inside the tiny model's logit margins.
    return models.load("tiny-random-qwen2", device="cuda", dtype="float32")


@pytest.mark.cuda
@needs_cuda
@pytest.mark.parametrize("k", [1, 4])
def test_compiled_cuda_graphs_equal_baseline(cuda_qwen2, prompt_ids, k):
    lm = cuda_qwen2
    base = loop.generate(lm, prompt_ids, N)
    compiled = engine(lm, prompt_ids, compile=True, sizes=(1, k + 1))
    compiled.warmup(prompt_ids)
    assert compiled.compile_s > 0
    out = loop.generate(compiled, prompt_ids, N)
    assert out.token_ids == base.token_ids
    assert out.peak_cuda_mb is not None and out.peak_cuda_mb > 0
    for draft in (DraftModel(lm), oracle_for({tuple(prompt_ids): base}, lm)):
        out = loop.generate(
            compiled, prompt_ids, N, speculation=Speculation(draft, get_policy("exact"), FixedK(k))
        )
        assert out.token_ids == base.token_ids and out.acceptance_rate == 1.0
    assert replay_rate(compiled, prompt_ids, N) > 0
