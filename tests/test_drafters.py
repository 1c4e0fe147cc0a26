"""Every drafter under the exact policy reproduces the greedy baseline; prompt lookup's matching."""

from __future__ import annotations

import pytest
import torch

from lab.drafting.eagle import EagleDrafter
from lab.drafting.heads import EagleHead, MedusaHeads, ResBlock, choose_vocab, vocab_size
from lab.drafting.medusa import MedusaDrafter
from lab.drafting.prompt_lookup import PromptLookup, lookup
from lab.drafting.registry import drafter_settings
from lab.engine import loop
from lab.engine.controllers import FixedK
from lab.engine.drafter import Drafter
from lab.engine.loop import Speculation
from lab.engine.model import LoadedModel
from lab.engine.policies import get_policy
from lab.engine.sampling import Sampler, SamplingParams
from lab.method import Method, make_drafter

GREEDY = Sampler(SamplingParams(), seed=0, device=torch.device("cpu"))
N = 32  # new tokens per generation


def test_lookup_takes_the_latest_match_of_the_longest_ngram():
    assert lookup([1, 2, 3, 4, 5, 1, 2, 3], 2, 3) == [4, 5]
    # [1, 2, 3] occurs twice before the end: the latest (followed by 7) wins.
    assert lookup([1, 2, 3, 9, 1, 2, 3, 7, 1, 2, 3], 2, 3) == [7, 1]
    # No earlier [8, 9, 6] or [9, 6]: falls back to the 1-gram [6].
    assert lookup([5, 6, 7, 8, 9, 6], 2, 3) == [7, 8]
    # A longer n-gram beats a later shorter one: [2, 3] matches at 1, [3] alone at 4 later.
    assert lookup([1, 2, 3, 4, 3, 5, 2, 3], 3, 2) == [4, 3, 5]
    assert lookup([1, 2, 3, 4], 4, 3) == []
    assert lookup([7], 4, 3) == []
    # Near the end the continuation is shorter than k; it may run into the tail itself.
    assert lookup([1, 2, 1, 2], 5, 2) == [1, 2]
    assert lookup([4, 4, 4], 3, 1) == [4]


def test_lookup_on_repeating_text(llama):
    tokenizer = llama.tokenizer
    # Byte tokens: the last 3-gram " ad" last occurred in "x = add(", after "def add(".
    sequence = tokenizer.encode("def add(a, b):\n    return a + b\n\nx = add(1, 2)\ny = ad")
    proposal = PromptLookup(vocab_size(llama.model), 3).propose(sequence, 6, GREEDY, False)
    assert tokenizer.decode(proposal.tokens.tolist()) == "d(1, 2"


def test_prompt_lookup_probs_are_point_masses():
    drafter = PromptLookup(10, 2)
    proposal = drafter.propose([1, 2, 3, 1, 2], 2, GREEDY, True)
    assert proposal.tokens.tolist() == [3, 1]
    assert proposal.probs is not None and proposal.probs.shape == (2, 10)
    assert proposal.probs[0, 3] == 1 and proposal.probs.sum() == 2
    assert drafter.propose([1, 2, 3], 2, GREEDY, True).tokens.shape == (0,)


def medusa(lm: LoadedModel, num_heads: int, draft_vocab: int) -> MedusaHeads:
    """Freshly initialised heads with random (not identity) blocks."""
    torch.manual_seed(0)
    vocab = choose_vocab([torch.arange(50)], draft_vocab, vocab_size(lm.model))
    heads = MedusaHeads(lm.model.config.hidden_size, num_heads, vocab)
    for block in heads.blocks:
        assert isinstance(block, ResBlock)
        torch.nn.init.normal_(block.linear.weight, std=0.2)
    return heads.eval().requires_grad_(False)


def eagle(lm: LoadedModel, draft_vocab: int) -> EagleHead:
    torch.manual_seed(0)
    vocab = choose_vocab([torch.arange(50)], draft_vocab, vocab_size(lm.model))
    return EagleHead(lm.model.config, 32, vocab).eval().requires_grad_(False)


def drafters(lm: LoadedModel) -> dict[str, Drafter]:
    """Fresh drafters; the heads ones both with the full and a restricted draft vocabulary."""
    return {
        "prompt_lookup": PromptLookup(vocab_size(lm.model), 3),
        "medusa": MedusaDrafter(lm, medusa(lm, 3, 10_000)),
        "medusa_vocab64": MedusaDrafter(lm, medusa(lm, 5, 64)),
        "eagle": EagleDrafter(lm, eagle(lm, 10_000)),
        "eagle_vocab64": EagleDrafter(lm, eagle(lm, 64)),
    }


@pytest.mark.parametrize("model", ["qwen2", "llama"])
@pytest.mark.parametrize("k", [1, 2, 4, 7])
def test_greedy_equals_baseline(request, model, k, prompt_ids):
    lm = request.getfixturevalue(model)
    base = loop.generate(lm, prompt_ids, N)
    for name, drafter in drafters(lm).items():
        out = loop.generate(
            lm, prompt_ids, N, speculation=Speculation(drafter, get_policy("exact"), FixedK(k))
        )
        assert out.token_ids == base.token_ids, name
        assert all(s.proposed <= min(k, s.k) for s in out.steps)
        if isinstance(drafter, MedusaDrafter):
            assert max(s.proposed for s in out.steps) == min(k, drafter.heads.num_heads)


def test_rejection_sampling_greedy_equals_baseline(qwen2, prompt_ids):
    base = loop.generate(qwen2, prompt_ids, N)
    for name, drafter in drafters(qwen2).items():
        out = loop.generate(
            qwen2,
            prompt_ids,
            N,
            speculation=Speculation(drafter, get_policy("rejection"), FixedK(3)),
        )
        assert out.token_ids == base.token_ids, name


@pytest.mark.parametrize("name", ["prompt_lookup", "medusa_vocab64", "eagle_vocab64"])
def test_sampling_is_seeded(qwen2, prompt_ids, name):
    params = SamplingParams(temperature=0.9, top_k=40)
    policy = get_policy("rejection")
    runs = [
        loop.generate(
            qwen2,
            prompt_ids,
            N,
            params,
            seed,
            speculation=Speculation(drafters(qwen2)[name], policy, FixedK(3)),
        )  # fmt: skip
        for seed in (5, 5, 6)
    ]
    assert runs[0].token_ids == runs[1].token_ids != runs[2].token_ids


def test_prompt_lookup_without_match_is_a_decode_step(qwen2):
    ids = list(range(40, 60))  # no repeated token: nothing to look up at first
    out = loop.generate(
        qwen2,
        ids,
        12,
        speculation=Speculation(
            PromptLookup(vocab_size(qwen2.model)), get_policy("exact"), FixedK(4)
        ),
    )
    assert out.token_ids == loop.generate(qwen2, ids, 12).token_ids
    assert out.steps[0].proposed == 0 and out.steps[0].emitted == 1


def test_make_drafter_checks_what_it_runs_on(qwen2, qwen2_draft):
    heads = medusa(qwen2, 2, 100)
    assert isinstance(make_drafter(Method("medusa", k=2), qwen2, heads), MedusaDrafter)
    lookup_drafter = make_drafter(Method("prompt_lookup", drafter_params={"max_ngram": 2}),
                                  qwen2, None)  # fmt: skip
    assert isinstance(lookup_drafter, PromptLookup) and lookup_drafter.max_ngram == 2
    with pytest.raises(ValueError, match="drafter 'eagle' needs trained eagle heads"):
        make_drafter(Method("eagle"), qwen2, heads)
    with pytest.raises(ValueError, match="needs a draft model"):
        make_drafter(Method("draft_model"), qwen2, None)
    with pytest.raises(ValueError, match="unknown drafter 'nope': use one of draft_model"):
        make_drafter(Method("nope"), qwen2, qwen2_draft)


@pytest.mark.parametrize(
    "name,params,message",
    [
        ("prompt_lookup", {"max_ngram": 0}, "max_ngram must be an integer >= 1, got 0"),
        ("prompt_lookup", {"heads": "x"}, "has no setting heads; it takes max_ngram"),
        ("draft_model", {"k": 1}, "has no setting k; it takes no settings"),
        ("medusa", {"heads": 3}, "heads must be the folder of its trained heads"),
        ("eagle", {"heads": ""}, "drafter 'eagle': heads must be the folder"),
    ],
)
def test_drafter_settings_errors(name, params, message):
    with pytest.raises(ValueError, match=message):
        drafter_settings(name, **params)


def test_drafter_settings_defaults():
    assert drafter_settings("prompt_lookup") == {"max_ngram": 3}
    assert drafter_settings("medusa", heads="h") == {"heads": "h", "tree_size": 16}
    eagle = {"heads": None, "tree_size": 16, "depth": 5, "top_k": 4}
    assert drafter_settings("eagle") == eagle  # a path only matters for loading
