"""Is a lossless method's output the greedy baseline's? Per prompt, and where not, why not."""

from __future__ import annotations

import pandas as pd
import torch

from lab.engine.model import LoadedModel


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
