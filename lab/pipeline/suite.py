"""Run one method over a prompt suite: warm-up, repetitions, profiling."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from tqdm import tqdm

from lab.engine.model import LoadedModel
from lab.engine.sampling import SamplingParams
from lab.engine.session import check_generation_args
from lab.method import DraftSource, Method, generate_one
from lab.pipeline import profiling
from lab.prompts import Prompt, encode


def run(
    method: Method,
    target: LoadedModel,
    draft: DraftSource,
    prompts: list[Prompt],
    max_new_tokens: int,
    sampling: SamplingParams,
    seed: int,
    repetitions: int = 1,
    warmup: int = 1,
    desc: str = "prompts",
    profile_dir: Path | None = None,
) -> list[dict[str, Any]]:
    """Every prompt, `repetitions` times, after `warmup` discarded runs; one row per generation.

    profile_dir: torch.profiler over the timed generations (not the warm-up), written there.
    """
    encoded = [encode(p, target.tokenizer) for p in prompts]
    for prompt, ids in zip(prompts, encoded, strict=True):  # fail before any prompt runs
        try:
            check_generation_args(target, max_new_tokens, ids)
        except ValueError as err:
            raise ValueError(f"prompt {prompt.question_id} ({prompt.category}): {err}") from err
    for _ in range(warmup):  # first calls pay one-off allocation and dispatch costs
        generate_one(method, target, draft, encoded[0], min(8, max_new_tokens), sampling, seed)
    rows = []
    with profiling.profiled(profile_dir, target.device):
        for prompt, ids in tqdm(list(zip(prompts, encoded, strict=True)), desc=desc, unit="prompt"):
            for rep in range(repetitions):
                result = generate_one(method, target, draft, ids, max_new_tokens, sampling, seed)
                rows.append({"question_id": prompt.question_id, "category": prompt.category,
                             "repetition": rep, **result.to_dict()})  # fmt: skip
    return rows
