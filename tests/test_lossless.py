"""The lossless check: fp32 bit-exact, rounding-level forks excused in bf16, bugs never excused."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from lab import models
from lab.engine.model import LoadedModel
from lab.engine.sampling import SamplingParams
from lab.method import DraftSource, Method, generate_one
from lab.pipeline import params as P
from lab.pipeline import stage, store
from lab.pipeline.lossless import (
    VERDICTS,
    LosslessViolation,
    check_verdicts,
    classify,
    lossless_check,
    tolerance,
)
from lab.prompts import encode, load_suite
from lab.report.load import ReportError
from lab.report.sections import LOSSLESS_VERDICTS, lossless_table
from tests.smoke import ROOT, smoke_params

PROMPTS = load_suite("builtin", per_category=1)
NEW_TOKENS = 12
GREEDY = SamplingParams(0.0, 0, 1.0)


def _outputs(lm: LoadedModel, method: Method, draft: DraftSource = None) -> pd.DataFrame:
    """One greedy generation per prompt, in the columns lossless_check reads."""
    rows = []
    for prompt in PROMPTS:
        ids = encode(prompt, lm.tokenizer)
        result = generate_one(method, lm, draft, ids, NEW_TOKENS, GREEDY, seed=0)
        rows.append({"question_id": str(prompt.question_id), "repetition": 0,
                     "prompt_ids": ids, "token_ids": result.token_ids})  # fmt: skip
    return pd.DataFrame(rows)


_BASELINES: dict[str, pd.DataFrame] = {}


def _baseline(lm: LoadedModel) -> pd.DataFrame:
    """The greedy baseline of a model, generated once per dtype."""
    key = f"{lm.name}/{lm.dtype}"
    if key not in _BASELINES:
        _BASELINES[key] = _outputs(lm, Method())
    return _BASELINES[key]


@pytest.fixture(scope="module")
def qwen2_bf16() -> LoadedModel:
    return models.load("tiny-random-qwen2", device="cpu", dtype="bfloat16")


@torch.inference_mode()
def _logits(lm: LoadedModel, ids: list[int]) -> torch.Tensor:
    """Brute force: the target's fp32-cast logits for the token after ids."""
    out = lm.model(input_ids=torch.tensor([ids]), logits_to_keep=1).logits[0, -1]
    return out.float()


def _with(row: pd.Series, tokens: list[int], qid: str) -> dict[str, object]:
    return {"question_id": qid, "repetition": 0, "prompt_ids": row["prompt_ids"],
            "token_ids": tokens}  # fmt: skip


# --- the tolerance -------------------------------------------------------------------------------


def test_tolerance_is_ulps_at_the_logit_scale() -> None:
    # By hand, at scale 16: 8 * 2^-7 * 16 = 1 (bf16); 8 * 2^-10 * 16 = 1/8 (fp16);
    # 64 * 2^-23 * 16 = 2^-13 (fp32). The sign of the largest logit does not matter.
    assert tolerance(torch.bfloat16, 16.0) == 1.0
    assert tolerance(torch.float16, -16.0) == 0.125
    assert tolerance(torch.float32, 16.0) == 2.0**-13
    with pytest.raises(ValueError, match="no lossless tolerance for dtype torch.float64"):
        tolerance(torch.float64, 1.0)


def test_classify_at_the_boundary() -> None:
    assert classify(0.0, 0.0) == "numerics"  # an exact tie flips either way
    assert classify(1.0, 1.0) == "numerics"
    assert classify(1.0 + 1e-9, 1.0) == "violation"
    assert classify(None, 1.0) == "violation"  # one output a prefix of the other: no fork pair


# --- fp32: bit-exact, and no bug excused ---------------------------------------------------------


@pytest.mark.parametrize("name", ["qwen2", "llama"])
def test_fp32_speculative_is_identical(name: str, request: pytest.FixtureRequest) -> None:
    target = request.getfixturevalue(name)
    draft = request.getfixturevalue(f"{name}_draft")
    base = _baseline(target)
    for method, source in ((Method("prompt_lookup", "exact", 4), None),
                           (Method("draft_model", "exact", 4), draft)):  # fmt: skip
        check = lossless_check(target, _outputs(target, method, source), base)
        assert list(check["verdict"]) == ["identical"] * len(PROMPTS), method
        assert check["identical"].all() and check["first_diff"].isna().all()
        check_verdicts("ksweep/k4", check)  # nothing to raise


@pytest.mark.parametrize("name", ["qwen2", "llama"])
def test_fp32_never_excuses_a_runner_up_anywhere(name: str, request: pytest.FixtureRequest) -> None:
    # The most excusable bug: at one position, the target's second choice instead of its first.
    # Planted at every position of every prompt, fp32's tolerance excuses none of them.
    target = request.getfixturevalue(name)
    base = _baseline(target)
    rows, refs = [], []
    for _, row in base.iterrows():
        ref = list(row["token_ids"])
        for d in range(len(ref)):
            runner_up = int(_logits(target, row["prompt_ids"] + ref[:d]).topk(2).indices[1])
            qid = f"{row['question_id']}@{d}"
            rows.append(_with(row, ref[:d] + [runner_up] + ref[d + 1 :], qid))
            refs.append(_with(row, ref, qid))
    check = lossless_check(target, pd.DataFrame(rows), pd.DataFrame(refs))
    assert len(check) == len(PROMPTS) * NEW_TOKENS
    assert (check["verdict"] == "violation").all()
    assert list(check["first_diff"]) == [int(q.split("@")[1]) for q in check["question_id"]]
    assert (check["logit_margin"] > 10 * check["tolerance"]).all()  # far from the boundary


def test_corrupted_outputs_are_violations_at_the_right_token(qwen2: LoadedModel) -> None:
    base = _baseline(qwen2)
    row = base.iloc[0]
    ref = list(row["token_ids"])
    # Inputs whose first differing index is worked out by hand from ref.
    dropped = ref[:3] + ref[4:]  # an accepted token lost: differs at 3 unless ref[3] == ref[4]
    drop_at = next(i for i in range(3, len(ref) - 1) if ref[i + 1] != ref[i])
    repeated = ref[:5] + [ref[4]] + ref[5:-1]  # an off-by-one: token 4 emitted twice
    repeat_at = (
        5 if ref[5] != ref[4] else next(i for i in range(6, len(ref)) if ref[i] != ref[i - 1])
    )
    changed = ref[:7] + [(ref[7] + 1) % len(qwen2.tokenizer)] + ref[8:]
    cases = {"dropped": (dropped, drop_at), "repeated": (repeated, repeat_at),
             "changed": (changed, 7), "truncated": (ref[:9], 9)}  # fmt: skip
    frame = pd.DataFrame([_with(row, tokens, qid) for qid, (tokens, _) in cases.items()])
    refs = pd.DataFrame([_with(row, ref, qid) for qid in cases])
    check = lossless_check(qwen2, frame, refs).set_index("question_id")
    for qid, (_, at) in cases.items():
        assert check.loc[qid, "verdict"] == "violation", qid
        assert check.loc[qid, "first_diff"] == at and not check.loc[qid, "identical"], qid
    assert pd.isna(check.loc["truncated", "fork_gap"])  # no token of the method's at index 9


def test_margin_is_scored_on_the_reference_prefix(qwen2: LoadedModel) -> None:
    row = _baseline(qwen2).iloc[1]
    ref, d = list(row["token_ids"]), 6
    wrong = (ref[d] + 3) % len(qwen2.tokenizer)
    frame = pd.DataFrame([_with(row, ref[:d] + [wrong] + ref[d + 1 :], "q")])
    check = lossless_check(qwen2, frame, pd.DataFrame([_with(row, ref, "q")])).iloc[0]
    # Brute force: one forward over the whole reference, every position's logits, Python sort.
    with torch.inference_mode():
        full = qwen2.model(input_ids=torch.tensor([row["prompt_ids"] + ref])).logits[0].float()
    logits = full[len(row["prompt_ids"]) + d - 1].tolist()  # the position that predicts token d
    first, second = sorted(logits, reverse=True)[:2]
    assert check["logit_margin"] == pytest.approx(first - second, abs=1e-5)
    assert check["fork_gap"] == pytest.approx(first - min(logits[ref[d]], logits[wrong]), abs=1e-5)
    assert check["tolerance"] == pytest.approx(64 * 2.0**-23 * max(map(abs, logits)), rel=1e-5)


# --- bf16: a near-tie is numerics, but only between the tied tokens ------------------------------


def _near_tie(lm: LoadedModel) -> tuple[pd.Series, int, torch.Tensor]:
    """The first (prompt, position) of the baseline where top-1/top-2 is within bf16's tolerance."""
    for _, row in _baseline(lm).iterrows():
        ref = list(row["token_ids"])
        for d in range(len(ref)):
            logits = _logits(lm, row["prompt_ids"] + ref[:d])
            top = logits.topk(2).values
            if top[0] - top[1] <= 8 * 2.0**-7 * logits.abs().max():  # by hand, not tolerance()
                return row, d, logits
    raise AssertionError("no near-tie in the bf16 baseline")


def test_bf16_near_tie_flip_is_numerics(qwen2_bf16: LoadedModel) -> None:
    row, d, logits = _near_tie(qwen2_bf16)
    ref = list(row["token_ids"])
    ranked = logits.argsort(descending=True).tolist()
    other = ranked[1] if ranked[0] == ref[d] else ranked[0]  # the other of the tied pair
    far = ranked[-1]  # the target's last choice at the same near-tie
    frame = pd.DataFrame(
        [_with(row, ref[:d] + [other], "flip"), _with(row, ref[:d] + [far], "far")]
    )
    refs = pd.DataFrame([_with(row, ref, "flip"), _with(row, ref, "far")])
    check = lossless_check(qwen2_bf16, frame, refs).set_index("question_id")
    assert check.loc["flip", "verdict"] == "numerics" and check.loc["flip", "first_diff"] == d
    assert check.loc["flip", "fork_gap"] <= check.loc["flip", "tolerance"]
    # Same position, same small margin: a third token is no rounding flip.
    assert check.loc["far", "logit_margin"] <= check.loc["far", "tolerance"]
    assert check.loc["far", "verdict"] == "violation"
    check_verdicts("ksweep/k4", check.loc[["flip"]].reset_index())  # numerics never fails a stage


def test_bad_input_names_the_prompt(qwen2: LoadedModel) -> None:
    base = _baseline(qwen2)
    other = base.iloc[[0]].assign(question_id="nope")
    with pytest.raises(ValueError, match="prompt nope is not in the baseline's outputs"):
        lossless_check(qwen2, other, base)
    shifted = base.iloc[[0]].copy()
    shifted.at[shifted.index[0], "prompt_ids"] = shifted.iloc[0]["prompt_ids"][1:]
    qid = shifted.iloc[0]["question_id"]
    with pytest.raises(ValueError, match=f"prompt {qid}: prompt ids differ from the baseline's"):
        lossless_check(qwen2, shifted, base)


# --- a violation fails the stage -----------------------------------------------------------------

CHECK = pd.DataFrame({
    "question_id": ["1", "2", "3"], "identical": [True, False, False],
    "first_diff": [None, 4, 7], "logit_margin": [None, 0.01, 0.5],
    "fork_gap": [None, 0.01, 0.75], "tolerance": [None, 0.02, 0.02],
    "verdict": ["identical", "numerics", "violation"],
})  # fmt: skip


def test_check_verdicts_names_configuration_prompt_token_and_numbers() -> None:
    with pytest.raises(LosslessViolation) as err:
        check_verdicts("ksweep/k4", CHECK)
    assert str(err.value) == (
        "ksweep/k4: a lossless method does not reproduce the greedy baseline (1 of 3 prompts, "
        "beyond rounding): prompt 3 first differs at token 7: margin 0.5, fork gap 0.75 vs "
        "tolerance 0.02"
    )
    check_verdicts("ksweep/k4", CHECK.iloc[:2])  # identical and numerics pass


def test_stage_raises_on_a_violation(qwen2: LoadedModel) -> None:
    # The target as the method ran it (here the fp32 qwen2 fixture) scores the forks.
    overrides = {"models": {"dtype": "float32"}}
    raw = smoke_params(yaml.safe_load((ROOT / "params.yaml").read_text()), overrides)
    params = P.Params.model_validate(raw)
    base = _baseline(qwen2)
    item = store.Item(Path("baseline/target"), {}, base, pd.DataFrame(), {})
    method = Method("prompt_lookup", "exact", 4)
    check = stage._lossless(params, method, base, item, "ksweep/k4", qwen2)
    assert check is not None and (check["verdict"] == "identical").all()
    broken = base.copy()
    broken.at[broken.index[2], "token_ids"] = base.iloc[2]["token_ids"][:5]
    qid = base.iloc[2]["question_id"]
    with pytest.raises(LosslessViolation, match=f"^ksweep/k4: .* prompt {qid} first differs at "):
        stage._lossless(params, method, broken, item, "ksweep/k4", qwen2)


# --- files and the report ------------------------------------------------------------------------


def test_columns_and_verdicts_agree_everywhere(qwen2: LoadedModel) -> None:
    base = _baseline(qwen2)
    assert tuple(lossless_check(qwen2, base, base).columns) == store.LOSSLESS_COLUMNS
    assert LOSSLESS_VERDICTS == VERDICTS  # the torch-free report keeps its own copy


def test_report_counts_each_verdict() -> None:
    shown = lossless_table({"ksweep/k4": CHECK}).shown.iloc[0]
    assert (shown["identical"], shown["numerics"], shown["violation"]) == ("1", "1", "1")
    assert shown["differing prompts"] == (
        "2 at token 4: numerics (gap 0.01, tolerance 0.02, margin 0.01); "
        "3 at token 7: violation (gap 0.75, tolerance 0.02, margin 0.50)"
    )
    with pytest.raises(ReportError, match=r"ksweep/k4: .* unknown verdicts \['differs'\]"):
        lossless_table({"ksweep/k4": CHECK.assign(verdict="differs")})
