"""Perplexity of texts under a scoring model, with sliding windows for long texts."""

from __future__ import annotations

import math
from typing import Any

import pandas as pd
import torch
from tqdm import tqdm
from transformers import PreTrainedTokenizerBase

from lab.engine.model import LoadedModel
from lab.pipeline.store import Item


def check_window(window: int, stride: int) -> None:
    """A window must leave context: 0 < stride <= window."""
    if not (isinstance(window, int) and isinstance(stride, int) and 0 < stride <= window):
        raise ValueError(f"perplexity needs 0 < stride <= window, got window={window}, "
                         f"stride={stride}")  # fmt: skip


@torch.inference_mode()
def nll(
    lm: LoadedModel, ids: list[int], score_from: int, window: int, stride: int
) -> tuple[float, int]:
    """Summed negative log-likelihood of ids[score_from:] and how many tokens that is.

    Each window ends `stride` tokens after the previous one and reaches at most `window` tokens
    back, so every scored token sees at least window - stride tokens of context (the usual
    strided evaluation, as in the Hugging Face perplexity guide).
    """
    check_window(window, stride)
    total, count = 0.0, 0
    pos = max(score_from, 1)  # the first token has no context to be predicted from
    while pos < len(ids):
        end = min(pos + stride, len(ids))
        begin = max(0, end - window)
        chunk = torch.tensor([ids[begin:end]], device=lm.device)  # (1, n)
        logits = lm.model(input_ids=chunk).logits[0].float()  # (n, V)
        # Token t is predicted by the logits at t - 1.
        log_probs = torch.log_softmax(logits[pos - 1 - begin : end - 1 - begin], dim=-1)
        targets = chunk[0, pos - begin : end - begin]
        total -= float(log_probs.gather(1, targets[:, None]).sum())
        count += end - pos
        pos = end
    return total, count


def perplexity(total_nll: float, tokens: int) -> float:
    """exp(mean NLL); NaN when nothing was scored."""
    return math.exp(total_nll / tokens) if tokens else float("nan")


def continuation_ids(scorer: LoadedModel, prompt: str, text: str) -> tuple[list[int], int]:
    """Token ids of prompt + text under the scorer's tokenizer, and where text starts."""
    context = scorer.tokenizer.encode(prompt, add_special_tokens=False)
    continuation = scorer.tokenizer.encode(text, add_special_tokens=False)
    return context + continuation, len(context)


def reference_corpus(chars: int) -> str:
    """English text present on every Python install: CPython's own help topics (pydoc_data)."""
    from pydoc_data.topics import topics

    text = "\n\n".join(topics[name] for name in sorted(topics))
    if chars <= 0 or chars > len(text):
        raise ValueError(f"corpus_chars must be in 1..{len(text)}, got {chars}")
    return text[:chars]


def score_outputs(
    scorer: LoadedModel,
    items: list[Item],
    window: int,
    stride: int,
    prompt_tokenizer: PreTrainedTokenizerBase | None = None,
) -> pd.DataFrame:
    """Perplexity of each item's generated tokens given its prompt (repetition 0).

    prompt_tokenizer None: the scorer shares the generator's vocabulary and scores the token ids
    as generated. Otherwise the prompt is decoded with it and both texts re-tokenized.
    """
    rows, cache = [], {}
    for item in tqdm(items, desc="perplexity of outputs", unit="item"):
        for row in item.rows[item.rows["repetition"] == 0].itertuples():
            key = (tuple(row.prompt_ids), tuple(row.token_ids))
            if key not in cache:  # identical outputs (every lossless config) are scored once
                if prompt_tokenizer is None:
                    ids, start = [*row.prompt_ids, *row.token_ids], len(row.prompt_ids)
                else:
                    prompt = str(prompt_tokenizer.decode(list(row.prompt_ids)))
                    ids, start = continuation_ids(scorer, prompt, str(row.text))
                cache[key] = nll(scorer, ids, start, window, stride)
            total, count = cache[key]
            rows.append({"stage": item.path.parent.name, "item": item.path.name,
                         "question_id": row.question_id, "tokens": count,
                         "perplexity": perplexity(total, count)})  # fmt: skip
    return pd.DataFrame(rows)


def score_corpus(
    lm: LoadedModel, role: str, chars: int, window: int, stride: int
) -> dict[str, Any]:
    """Perplexity of the first `chars` characters of the reference corpus under lm."""
    ids = lm.tokenizer.encode(reference_corpus(chars))
    total, count = nll(lm, ids, 0, window, stride)
    return {"model": lm.name, "role": role, "tokens": count,
            "perplexity": perplexity(total, count)}  # fmt: skip
