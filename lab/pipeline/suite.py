"""Run one method over a prompt suite (warm-up, repetitions, profiling) and check it is lossless."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pandas as pd
import torch
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


@torch.inference_mode()
def lossless_check(target: LoadedModel, rows: pd.DataFrame, baseline: pd.DataFrame) -> pd.DataFrame:
    """Per prompt: identical to the baseline, first differing index, top-1/top-2 margin there."""
    out = []
    base = baseline[baseline["repetition"] == 0].set_index("question_id")
    for row in rows[rows["repetition"] == 0].itertuples():
        ref = list(base.loc[row.question_id, "token_ids"])
        mine = list(row.token_ids)
        diff = next((i for i, (a, b) in enumerate(zip(mine, ref, strict=False)) if a != b), None)
        if diff is None and len(mine) != len(ref):
            diff = min(len(mine), len(ref))
        margin = None
        if diff is not None:
            # Score the shared prefix: a tiny margin means fp rounding can flip greedy, not a bug.
            ids = torch.tensor([list(row.prompt_ids) + ref[:diff]], device=target.device)
            top2 = target.model(input_ids=ids, logits_to_keep=1).logits[0, -1].float().topk(2)
            margin = float(top2.values[0] - top2.values[1])
        out.append({"question_id": row.question_id, "identical": diff is None,
                    "first_diff": diff, "logit_margin": margin})  # fmt: skip
    return pd.DataFrame(out)
