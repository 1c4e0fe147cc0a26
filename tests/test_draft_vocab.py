"""A draft narrower than its target (the target's extra rows are padding, as Qwen2.5-7B's are
against the 0.5B's): the draft clamps the target's padding ids and pads its logits."""

from __future__ import annotations

import copy
from dataclasses import replace

import pytest
import torch

from lab import models
from lab.drafting.draft_model import DraftModel
from lab.engine import caches, loop
from lab.engine.controllers import FixedK
from lab.engine.loop import Speculation
from lab.engine.model import LoadedModel
from lab.engine.policies import get_policy
from lab.engine.sampling import SamplingParams
from lab.method import Method, generate_one, make_drafter
from lab.models import random as random_models

N = 40
PAD = 64


@pytest.fixture(scope="module")
def wide(qwen2: LoadedModel, prompt_ids: list[int]) -> LoadedModel:
    """qwen2 with PAD padding rows, one of them winning where token 169 would (seen: 6 times)."""
    model = copy.deepcopy(qwen2.model)
    vocab = model.config.vocab_size
    torch.manual_seed(0)
    model.resize_token_embeddings(vocab + PAD, mean_resizing=False)
    with torch.no_grad():
        model.lm_head.weight[vocab + 5] = 1.05 * model.lm_head.weight[169]
    return replace(qwen2, model=model)


@pytest.fixture(scope="module")
def base(wide: LoadedModel, qwen2: LoadedModel, prompt_ids: list[int]) -> list[int]:
    tokens = loop.generate(wide, prompt_ids, N).token_ids
    # The point of the fixture: the target emits ids the draft has no row for.
    assert any(t >= qwen2.model.config.vocab_size for t in tokens)
    return tokens


def _spec(drafter, policy: str = "exact", k: int = 3) -> Speculation:
    return Speculation(drafter, get_policy(policy), FixedK(k))


def test_the_draft_cannot_embed_the_targets_padding_ids(qwen2_draft, base):
    # What crashed the 7B + 0.5B GPU run (a device-side assert there): hence the clamp.
    with pytest.raises(IndexError):
        qwen2_draft.model(input_ids=torch.tensor([[max(base)]]))


@pytest.mark.parametrize("policy", ["exact", "rejection"])
@pytest.mark.parametrize("engine", ["dynamic", "static"])
def test_narrow_draft_is_lossless_against_a_padded_target(
    wide, qwen2_draft, prompt_ids, base, policy, engine
):
    width = wide.model.config.vocab_size
    target = caches.make_engine(wide, engine, caches.cache_length([prompt_ids], N, 3), (1, 4))
    out = loop.generate(
        target, prompt_ids, N, speculation=_spec(DraftModel(qwen2_draft, width), policy)
    )
    assert out.token_ids == base


def test_padded_draft_probabilities_have_the_targets_width(wide, qwen2_draft, prompt_ids):
    # Sampling: rejection sampling compares the draft's and the target's rows position by position.
    params = SamplingParams(temperature=1.0)
    method = Method("draft_model", policy="rejection", k=3)
    out = generate_one(method, wide, qwen2_draft, prompt_ids, N, params, seed=0)
    assert len(out.token_ids) == N
    drafter = make_drafter(method, wide, qwen2_draft)
    assert isinstance(drafter, DraftModel) and drafter.pad == PAD


def test_method_runner_drafts_for_a_padded_target(wide, qwen2_draft, prompt_ids, base):
    for method, reference in (
        (Method("draft_model", k=4), None),
        (Method("controlled", k=4, drafter_params={"acceptance": 0.7}), {tuple(prompt_ids): base}),
    ):
        drafter = make_drafter(method, wide, qwen2_draft, reference=reference)
        out = loop.generate(wide, prompt_ids, N, speculation=_spec(drafter, k=4))
        assert out.token_ids == base


def test_a_draft_wider_than_its_target_is_refused(wide, qwen2):
    with pytest.raises(ValueError, match="narrower than its target, not wider"):
        DraftModel(wide, qwen2.model.config.vocab_size)


def test_pair_check_accepts_fewer_padding_rows_only():
    tokens = {"a": 0, "b": 1, "c": 2}
    narrow, padded = models.Vocabulary(tokens, 3), models.Vocabulary(tokens, 8)
    models.compare_vocabularies("t", padded, "d", narrow)
    with pytest.raises(models.ModelError, match="vocab_size 3 vs 8"):
        models.compare_vocabularies("t", narrow, "d", padded)
    with pytest.raises(models.ModelError, match="entries differ"):
        models.compare_vocabularies("t", padded, "d", models.Vocabulary({"a": 0, "x": 1}, 3))
    random_models.check_pair("random-qwen2.5-7b", "random-qwen2.5-0.5b")
