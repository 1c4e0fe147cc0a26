"""lab.pipeline.suite: interleaved reference pairs, balanced order, multi-turn prompts."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from lab.drafting.draft_model import DRAFT_STEP_SIZES
from lab.engine import loop
from lab.engine.caches import make_engine
from lab.engine.model import LoadedModel
from lab.engine.sampling import SamplingParams
from lab.method import Method
from lab.pipeline import suite
from lab.prompts import encode, load_suite, render

N = 10


@pytest.fixture(scope="module")
def mt_bench(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Spec-Bench-style file: one two-turn question (mt_bench style) and one single-turn."""
    path = tmp_path_factory.mktemp("mt") / "question.jsonl"
    lines = [
        {"question_id": 81, "category": "writing", "turns": ["Write a haiku.", "Now in French."]},
        {"question_id": 82, "category": "coding", "turns": ["Add two numbers in C."]},
    ]
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def test_pairs_follow_the_models_own_first_answer(
    qwen2: LoadedModel, qwen2_draft: LoadedModel, mt_bench: Path
) -> None:
    prompts = load_suite(str(mt_bench))
    method = Method("draft_model", "exact", 3)
    rows = suite.run(method, qwen2, qwen2_draft, prompts, N, SamplingParams(), 0, repetitions=2)
    # One row per turn and repetition; the second turn has its own id, the file's category.
    assert [(r["question_id"], r["repetition"]) for r in rows] == [
        ("81", 0), ("81", 1), ("81#2", 0), ("81#2", 1), ("82", 0), ("82", 1),
    ]  # fmt: skip
    assert [r["category"] for r in rows] == ["writing"] * 4 + ["coding"] * 2
    # Turn 2's input is turn 1 and the method's own answer to it, then the second question.
    answer = rows[0]["text"]
    assert rows[2]["prompt_ids"] == encode(prompts[0], qwen2.tokenizer, answers=[answer])
    # Half the pairs run the method first, half the reference.
    assert sum(r["method_first"] for r in rows) == 3
    # The reference is plain decoding of the same prompt: greedy, so the same tokens.
    for r in rows:
        assert r["ref_new_tokens"] == r["new_tokens"] == N and r["ref_total_ms"] > 0
        assert r["ref_decode_ms"] > 0
        plain = loop.generate(qwen2, r["prompt_ids"], N)
        assert plain.token_ids == r["token_ids"]


def test_render_with_answers_is_the_conversation(qwen2: LoadedModel) -> None:
    (prompt,) = [p for p in load_suite("builtin", per_category=1) if p.category == "code"]
    two = prompt.__class__(prompt.question_id, prompt.category, (*prompt.turns, "And in Go?"))
    text = render(two, qwen2.tokenizer, answers=["ANSWER ONE"])
    assert text.index(prompt.turns[0]) < text.index("ANSWER ONE") < text.index("And in Go?")
    plain = render(two, qwen2.tokenizer, use_chat_template=False, answers=["ANSWER ONE"])
    assert plain == f"{prompt.turns[0]}\n\nANSWER ONE\n\nAnd in Go?"
    with pytest.raises(ValueError, match="leave none to ask"):
        render(two, qwen2.tokenizer, answers=["a", "b"])


def test_a_later_turn_too_long_fails_before_any_generation(
    qwen2: LoadedModel, mt_bench: Path
) -> None:
    prompts = load_suite(str(mt_bench))
    limit = qwen2.model.config.max_position_embeddings
    # The first turn alone fits; with its answer at full length the second turn cannot.
    first = len(encode(prompts[0], qwen2.tokenizer))
    n = (limit - first) // 2 + 1
    assert first + n <= limit
    with pytest.raises(ValueError, match="prompt 81#2 .writing.: .*exceeds"):
        suite.run(Method(), qwen2, None, prompts, n, SamplingParams(), 0)


# "compiled" is the same StaticEngine with torch.compile'd steps (tests/test_engine.py compiles
# one); compiling both models here would cost about two minutes of CPU.
@pytest.mark.parametrize("kind", ["static"])
def test_fast_engines_for_target_and_draft_match_the_reference(
    qwen2: LoadedModel, qwen2_draft: LoadedModel, kind: str
) -> None:
    prompts = load_suite("builtin", categories=["code", "qa"], per_category=1)
    method = Method("draft_model", "exact", 3)
    reference = suite.run(method, qwen2, qwen2_draft, prompts, N, SamplingParams(), 0)
    max_len = suite.positions(prompts, qwen2, N, 3)
    target = make_engine(qwen2, kind, max_len, sizes=(1, 4))
    draft = make_engine(qwen2_draft, kind, max_len, sizes=DRAFT_STEP_SIZES)
    rows = suite.run(method, target, draft, prompts, N, SamplingParams(), 0)
    for fast, ref in zip(rows, reference, strict=True):
        # fp32: every engine gives the reference's tokens, drafts and acceptance, step by step.
        assert fast["token_ids"] == ref["token_ids"]
        assert [s["accepted"] for s in fast["steps"]] == [s["accepted"] for s in ref["steps"]]


def test_hidden_state_drafters_refuse_a_static_engine() -> None:
    from lab.pipeline import params as P
    from lab.pipeline import stage

    default = P.load()
    static = default.models.model_copy(update={"engine": "static"})
    params = default.model_copy(update={"models": static})
    eagle = Method("eagle", "exact", 4, drafter_params={"heads": "x"})
    with pytest.raises(ValueError, match="only the dynamic engine returns"):
        stage._generate(params, eagle, "", None)
