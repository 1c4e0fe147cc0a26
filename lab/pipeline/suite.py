"""Run one method over a prompt suite: warm-up, repetitions, profiling."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from lab.engine.caches import Engine
from lab.engine.model import LoadedModel
from lab.engine.records import PromptResult
from lab.engine.sampling import SamplingParams
from lab.engine.session import check_generation_args
from lab.method import DraftSource, Method, generate_one
from lab.pipeline import profiling
from lab.prompts import Prompt, encode

# The interleaved reference: every timed generation of a method is paired with a plain-decoding
# generation of the same prompt, run right before or after it (order random per prompt, half the
# prompts each way). A speed-up is the ratio within each pair, so a change of machine load between
# stages, or during one, moves both arms alike instead of going into the ratio. For the baseline
# itself the pair is A/A: the noise floor.
REFERENCE = Method()


def run(
    method: Method,
    target: LoadedModel | Engine,
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
    """Every prompt, `repetitions` times, each paired with a reference run; one row per pair.

    A row is the method's generation plus `ref_*` fields of its reference. profile_dir:
    torch.profiler over the timed method generations (not the warm-up), written there.
    """
    lm = target if isinstance(target, LoadedModel) else target.lm
    _check(prompts, lm, max_new_tokens)
    first = encode(prompts[0], lm.tokenizer)
    for _ in range(warmup):
        # First calls pay one-off allocation, dispatch and per-shape kernel set-up: both arms
        # run a full-length generation first, so they meet the step shapes they are timed on.
        for arm in (method, REFERENCE):
            generate_one(arm, target, draft, first, max_new_tokens, sampling, seed)
    # One flag per timed pair, True where the method runs first: half each way, shuffled.
    pairs = sum(len(p.turns) for p in prompts) * repetitions
    order = iter(np.random.default_rng(seed).permutation(np.arange(pairs) % 2 == 0).tolist())
    rows: list[dict[str, Any]] = []
    # The profile (opt-in, for diagnosis) spans both arms: a pair is one unit of work.
    with profiling.profiled(profile_dir, lm.device):
        for prompt in tqdm(prompts, desc=desc, unit="prompt"):
            answers: list[str] = []  # a later turn follows the method's own earlier answers
            for turn in range(len(prompt.turns)):
                ids = encode(prompt, lm.tokenizer, answers=answers)
                for rep in range(repetitions):
                    method_first = next(order)
                    result, ref = _pair(
                        method, target, draft, ids, max_new_tokens, sampling, seed, method_first
                    )
                    rows.append({"question_id": turn_id(prompt, turn), "category": prompt.category,
                                 "repetition": rep, **result.to_dict(), **_reference(ref),
                                 "method_first": method_first})  # fmt: skip
                    if rep == 0:
                        answers.append(result.text)
    return rows


def turn_id(prompt: Prompt, turn: int) -> str:
    """The id of one turn's generation: the question's id, then #2, #3 for later turns."""
    return str(prompt.question_id) if turn == 0 else f"{prompt.question_id}#{turn + 1}"


def positions(prompts: list[Prompt], lm: LoadedModel, max_new_tokens: int, k_max: int) -> int:
    """Cache positions enough for any turn of any prompt, its answer and one K+1 verify step."""
    longest = max(
        len(encode(p, lm.tokenizer, answers=[""] * turn)) + turn * max_new_tokens
        for p in prompts
        for turn in range(len(p.turns))
    )
    return longest + max_new_tokens + k_max + 1


def _check(prompts: list[Prompt], target: LoadedModel, max_new_tokens: int) -> None:
    """Every prompt fits the model, each turn counting every earlier answer at full length."""
    for prompt in prompts:
        for turn in range(len(prompt.turns)):
            # Empty answers give the template's tokens; each answer adds at most max_new_tokens.
            ids = encode(prompt, target.tokenizer, answers=[""] * turn)
            bound = ids + [0] * (turn * max_new_tokens)
            try:
                check_generation_args(target, max_new_tokens, bound)
            except ValueError as err:
                where = f"prompt {turn_id(prompt, turn)} ({prompt.category})"
                raise ValueError(f"{where}: {err}") from err


def _pair(
    method: Method,
    target: LoadedModel | Engine,
    draft: DraftSource,
    ids: list[int],
    max_new_tokens: int,
    sampling: SamplingParams,
    seed: int,
    method_first: bool,
) -> tuple[PromptResult, PromptResult]:
    """(method result, reference result), generated back to back in the given order."""

    def reference() -> PromptResult:
        return generate_one(REFERENCE, target, draft, ids, max_new_tokens, sampling, seed)

    ref = None if method_first else reference()
    result = generate_one(method, target, draft, ids, max_new_tokens, sampling, seed)
    return result, ref if ref is not None else reference()


def _reference(ref: PromptResult) -> dict[str, Any]:
    """What a pair keeps of its reference: its time, tokens and plain decode step time."""
    return {
        "ref_total_ms": ref.total_ms,
        "ref_new_tokens": ref.new_tokens,
        "ref_decode_ms": sum(s.verify_ms for s in ref.steps) / len(ref.steps)
        if ref.steps
        else None,
    }
