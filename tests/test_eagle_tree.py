"""EAGLE-2's dynamic draft tree: valid trees, scores equal to per-path chains, cache untouched."""

from __future__ import annotations

import copy
import dataclasses
from pathlib import Path

import pytest
import torch
import yaml
from torch.nn import functional as F
from transformers.cache_utils import DynamicLayer

from lab.drafting.eagle import EagleDrafter, keep_best
from lab.drafting.heads import DraftVocab, EagleHead, choose_vocab, vocab_size
from lab.drafting.registry import drafter_settings
from lab.engine import loop
from lab.engine.caches import DynamicEngine
from lab.engine.controllers import FixedK
from lab.engine.drafter import Proposal
from lab.engine.loop import Speculation
from lab.engine.model import LoadedModel
from lab.engine.policies import get_policy
from lab.engine.records import PromptResult
from lab.engine.sampling import Sampler, SamplingParams
from lab.pipeline import params as P
from tests.smoke import ROOT

GREEDY = Sampler(SamplingParams(), seed=0, device=torch.device("cpu"))
# (tree_size, depth, top_k): the default, a single node, one level, every node grown kept,
# and top_k 1 (a chain).
SHAPES = [(16, 5, 4), (1, 3, 2), (4, 1, 4), (30, 4, 3), (5, 5, 1)]


def make_head(lm: LoadedModel, draft_vocab: int) -> EagleHead:
    """A random head whose attention is sharp enough that a wrong mask or position shows."""
    torch.manual_seed(0)
    vocab = choose_vocab([torch.arange(50)], draft_vocab, vocab_size(lm.model))
    head = EagleHead(lm.model.config, 32, vocab)
    with torch.no_grad():
        for name, param in head.layer.named_parameters():
            if "q_proj.weight" in name or "k_proj.weight" in name:
                param.normal_(std=1.0)
    return head.eval().requires_grad_(False)


def start(lm: LoadedModel, drafters: list[EagleDrafter], prompt_ids: list[int]):
    """Prefill the target and the drafters; (engine, sequence, (T, H) features so far)."""
    engine = DynamicEngine(lm)
    logits, hidden = engine.start(prompt_ids, hidden=True)
    assert hidden is not None
    for drafter in drafters:
        drafter.start(prompt_ids)
        drafter.observe(hidden, 0)
    return engine, prompt_ids + [int(logits[-1].argmax())], hidden


def accept(engine: DynamicEngine, drafters: list[EagleDrafter], sequence: list[int],
           path: list[int]) -> tuple[list[int], torch.Tensor]:  # fmt: skip
    """Verify path as the loop does, accept all of it; (new sequence, its (len+1, H) features)."""
    ids = torch.tensor([sequence[-1:] + path])
    logits, hidden = engine.forward(ids, len(path) + 1, hidden=True)
    assert hidden is not None
    valid = len(sequence) + len(path)
    engine.rollback(valid)
    for drafter in drafters:
        drafter.observe(hidden, len(sequence) - 1)
        drafter.rollback(valid)
    return sequence + path + [int(logits[-1].argmax())], hidden


def path_to(parents: torch.Tensor, node: int) -> list[int]:
    """Node indices from the root's child down to node."""
    path = [node]
    while int(parents[path[-1]]) >= 0:
        path.append(int(parents[path[-1]]))
    return path[::-1]


def depths(parents: torch.Tensor) -> list[int]:
    return [len(path_to(parents, i)) for i in range(len(parents))]


def path_scores(drafter: EagleDrafter, features: torch.Tensor, sequence: list[int],
                tokens: torch.Tensor, parents: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """(N,) each node's path log-probability, its path run as a chain with no cache and no mask."""
    head, vocab, embed = drafter.head, drafter.vocab, drafter.embed
    index = vocab.index()
    last = len(sequence) - 2
    true_features = features[: last + 1]  # (last+1, H): entry t is (feature t, token t+1)
    true_next = embed(torch.tensor(sequence[1 : last + 2]))
    scores = []
    for node in range(len(tokens)):
        inputs, next_embeds, score = true_features, true_next, torch.tensor(0.0)
        for step in path_to(parents, node):
            predicted = head(inputs[None], next_embeds[None])[0, -1]  # (H,)
            log_probs = torch.log_softmax(vocab.logits(predicted).float(), dim=-1)
            score = score + log_probs[index[tokens[step]]]
            inputs = torch.cat([inputs, predicted[None]])
            next_embeds = torch.cat([next_embeds, embed(tokens[step].reshape(1))])
        scores.append(score)
    return torch.stack(scores)


def check_valid(tokens: torch.Tensor, parents: torch.Tensor, size: int, levels: int) -> None:
    """Topological, parents in range, at most size nodes and levels deep, distinct siblings."""
    assert tokens.shape == parents.shape and 1 <= len(tokens) <= size
    assert all(-1 <= int(p) < i for i, p in enumerate(parents))
    assert max(depths(parents)) <= levels
    children = {(int(p), int(t)) for p, t in zip(parents, tokens, strict=True)}
    assert len(children) == len(tokens), "two siblings carry the same token"


@pytest.mark.parametrize("model", ["llama", "qwen2"])
@pytest.mark.parametrize("shape", SHAPES)
@torch.no_grad()  # not inference_mode: a fixture first loaded in it breaks later autograd
def test_tree_scores_equal_per_path_chains(request, model, shape, prompt_ids):
    lm = request.getfixturevalue(model)
    tree_size, depth, top_k = shape
    drafter = EagleDrafter(lm, make_head(lm, 64), tree_size, depth, top_k)
    engine, sequence, features = start(lm, [drafter], prompt_ids)
    for _ in range(3):  # the first tree, then trees after accepted paths of the previous one
        tree = drafter.tree(sequence, depth)
        check_valid(tree.tokens, tree.parents, tree_size, depth)
        assert len(tree.tokens) == min(tree_size, top_k + (depth - 1) * top_k**2)
        expected = path_scores(drafter, features, sequence, tree.tokens, tree.parents)
        torch.testing.assert_close(tree.scores, expected, atol=1e-4, rtol=1e-4)
        deepest = max(range(len(tree.tokens)), key=lambda i: (depths(tree.parents)[i], -i))
        path = tree.tokens[path_to(tree.parents, deepest)].tolist()
        sequence, rows = accept(engine, [drafter], sequence, path)
        features = torch.cat([features[: len(sequence) - len(path) - 2], rows])


@torch.no_grad()
def test_one_child_per_node_is_the_greedy_chain(llama, prompt_ids):
    head = make_head(llama, 64)
    tree_drafter, chain = EagleDrafter(llama, head, 6, 6, 1), EagleDrafter(llama, head)
    engine, sequence, _ = start(llama, [tree_drafter, chain], prompt_ids)
    for k in (6, 3):
        tree = tree_drafter.tree(sequence, k)
        assert tree.parents.tolist() == list(range(-1, k - 1))
        proposal = chain.propose(sequence, k, GREEDY, False)
        assert tree.tokens.tolist() == proposal.tokens.tolist()
        sequence, _ = accept(engine, [tree_drafter, chain], sequence, tree.tokens[:2].tolist())


def cache_tensors(drafter: EagleDrafter) -> list[torch.Tensor]:
    tensors: list[torch.Tensor] = []
    for layer in drafter.cache.layers:
        assert isinstance(layer, DynamicLayer) and layer.keys is not None
        assert layer.values is not None
        tensors += [layer.keys, layer.values]
    return tensors


@pytest.mark.parametrize("model", ["llama", "qwen2"])
@torch.no_grad()
def test_draft_cache_keeps_only_true_entries(request, model, prompt_ids):
    lm = request.getfixturevalue(model)
    head = make_head(lm, 10_000)
    tree_drafter, chain = EagleDrafter(lm, head, 16, 5, 4), EagleDrafter(lm, head)
    engine, sequence, _ = start(lm, [tree_drafter, chain], prompt_ids)
    for accepted in (3, 0, 1):
        tree = tree_drafter.tree(sequence, 5)
        chain.propose(sequence, 1, GREEDY, False)  # takes in the true entries, drafts none
        assert tree_drafter.cache.get_seq_length() == len(sequence) - 1
        for mine, reference in zip(cache_tensors(tree_drafter), cache_tensors(chain), strict=True):
            assert torch.equal(mine, reference)
        deepest = path_to(tree.parents, int(torch.tensor(depths(tree.parents)).argmax()))
        path = tree.tokens[deepest[:accepted]].tolist()
        sequence, _ = accept(engine, [tree_drafter, chain], sequence, path)


def test_keep_best_keeps_parents_of_tied_children():
    # Node 1 (child of 0) and node 2 (child of 1) tie with their parents: a sort that is not
    # stable could keep node 2 without node 1.
    scores = torch.tensor([0.0, 0.0, 0.0, -0.5, -1.0])
    parents = torch.tensor([-1, 0, 1, -1, 3])
    keep, kept_parents = keep_best(scores, parents, 2)
    assert keep.tolist() == [0, 1] and kept_parents.tolist() == [-1, 0]
    keep, kept_parents = keep_best(scores, parents, 4)
    assert keep.tolist() == [0, 1, 2, 3] and kept_parents.tolist() == [-1, 0, 1, -1]
    assert keep_best(scores, parents, 9)[1].tolist() == [-1, 0, 1, -1, 3]
    keep, kept_parents = keep_best(scores[[3, 4, 0, 1]], torch.tensor([-1, 0, -1, 2]), 3)
    assert keep.tolist() == [0, 2, 3] and kept_parents.tolist() == [-1, -1, 1]


# --- end to end: greedy EAGLE-2 speculation equals the greedy baseline -------------------------

N = 32  # new tokens per generation


def fit_head(lm: LoadedModel, ids: list[int], steps: int) -> EagleHead:
    """A head taught (teacher forcing, as EAGLE trains) the target's features along ids."""
    torch.manual_seed(0)
    head = EagleHead(lm.model.config, 64, torch.arange(vocab_size(lm.model)))
    vocab, embed, tokens = (
        DraftVocab.of(lm.model, head.vocab),
        lm.model.get_input_embeddings(),
        torch.tensor(ids),
    )
    with torch.no_grad():  # entry t: (feature t, token t+1) -> feature t+1 and token t+2
        out = lm.model(input_ids=tokens[None, :-1], output_hidden_states=True)
        features, next_embeds = out.hidden_states[-1][0], embed(tokens[1:-1])  # (T-1, H), (T-2, H)
    optimizer = torch.optim.Adam(head.parameters(), lr=3e-3)
    for _ in range(steps):
        predicted = head(features[None, :-1], next_embeds[None])[0]  # (T-2, H)
        loss = F.cross_entropy(vocab.logits(predicted), tokens[2:])
        loss = loss + F.smooth_l1_loss(predicted, features[1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return head.eval().requires_grad_(False)


class Recording(EagleDrafter):
    """An EagleDrafter that keeps each step's proposal, to see which branches were accepted."""

    def __init__(self, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.proposals: list[tuple[int, Proposal]] = []

    def propose(self, sequence, k, sampler, want_probs):
        proposal = super().propose(sequence, k, sampler, want_probs)
        self.proposals.append((len(sequence), proposal))
        return proposal


def speculate(lm: LoadedModel, drafter: EagleDrafter, prompt_ids: list[int], n: int, k: int,
              params: SamplingParams | None = None, seed: int = 0) -> PromptResult:  # fmt: skip
    speculation = Speculation(drafter, get_policy("exact"), FixedK(k))
    return loop.generate(lm, prompt_ids, n, params, seed, speculation=speculation)


def side_branches(drafter: Recording, sequence: list[int]) -> int:
    """Accepted nodes that are not their parent's likeliest child (a chain never drafts them)."""
    count = 0
    for length, proposal in drafter.proposals:
        assert proposal.parents is not None
        tokens, parents = proposal.tokens.tolist(), proposal.parents.tolist()
        node, position = -1, length
        while position < len(sequence):
            kids = [i for i, p in enumerate(parents) if p == node]
            child = next((i for i in kids if tokens[i] == sequence[position]), None)
            if child is None:
                break
            count += child != kids[0]  # children come likeliest first
            node, position = child, position + 1
    return count


@pytest.mark.parametrize("model", ["llama", "qwen2"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_tree_equals_baseline(request, model, shape, k, prompt_ids):
    lm = request.getfixturevalue(model)
    base = loop.generate(lm, prompt_ids, N)
    for draft_vocab in (64, 10_000):
        drafter = EagleDrafter(lm, make_head(lm, draft_vocab), *shape)
        out = speculate(lm, drafter, prompt_ids, N, k)
        assert out.token_ids == base.token_ids, draft_vocab
        assert all(s.depth <= min(k, shape[1]) and s.proposed <= shape[0] for s in out.steps)


@pytest.mark.parametrize("model", ["llama", "qwen2"])
def test_trained_tree_accepts_side_branches_and_equals_baseline(request, model, prompt_ids):
    lm = request.getfixturevalue(model)
    base = loop.generate(lm, prompt_ids, 48)
    head = fit_head(lm, prompt_ids + base.token_ids, 30)  # good, not perfect: trees help
    drafter = Recording(lm, head, 16, 5, 4)
    out = speculate(lm, drafter, prompt_ids, 48, 5)
    assert out.token_ids == base.token_ids
    assert out.mean_accepted_length is not None and out.mean_accepted_length > 2.5
    assert side_branches(drafter, prompt_ids + base.token_ids) > 0


@pytest.mark.parametrize("model", ["llama", "qwen2"])
def test_eos_inside_an_accepted_branch(request, model, prompt_ids):
    lm = request.getfixturevalue(model)
    free = loop.generate(lm, prompt_ids, 48)
    head = fit_head(lm, prompt_ids + free.token_ids, 100)
    cut_inside = False
    for eos in dict.fromkeys(free.token_ids[4:16]):  # stop tokens met at different steps
        stopped = dataclasses.replace(lm, eos_token_ids=(eos,))
        base = loop.generate(stopped, prompt_ids, 48)
        out = speculate(stopped, EagleDrafter(stopped, head, 16, 5, 4), prompt_ids, 48, 5)
        assert out.token_ids == base.token_ids and out.stop_reason == "eos"
        last = out.steps[-1] if out.steps else None  # none when the first token is the EOS
        cut_inside |= last is not None and last.emitted < last.accepted + 1
    assert cut_inside  # some run stopped at an EOS with accepted nodes after it


def test_sampling_is_seeded_and_rejection_is_refused(qwen2, prompt_ids):
    head = make_head(qwen2, 64)
    params = SamplingParams(temperature=0.9, top_k=40)
    runs = [speculate(qwen2, EagleDrafter(qwen2, head, 16, 5, 4), prompt_ids, N, 4, params, seed)
            for seed in (5, 5, 6)]  # fmt: skip
    assert runs[0].token_ids == runs[1].token_ids != runs[2].token_ids
    speculation = Speculation(EagleDrafter(qwen2, head, 16), get_policy("rejection"), FixedK(4))
    with pytest.raises(ValueError, match="use the exact policy"):
        loop.generate(qwen2, prompt_ids, N, params, speculation=speculation)


@pytest.mark.parametrize(
    ("settings", "message"),
    [
        ({"depth": 0}, "depth must be an integer >= 1, got 0"),
        ({"top_k": True}, "top_k must be an integer >= 1, got True"),
        ({"tree_size": 0}, "tree_size must be null .* from 1 to 68 .* got 0"),
        ({"tree_size": 11, "depth": 2, "top_k": 2}, ".*from 1 to 6 .*depth 2 and top_k 2.* got 11"),
        ({"tree_size": "16"}, "tree_size must be null"),
    ],
)
def test_tree_settings_are_checked(settings, message):
    with pytest.raises(ValueError, match=f"drafter 'eagle': {message}"):
        drafter_settings("eagle", **settings)
    assert drafter_settings("eagle", tree_size=None)["tree_size"] is None  # a chain


def test_top_k_beyond_the_draft_vocabulary_is_refused(llama):
    with pytest.raises(ValueError, match="top_k 65 exceeds the 64-token draft vocabulary"):
        EagleDrafter(llama, make_head(llama, 64), 16, 2, 65)


def test_params_yaml_eagle_tree(tmp_path: Path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    settings = P.load(ROOT / "params.yaml").drafters.settings("eagle")
    assert {key: settings[key] for key in ("tree_size", "depth", "top_k")} == {
        "tree_size": 4, "depth": 5, "top_k": 4,
    }  # fmt: skip
    bad = copy.deepcopy(raw)
    bad["drafters"]["params"]["eagle"]["top_k"] = 0
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(bad, sort_keys=False))
    with pytest.raises(P.ParamsError, match=r"drafters\.params\.eagle.*top_k must be an integer"):
        P.load(path)
