"""Side-by-side benchmark of lab's loops against Hugging Face generate and assisted generation."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any

import torch
from tqdm import tqdm

from lab import decode, speculative
from lab.controllers import FixedK
from lab.decode import Clock
from lab.drafters import DraftModel
from lab.models import LoadedModel
from lab.policies import get_policy

METHODS = ("hf_generate", "lab_baseline", "hf_assisted", "lab_speculative")


@contextmanager
def assistant_schedule(draft: LoadedModel, k: int) -> Iterator[None]:
    """Make HF assisted generation draft exactly k tokens a step (read from the draft's config)."""
    saved = copy.deepcopy(draft.model.generation_config)
    config = draft.model.generation_config
    config.num_assistant_tokens = k
    config.num_assistant_tokens_schedule = "constant"
    # HF's default (0.4) stops drafting early on low draft confidence: that is not a fixed K.
    config.assistant_confidence_threshold = 0.0
    try:
        yield
    finally:
        draft.model.generation_config = saved


def _hf(target: LoadedModel, ids: list[int], n: int, **extra: Any) -> list[int]:
    inputs = torch.tensor([ids], device=target.device)
    out = target.model.generate(  # type: ignore[operator]
        inputs,
        attention_mask=torch.ones_like(inputs),
        do_sample=False,
        max_new_tokens=n,
        eos_token_id=list(target.eos_token_ids),
        pad_token_id=target.tokenizer.pad_token_id or target.eos_token_ids[0],
        **extra,
    )
    return [int(t) for t in out[0, len(ids) :]]


def _runners(target: LoadedModel, draft: LoadedModel, k: int) -> dict[str, Callable[..., Any]]:
    """Each method as f(prompt_ids, max_new_tokens) -> token ids (and lab's full result)."""
    exact = get_policy("exact")
    return {
        "hf_generate": lambda ids, n: _hf(target, ids, n),
        "lab_baseline": lambda ids, n: decode.generate(target, ids, n),
        "hf_assisted": lambda ids, n: _hf(target, ids, n, assistant_model=draft.model),
        "lab_speculative": lambda ids, n: speculative.generate(
            target, DraftModel(draft), exact, FixedK(k), ids, n
        ),
    }


def _step_breakdown(results: list[Any]) -> dict[str, float]:
    """Mean ms per step of lab's speculative loop: draft, verify, and everything else."""
    steps = [s for r in results for s in r.steps]
    draft = sum(s.draft_ms for s in steps) / len(steps)
    verify = sum(s.verify_ms for s in steps) / len(steps)
    total = sum(s.step_ms for s in steps) / len(steps)
    return {
        "draft_ms": draft,
        "verify_ms": verify,
        "other_ms": total - draft - verify,
        "step_ms": total,
        "mean_accepted_length": sum(s.emitted for s in steps) / len(steps),
    }


@torch.inference_mode()
def run(
    target: LoadedModel,
    draft: LoadedModel,
    prompts: list[list[int]],
    k: int,
    max_new_tokens: int,
    warmup_tokens: int = 8,
) -> dict[str, Any]:
    """Time every method on every prompt in one process; tokens/s, ratios and token identity."""
    runners = _runners(target, draft, k)
    clock = Clock(target.device)
    seconds = dict.fromkeys(METHODS, 0.0)
    tokens: dict[str, list[list[int]]] = {m: [] for m in METHODS}
    lab_results: dict[str, list[Any]] = {"lab_baseline": [], "lab_speculative": []}
    with assistant_schedule(draft, k):
        for method in METHODS:  # warm-up: first calls pay one-off allocation and dispatch costs
            runners[method](prompts[0], warmup_tokens)
        for ids in tqdm(prompts, desc="bench prompts", unit="prompt"):
            for method in METHODS:
                start = clock.now()
                out = runners[method](ids, max_new_tokens)
                seconds[method] += (clock.now() - start) / 1000.0
                if method in lab_results:
                    lab_results[method].append(out)
                    out = out.token_ids
                tokens[method].append(out)
    tps = {m: sum(map(len, tokens[m])) / seconds[m] for m in METHODS}
    reference = tokens["hf_generate"]
    return {
        "target": target.name,
        "draft": draft.name,
        "device": str(target.device),
        "dtype": str(target.dtype).removeprefix("torch."),
        "k": k,
        "max_new_tokens": max_new_tokens,
        "prompts": len(prompts),
        "tokens_per_s": tps,
        "new_tokens": {m: sum(map(len, tokens[m])) for m in METHODS},
        "baseline_vs_hf_generate": tps["lab_baseline"] / tps["hf_generate"],
        "speculative_vs_hf_assisted": tps["lab_speculative"] / tps["hf_assisted"],
        "speculative_vs_lab_baseline": tps["lab_speculative"] / tps["lab_baseline"],
        "identical": all(tokens[m] == reference for m in METHODS),
        "identical_per_method": {m: tokens[m] == reference for m in METHODS},
        "speculative_steps": _step_breakdown(lab_results["lab_speculative"]),
        "baseline_steps": _step_breakdown(lab_results["lab_baseline"]),
    }
