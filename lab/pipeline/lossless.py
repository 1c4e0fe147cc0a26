"""Is a lossless method's output the greedy baseline's? Per prompt, and where not, why not.

Greedy speculative decoding is exact in exact arithmetic, but the target scores a drafted block
in one batched forward and the baseline one token at a time: the kernels accumulate in another
order and round differently, so a near-tie at the top can flip and the outputs fork. A prompt that
differs is classified at its first differing token, on the reference (baseline) prefix:

- numerics: the baseline's token and the method's token are both within `tolerance` of the
  target's top logit there, i.e. the fork is a rounding-level near-tie between exactly those two;
- violation: anything else (a token the target did not nearly prefer, or one output a prefix of
  the other, which equal max_new_tokens and EOS-included outputs never allow): a bug.
"""

from __future__ import annotations

from typing import Literal

import pandas as pd
import torch

from lab.engine.model import LoadedModel
from lab.pipeline.store import LOSSLESS_COLUMNS

Verdict = Literal["identical", "numerics", "violation"]
VERDICTS: tuple[Verdict, ...] = ("identical", "numerics", "violation")

# Tolerance = ULPS[dtype] * eps(dtype) * scale, scale = the largest |logit| at that position.
# - eps (torch.finfo: 2^-7 bf16, 2^-10 fp16, 2^-23 fp32) is one unit in the last place relative
#   to 1, so eps * scale is about one ulp at the logits' magnitude: the output rounding alone moves
#   each logit by up to half of that in each of the two paths. The largest |logit| rather than the
#   top logit alone sets the scale because the rounding error of a dot product grows with the
#   magnitude of its terms, which the largest logit (of either sign) bounds from below; it is the
#   top logit for trained LMs and is never zero.
# - ULPS is the headroom for the accumulation differences between batched and single-token
#   kernels, which compound through the layers. Measured on an H200 (Qwen2.5 0.5B and 1.5B shapes,
#   random weights, 6 prompts x 64 tokens; the same batched-vs-incremental logits, margin of the
#   top pair) the largest disagreement in units of eps * scale was 3.3 in bf16, 2.6 in fp16 and 30
#   in fp32 (in fp32 nearly every hidden element differs by an ulp between kernels; in bf16 most
#   round to the same value), 1.5 in bf16 on the CPU's tiny models. The 44 real greedy forks of
#   prompt lookup vs the baseline in bf16 (128 tokens, 12 prompts, K 4 and 8) all lay within 2.2
#   units. ULPS is about 2.5x the worst measured disagreement, no more: at fp32 that is 7.6e-6 of
#   the logits' scale, far below any margin a bug would fork at (tests/test_lossless.py corrupts
#   every position of every prompt in fp32 and gets a violation each time).
ULPS = {torch.bfloat16: 8.0, torch.float16: 8.0, torch.float32: 64.0}


def tolerance(dtype: torch.dtype, scale: float) -> float:
    """The largest logit gap a rounding difference explains at this dtype and logit scale."""
    if dtype not in ULPS:
        raise ValueError(f"no lossless tolerance for dtype {dtype}: use one of {list(ULPS)}")
    return ULPS[dtype] * torch.finfo(dtype).eps * abs(scale)


def classify(fork_gap: float | None, tol: float) -> Verdict:
    """numerics when both forking tokens are within tol of the top logit; None: no fork pair."""
    return "numerics" if fork_gap is not None and fork_gap <= tol else "violation"


def first_diff(mine: list[int], ref: list[int]) -> int | None:
    """Index of the first differing token (the shorter length if one is a prefix), or None."""
    diff = next((i for i, (a, b) in enumerate(zip(mine, ref, strict=False)) if a != b), None)
    if diff is None and len(mine) != len(ref):
        diff = min(len(mine), len(ref))
    return diff


@torch.inference_mode()
def score_fork(
    target: LoadedModel, prompt_ids: list[int], mine: list[int], ref: list[int], diff: int
) -> dict[str, float | str | None]:
    """Margin, fork gap, tolerance and verdict at the first difference, on the reference prefix."""
    ids = torch.tensor([list(prompt_ids) + ref[:diff]], device=target.device)
    logits = target.model(input_ids=ids, logits_to_keep=1).logits[0, -1].float()
    top2 = logits.topk(2).values
    tol = tolerance(target.dtype, float(logits.abs().max()))
    gap = None
    if diff < len(mine) and diff < len(ref):
        # How far below the top the lower of the two forking tokens is: a near-tie at the top
        # excuses a flip between those two tokens only, never a third one.
        gap = float(top2[0] - torch.minimum(logits[mine[diff]], logits[ref[diff]]))
    return {"logit_margin": float(top2[0] - top2[1]), "fork_gap": gap, "tolerance": tol,
            "verdict": classify(gap, tol)}  # fmt: skip


_IDENTICAL: dict[str, float | str | None] = {"logit_margin": None, "fork_gap": None,
                                             "tolerance": None, "verdict": "identical"}  # fmt: skip


def lossless_check(target: LoadedModel, rows: pd.DataFrame, baseline: pd.DataFrame) -> pd.DataFrame:
    """Per prompt: identical?, first differing index, margin, fork gap, tolerance, verdict."""
    out = []
    base = baseline[baseline["repetition"] == 0].set_index("question_id")
    for row in rows[rows["repetition"] == 0].itertuples():
        if row.question_id not in base.index:
            raise ValueError(f"prompt {row.question_id} is not in the baseline's outputs")
        ref_row = base.loc[row.question_id]
        if list(ref_row["prompt_ids"]) != list(row.prompt_ids):
            raise ValueError(f"prompt {row.question_id}: prompt ids differ from the baseline's")
        ref, mine = list(ref_row["token_ids"]), list(row.token_ids)
        diff = first_diff(mine, ref)
        scored = _IDENTICAL if diff is None else score_fork(target, row.prompt_ids, mine, ref, diff)
        out.append({"question_id": row.question_id, "identical": diff is None,
                    "first_diff": diff, **scored})  # fmt: skip
    return pd.DataFrame(out, columns=list(LOSSLESS_COLUMNS))


class LosslessViolation(ValueError):
    """A lossless configuration's output forks from the baseline where rounding cannot explain."""


def check_verdicts(configuration: str, check: pd.DataFrame) -> None:
    """Raise LosslessViolation naming every violating prompt; return when there is none."""
    bad = check[check["verdict"] == "violation"]
    if bad.empty:
        return
    where = "; ".join(
        f"prompt {r.question_id} first differs at token {int(r.first_diff)}: margin "
        f"{r.logit_margin:.4g}, fork gap {_num(r.fork_gap)} vs tolerance {r.tolerance:.4g}"
        for r in bad.itertuples()
    )
    raise LosslessViolation(
        f"{configuration}: a lossless method does not reproduce the greedy baseline "
        f"({len(bad)} of {len(check)} prompts, beyond rounding): {where}"
    )


def _num(value: float | None) -> str:
    """A fork gap, or why there is none."""
    return "n/a (one output is a prefix of the other)" if pd.isna(value) else f"{value:.4g}"
