"""Run one decoding method over a prompt suite and read/write its results under experiments/."""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd
import torch
from tqdm import tqdm

from lab import decode, profiling, speculative
from lab.controllers import make_controller
from lab.drafters import (
    Drafter,
    DraftModel,
    EagleDrafter,
    MedusaDrafter,
    PromptLookup,
    drafter_settings,
)
from lab.heads import EagleHead, MedusaHeads, vocab_size
from lab.models import LoadedModel
from lab.policies import make_policy
from lab.prompts import Prompt, encode
from lab.records import PromptResult
from lab.sampling import SamplingParams

# Files of one stage item, experiments/<stage>/<item>/:
CONFIG = "config.json"  # the resolved configuration (method, models, prompts, generation)
PROMPTS = "prompts.jsonl"  # one line per prompt and repetition: summary, tokens, text
STEPS = "steps.csv"  # one row per step: question_id, repetition and the StepRecord fields
METRICS = "metrics.json"  # summary metrics (DVC metrics)
LOSSLESS = "lossless.csv"  # per prompt, for lossless methods: identical to baseline or where not
PROFILE = "profile"  # folder, only when profiled: trace.json, top_ops.csv, step_breakdown.csv


@dataclass(frozen=True)
class Method:
    """One decoding configuration: the baseline (drafter 'none') or a speculative one."""

    drafter: str = "none"
    policy: str = "exact"
    k: int = 0
    controller: str = "fixed"
    controller_params: dict[str, Any] = field(default_factory=dict)
    policy_params: dict[str, Any] = field(default_factory=dict)
    drafter_params: dict[str, Any] = field(default_factory=dict)

    @property
    def baseline(self) -> bool:
        return self.drafter == "none"


# What a drafter runs on: the draft model, trained heads (lab.heads.load), or nothing.
DraftSource = LoadedModel | MedusaHeads | EagleHead | None


def make_drafter(method: Method, target: LoadedModel, draft: DraftSource) -> Drafter:
    """A fresh drafter for the method; unknown names list the valid ones."""
    name = method.drafter
    settings = drafter_settings(name, **method.drafter_params)
    if name == "prompt_lookup":
        return PromptLookup(vocab_size(target.model), settings["max_ngram"], target.device)
    if name == "draft_model" and isinstance(draft, LoadedModel):
        return DraftModel(draft)
    if name == "medusa" and isinstance(draft, MedusaHeads):
        return MedusaDrafter(target, draft)
    if name == "eagle" and isinstance(draft, EagleHead):
        return EagleDrafter(target, draft)
    what = "a draft model (models.draft)" if name == "draft_model" else f"trained {name} heads"
    raise ValueError(f"drafter {name!r} needs {what}, got {type(draft).__name__}")


def generate_one(
    method: Method,
    target: LoadedModel,
    draft: DraftSource,
    ids: list[int],
    max_new_tokens: int,
    sampling: SamplingParams,
    seed: int,
    on_tokens: Callable[[list[int]], None] | None = None,
) -> PromptResult:
    """One prompt under one method (fresh drafter and controller state)."""
    if method.baseline:
        return decode.generate(target, ids, max_new_tokens, sampling, seed, on_tokens)
    controller = make_controller(method.controller, method.k, **method.controller_params)
    policy = make_policy(method.policy, **method.policy_params)
    return speculative.generate(
        target, make_drafter(method, target, draft), policy, controller,
        ids, max_new_tokens, sampling, seed, on_tokens,
    )  # fmt: skip


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
            decode.check_generation_args(target, max_new_tokens, ids)
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


def _replace_dir(tmp: Path, final: Path) -> None:
    """Swap a fully written folder into place, so a killed stage never leaves half an output."""
    old = final.with_name(f".{final.name}.old")
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        os.replace(final, old)
    os.replace(tmp, final)
    shutil.rmtree(old, ignore_errors=True)


def write_item(
    out_dir: Path,
    config: dict[str, Any],
    rows: list[dict[str, Any]],
    metrics: dict[str, Any],
    lossless: pd.DataFrame | None = None,
    profile: Path | None = None,
) -> None:
    """Write one stage item's files (atomically, as a folder); profile is a folder moved in."""
    tmp = out_dir.with_name(f".{out_dir.name}.tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    if profile is not None:
        os.replace(profile, tmp / PROFILE)
    (tmp / CONFIG).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    with open(tmp / PROMPTS, "w") as f:
        for row in rows:
            f.write(json.dumps({k: v for k, v in row.items() if k != "steps"}) + "\n")
    steps = [
        {"question_id": r["question_id"], "repetition": r["repetition"], **s}
        for r in rows
        for s in r["steps"]
    ]
    pd.DataFrame(steps, columns=_STEP_COLUMNS).to_csv(tmp / STEPS, index=False)
    (tmp / METRICS).write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    # Always written (empty when not applicable) so DVC can declare it for every item.
    if lossless is None:
        lossless = pd.DataFrame(columns=["question_id", "identical", "first_diff", "logit_margin"])
    lossless.to_csv(tmp / LOSSLESS, index=False)
    _replace_dir(tmp, out_dir)


_STEP_COLUMNS = ["question_id", "repetition", "step", "k", "proposed", "accepted", "emitted",
                 "draft_ms", "verify_ms", "step_ms", "rss_mb", "accept_ms"]  # fmt: skip


@dataclass
class Item:
    """One stage item read back from disk."""

    path: Path
    config: dict[str, Any]
    rows: pd.DataFrame
    steps: pd.DataFrame
    metrics: dict[str, Any]


def read_item(path: Path) -> Item:
    """Read experiments/<stage>/<item>/ (raises FileNotFoundError naming the missing file)."""
    rows = pd.read_json(path / PROMPTS, lines=True)
    rows["question_id"] = rows["question_id"].astype(str)  # ids may be ints or strings
    return Item(
        path=path,
        config=json.loads((path / CONFIG).read_text()),
        rows=rows,
        steps=pd.read_csv(path / STEPS, dtype={"question_id": str}),
        metrics=json.loads((path / METRICS).read_text()),
    )


def find_same(config: dict[str, Any], roots: list[Path]) -> Path | None:
    """An item under roots whose run-defining config equals this one (to reuse, not re-run)."""
    for root in roots:
        for candidate in sorted(root.glob(f"*/{CONFIG}")):
            if json.loads(candidate.read_text()).get("run") == config["run"]:
                return candidate.parent
    return None
