"""Token-tree speculation: the tree mask, cache compaction, tree policies and Medusa's tree.

The central check is the chain's: greedy tree speculation emits the greedy baseline token for
token, whatever the tree holds (shapes, decoys, duplicates, EOS inside the accepted branch).
"""

from __future__ import annotations

import copy
import dataclasses
import inspect
import random
from pathlib import Path

import pytest
import torch
import yaml

from lab.drafting.heads import vocab_size
from lab.drafting.medusa import MC_SIM_7B_63, MedusaDrafter, candidate_paths
from lab.drafting.registry import drafter_settings
from lab.engine import caches, loop, policies, tree
from lab.engine.controllers import FixedK
from lab.engine.drafter import Proposal
from lab.engine.loop import Speculation
from lab.engine.model import LoadedModel
from lab.engine.policies import get_policy, make_policy
from lab.engine.records import PromptResult
from lab.engine.sampling import Sampler, SamplingParams
from lab.pipeline import params as P
from tests.smoke import ROOT
from tests.test_drafters import medusa as medusa_heads
from tests.test_policies import total_variation

N = 32  # new tokens per generation
CPU = torch.device("cpu")
GREEDY = Sampler(SamplingParams(), seed=0, device=CPU)


# --- a test-only drafter: arbitrary trees, with the true continuation in some branch or not ----


def star(truth: list[int], k: int, rng: random.Random, vocab: int) -> tuple[list[int], list[int]]:
    """Eight children of the root; one holds the true next token (half of the time)."""
    tokens = [rng.randrange(vocab) for _ in range(8)]
    if rng.random() < 0.5:
        tokens[rng.randrange(8)] = truth[0]
    return tokens, [-1] * 8


def deep(truth: list[int], k: int, rng: random.Random, vocab: int) -> tuple[list[int], list[int]]:
    """A decoy chain and the true chain (cut at a random depth), in either order."""
    decoy = [(t + 1) % vocab for t in truth[:k]]
    true = truth[: rng.randint(1, k)]
    tokens: list[int] = []
    parents: list[int] = []
    for branch in (decoy, true) if rng.random() < 0.5 else (true, decoy):
        start = len(tokens)
        tokens += branch
        parents += [-1] + list(range(start, start + len(branch) - 1))
    return tokens, parents


def chain(truth: list[int], k: int, rng: random.Random, vocab: int) -> tuple[list[int], list[int]]:
    """The true continuation as a one-child-per-node tree, wrong from a random point on."""
    good = rng.randint(0, k)
    tokens = truth[:good] + [(t + 1) % vocab for t in truth[good:k]]
    return tokens, list(range(-1, len(tokens) - 1))


def random_tree(
    truth: list[int], k: int, rng: random.Random, vocab: int
) -> tuple[list[int], list[int]]:
    """Up to 12 nodes under random parents, few token values (duplicate siblings happen); the
    true continuation is grafted along one random root-to-node path most of the time."""
    parents: list[int] = []
    node_depths: list[int] = []
    for _ in range(rng.randint(1, 12)):
        options = [-1] + [i for i, d in enumerate(node_depths) if d < k]
        parent = rng.choice(options)
        parents.append(parent)
        node_depths.append(1 if parent < 0 else node_depths[parent] + 1)
    tokens = [rng.choice(truth[:3] + [rng.randrange(vocab)]) for _ in parents]
    if rng.random() < 0.8:
        for depth, node in enumerate(tree.path_to(parents, rng.randrange(len(parents)))):
            tokens[node] = truth[depth]
    return tokens, parents


SHAPES = {"chain": chain, "star": star, "deep": deep, "random": random_tree}


class TreeDrafter:
    """Proposes trees of one shape around the target's known greedy continuation."""

    needs_hidden = False

    def __init__(self, reference: list[int], shape: str, vocab: int, seed: int = 0) -> None:
        self.reference, self.shape, self.vocab = reference, SHAPES[shape], vocab
        self.rng = random.Random(seed)
        self.prompt_len = 0

    def start(self, prompt_ids: list[int]) -> None:
        self.prompt_len = len(prompt_ids)

    def propose(self, sequence: list[int], k: int, sampler: Sampler, want_probs: bool) -> Proposal:
        done = len(sequence) - self.prompt_len
        # Past the known continuation the "truth" is arbitrary: the tree is then all decoys.
        truth = self.reference[done : done + k] + [0] * k
        tokens, parents = self.shape(truth, k, self.rng, self.vocab)
        return Proposal(torch.tensor(tokens), None, torch.tensor(parents))

    def observe(self, hidden_states: torch.Tensor, start: int) -> None:
        """Reads no hidden states."""

    def rollback(self, length: int) -> None:
        """Keeps no per-step state."""


class Recording(TreeDrafter):
    """A TreeDrafter that asks for the target's hidden states and keeps what it is shown."""

    needs_hidden = True

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.seen: dict[int, torch.Tensor] = {}

    def observe(self, hidden_states: torch.Tensor, start: int) -> None:
        for offset, row in enumerate(hidden_states):
            self.seen[start + offset] = row
        self.seen = {p: r for p, r in self.seen.items() if p < start + len(hidden_states)}

    def rollback(self, length: int) -> None:
        self.seen = {p: r for p, r in self.seen.items() if p < length}


def run(lm: LoadedModel | caches.Engine, drafter, ids: list[int], n: int, k: int = 4,
        policy: str = "exact", params: SamplingParams | None = None,
        seed: int = 0) -> PromptResult:  # fmt: skip
    spec = Speculation(drafter, get_policy(policy), FixedK(k))
    return loop.generate(lm, ids, n, params, seed, speculation=spec)


# --- greedy tree speculation equals the greedy baseline ---------------------------------------


@pytest.mark.parametrize("model", ["llama", "qwen2"])
@pytest.mark.parametrize("shape", list(SHAPES))
@pytest.mark.parametrize("k", [1, 3, 6])
def test_greedy_tree_equals_baseline(request, model, shape, k, prompt_ids):
    lm = request.getfixturevalue(model)
    base = loop.generate(lm, prompt_ids, N)
    vocab = vocab_size(lm.model)
    for seed in range(2):
        out = run(lm, TreeDrafter(base.token_ids, shape, vocab, seed), prompt_ids, N, k)
        assert out.token_ids == base.token_ids, (shape, seed)
        assert out.new_tokens == 1 + sum(s.emitted for s in out.steps)
        for s in out.steps:
            assert s.emitted == s.accepted + 1 and s.accepted <= s.depth <= min(s.k, s.proposed)
        if shape in ("chain", "deep"):  # the truth is there most steps: some are accepted
            assert out.mean_accepted_length is not None and out.mean_accepted_length > 1.3


def test_a_tree_shaped_chain_matches_the_chain_path(llama, prompt_ids):
    # Same tokens once as a chain (parents None) and once as a one-child-per-node tree.
    base = loop.generate(llama, prompt_ids, N)
    vocab = vocab_size(llama.model)

    class AsChain(TreeDrafter):
        def propose(self, sequence, k, sampler, want_probs):
            proposal = super().propose(sequence, k, sampler, want_probs)
            return Proposal(proposal.tokens, None)

    as_tree = run(llama, TreeDrafter(base.token_ids, "chain", vocab, 3), prompt_ids, N)
    as_chain = run(llama, AsChain(base.token_ids, "chain", vocab, 3), prompt_ids, N)
    assert as_tree.token_ids == as_chain.token_ids == base.token_ids
    fields = ("k", "proposed", "depth", "accepted", "emitted")
    assert [[getattr(s, f) for f in fields] for s in as_tree.steps] == [
        [getattr(s, f) for f in fields] for s in as_chain.steps
    ]
    assert as_tree.acceptance_rate == as_chain.acceptance_rate


@pytest.mark.parametrize("shape", ["deep", "random"])
def test_eos_inside_an_accepted_branch(llama, prompt_ids, shape):
    free = loop.generate(llama, prompt_ids, 48)
    eos = free.token_ids[9]
    stop_at = free.token_ids.index(eos) + 1
    lm = dataclasses.replace(llama, eos_token_ids=(eos,))
    base = loop.generate(lm, prompt_ids, 48)
    assert base.token_ids == free.token_ids[:stop_at]
    vocab = vocab_size(llama.model)
    cut_inside = False
    for seed in range(6):
        out = run(lm, TreeDrafter(free.token_ids, shape, vocab, seed), prompt_ids, 48, k=6)
        assert out.token_ids == base.token_ids and out.stop_reason == "eos"
        cut_inside |= out.steps[-1].emitted < out.steps[-1].accepted + 1
    assert cut_inside  # some run stopped at the EOS with accepted nodes after it


@pytest.mark.parametrize("n", [1, 2, 5, 9])
def test_max_new_tokens_cuts_the_tree(llama, prompt_ids, n):
    base = loop.generate(llama, prompt_ids, n)
    drafter = TreeDrafter(base.token_ids, "deep", vocab_size(llama.model))
    out = run(llama, drafter, prompt_ids, n, k=6)
    assert out.token_ids == base.token_ids and out.new_tokens == n
    assert all(s.depth <= n - 1 for s in out.steps)


def test_feature_drafters_see_the_accepted_path_as_a_chain(qwen2, prompt_ids):
    # Every hidden state a drafter is left holding is the target's state at that position of the
    # final sequence, as a plain forward of it computes it.
    base = loop.generate(qwen2, prompt_ids, N)
    drafter = Recording(base.token_ids, "random", vocab_size(qwen2.model), 1)
    out = run(qwen2, drafter, prompt_ids, N, k=4)
    assert out.token_ids == base.token_ids
    assert sum(s.accepted for s in out.steps) > 5
    full = torch.tensor([prompt_ids + out.token_ids])
    with torch.inference_mode():
        states = qwen2.model(input_ids=full, output_hidden_states=True).hidden_states[-1][0]
    assert sorted(drafter.seen) == list(range(len(prompt_ids) + len(out.token_ids) - 1))
    for position, row in drafter.seen.items():
        torch.testing.assert_close(row, states[position], atol=1e-5, rtol=1e-4)


# --- the tree mask and positions, against a brute-force forward of each path --------------------


def _parents(rng: random.Random, n: int) -> list[int]:
    return [rng.randrange(-1, i) for i in range(n)]


@pytest.mark.parametrize("model", ["llama", "qwen2"])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_tree_forward_equals_each_path_forward(request, model, seed, prompt_ids):
    lm = request.getfixturevalue(model)
    rng = random.Random(seed)
    parents = _parents(rng, 10)
    tokens = [rng.randrange(vocab_size(lm.model)) for _ in parents]
    cached, root = prompt_ids[:-1], prompt_ids[-1]
    engine = caches.DynamicEngine(lm)
    with torch.inference_mode():
        engine.start(cached)
        ids = torch.tensor([[root, *tokens]])
        logits, hidden = engine.forward_tree(ids, torch.tensor(parents), hidden=True)
        assert logits.shape == (11, lm.model.config.vocab_size) and hidden is not None
        for row in range(11):
            path = tree.path_to(parents, row - 1)
            chain_ids = torch.tensor([[*cached, root, *(tokens[n] for n in path)]])
            out = lm.model(input_ids=chain_ids, output_hidden_states=True)
            torch.testing.assert_close(logits[row], out.logits[0, -1], atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(hidden[row], out.hidden_states[-1][0, -1], atol=1e-5,
                                       rtol=1e-4)  # fmt: skip


def test_mask_and_positions_by_hand():
    # root -> 0 -> 2, root -> 1; two cached positions.
    parents = torch.tensor([-1, -1, 0])
    assert tree.depths(parents) == [1, 1, 2]
    assert tree.position_ids(parents, 2).tolist() == [[2, 3, 3, 4]]
    mask = tree.attention_mask(parents, 2, torch.float32, CPU)[0, 0]
    visible = (mask == 0).int().tolist()
    assert visible == [[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 0, 0], [1, 1, 1, 0, 1, 0],
                       [1, 1, 1, 1, 0, 1]]  # fmt: skip
    assert mask.min() == torch.finfo(torch.float32).min
    assert tree.children([-1, -1, 0]) == [[0, 1], [2], [], []]
    assert tree.path_to([-1, -1, 0], 2) == [0, 2] and tree.path_to([-1], -1) == []


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_compacted_cache_equals_the_chain_cache(qwen2, prompt_ids, seed):
    rng = random.Random(seed)
    parents = _parents(rng, 9)
    tokens = [rng.randrange(vocab_size(qwen2.model)) for _ in parents]
    path = tree.path_to(parents, rng.randrange(9))
    cached, root = prompt_ids[:-1], prompt_ids[-1]
    as_tree, as_chain = caches.DynamicEngine(qwen2), caches.DynamicEngine(qwen2)
    with torch.inference_mode():
        as_tree.start(cached)
        as_tree.forward_tree(torch.tensor([[root, *tokens]]), torch.tensor(parents))
        as_tree.keep_path(len(prompt_ids), path)
        as_chain.start(cached)
        as_chain.forward(torch.tensor([[root, *(tokens[n] for n in path)]]), 1)
        assert as_tree.cache.get_seq_length() == as_chain.cache.get_seq_length()
        for mine, theirs in zip(as_tree.cache.layers, as_chain.cache.layers, strict=True):
            torch.testing.assert_close(mine.keys, theirs.keys, atol=1e-5, rtol=1e-4)
            torch.testing.assert_close(mine.values, theirs.values, atol=1e-5, rtol=1e-4)
        # Decoding on from either cache gives the same next logits.
        step = torch.tensor([[7]])
        torch.testing.assert_close(as_tree.forward(step, 1)[0], as_chain.forward(step, 1)[0],
                                   atol=1e-5, rtol=1e-4)  # fmt: skip


def test_static_engine_refuses_trees(qwen2, prompt_ids):
    static = caches.StaticEngine(qwen2, caches.cache_length([prompt_ids], N, 8))
    base = loop.generate(qwen2, prompt_ids, N)
    drafter = TreeDrafter(base.token_ids, "star", vocab_size(qwen2.model))
    with pytest.raises(ValueError, match="dynamic engine only"):
        run(static, drafter, prompt_ids, N)


def test_bad_trees_are_refused(llama, prompt_ids):
    class Bad(TreeDrafter):
        def __init__(self, parents: list[int]) -> None:
            super().__init__([0] * N, "chain", 10)
            self.parents = parents

        def propose(self, sequence, k, sampler, want_probs):
            n = len(self.parents)
            return Proposal(torch.zeros(n, dtype=torch.long), None, torch.tensor(self.parents))

    with pytest.raises(ValueError, match="topological order"):
        run(llama, Bad([-1, 1]), prompt_ids, 8)
    with pytest.raises(ValueError, match="depth 3 for K = 2"):
        run(llama, Bad([-1, 0, 1]), prompt_ids, 8, k=2)


# --- tree policies -----------------------------------------------------------------------------


def test_tree_exact_walks_the_targets_choices():
    # root: argmax 2; node 1 (token 2): argmax 0; node 2 (token 0): argmax 3.
    parents = torch.tensor([-1, -1, 1, 1])
    tokens = torch.tensor([1, 2, 1, 0])
    target_logits = torch.zeros(5, 4)
    target_logits[0, 2] = target_logits[2, 0] = target_logits[4, 3] = 1.0
    verdict = tree.exact(tokens, parents, None, target_logits, GREEDY)
    assert (verdict.path, verdict.next_token, verdict.accepted) == ([1, 3], 3, 2)
    target_logits[0, 2], target_logits[0, 3] = 0.0, 1.0  # the root's choice is in no child
    assert tree.exact(tokens, parents, None, target_logits, GREEDY).path == []


@pytest.mark.parametrize("name", ["confidence", "topk", "typical", "exact"])
@pytest.mark.parametrize("seed", range(5))
def test_tree_policies_on_a_chain_equal_the_chain_policies(name, seed):
    gen = torch.Generator().manual_seed(seed)
    k, vocab = 5, 6
    target_logits = torch.randn(k + 1, vocab, generator=gen) * 2
    draft_tokens = torch.where(torch.rand(k, generator=gen) < 0.7,
                               target_logits[:-1].argmax(-1),
                               torch.randint(vocab, (k,), generator=gen))  # fmt: skip
    spec = make_policy(name)
    chain_verdict = spec.fn(draft_tokens, None, target_logits, GREEDY)
    tree_verdict = spec.tree_rule()(draft_tokens, torch.arange(-1, k - 1), None, target_logits,
                                    GREEDY)  # fmt: skip
    assert tree_verdict.path == list(range(chain_verdict.accepted))
    assert tree_verdict.next_token == chain_verdict.next_token


def test_lossy_tree_picks_the_deepest_passing_path():
    # Node 0 fails, so its child 2 cannot count; node 1 -> 3 both pass: path [1, 3].
    keep = torch.tensor([False, True, True, True, False])
    parents = torch.tensor([-1, -1, 0, 1, 3])
    assert tree.deepest_passing(keep, parents) == [1, 3]
    assert tree.deepest_passing(torch.tensor([False]), torch.tensor([-1])) == []
    # Ties: the earliest node of the deepest level.
    assert tree.deepest_passing(torch.tensor([True, True]), torch.tensor([-1, -1])) == [0]


def test_tree_policy_params_bind_and_defaults_agree():
    for name, spec in policies.POLICIES.items():
        assert spec.tree is not None, name
        chain_defaults = policies.policy_defaults(name)
        assert _keyword_defaults(spec.tree) == list(chain_defaults.items()), name
    strict = make_policy("typical", epsilon=1e-9, delta=1e-9)
    loose = make_policy("typical", epsilon=1.0, delta=10.0)
    tokens, parents = torch.tensor([0, 1]), torch.tensor([-1, 0])
    target_logits = torch.tensor([[2.0, 0.0], [0.0, 2.0], [1.0, 1.0]])
    assert strict.tree_rule()(tokens, parents, None, target_logits, GREEDY).accepted == 2
    assert loose.tree_rule()(tokens, parents, None, target_logits, GREEDY).accepted == 0


def _keyword_defaults(fn) -> list[tuple[str, object]]:
    params = inspect.signature(fn).parameters.values()
    return [(p.name, p.default) for p in params if p.kind is p.KEYWORD_ONLY]


def test_a_policy_without_a_tree_form_says_which_have_one():
    spec = dataclasses.replace(get_policy("exact"), tree=None)
    with pytest.raises(ValueError, match="use one of exact, rejection, confidence, topk, typical"):
        spec.tree_rule()


# --- sampling: tree exact and tree rejection reproduce the target distribution ----------------
# A toy target whose next-token distribution depends on the previous token: logits ROOT at the
# root and NEXT[t] after token t. The first two emitted tokens must follow
# p(t1, t2) = softmax(ROOT)[t1] * softmax(NEXT[t1])[t2]; same thresholds as tests/test_policies.


VOCAB = 5
SHAPE = [-1, -1, -1, 0, 0, 1, 2, 2]  # three children of the root, two levels


def _toy(seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    root = torch.randn(VOCAB, generator=gen) * 1.5  # (V,)
    following = torch.randn(VOCAB, VOCAB, generator=gen) * 1.5  # (V, V)
    draft_root = torch.softmax(torch.randn(VOCAB, generator=gen) * 1.5, -1)  # (V,)
    draft_following = torch.softmax(torch.randn(VOCAB, VOCAB, generator=gen) * 1.5, -1)
    return root, following, draft_root, draft_following


def _emitted_pairs(rule, seed: int, n: int) -> torch.Tensor:
    """First two emitted tokens of n steps on trees whose siblings are i.i.d. draft draws."""
    root, following, draft_root, draft_following = _toy(seed)
    sampler = Sampler(SamplingParams(temperature=1.0), seed=seed, device=CPU)
    parents = torch.tensor(SHAPE)
    out = []
    first, second = SHAPE.index(0), torch.tensor(SHAPE[SHAPE.index(0) :])  # the two levels
    for _ in range(n):
        # Each level in one draw: (3,) children of the root, (5,) children of those.
        top = sampler.sample(draft_root.expand(first, VOCAB))
        below = draft_following[top[second]]  # (5, V)
        tokens = torch.cat([top, sampler.sample(below)])  # (N,)
        draft_probs = torch.cat([draft_root.expand(first, VOCAB), below])  # (N, V)
        target_logits = torch.cat([root[None], following[tokens]])  # (N+1, V)
        verdict = rule(tokens, parents, draft_probs, target_logits, sampler)
        emitted = [int(tokens[i]) for i in verdict.path] + [verdict.next_token]
        if len(emitted) < 2:  # the next step's first token, from the target after t1
            emitted.append(int(sampler.sample(torch.softmax(following[emitted[0]], -1))))
        out.append(emitted[0] * VOCAB + emitted[1])
    return torch.tensor(out)


def _joint(seed: int) -> torch.Tensor:
    root, following, _, _ = _toy(seed)
    return (torch.softmax(root, -1)[:, None] * torch.softmax(following, -1)).flatten()


@pytest.mark.parametrize(("rule", "seed"), [(tree.exact, 0), (policies.rejection_tree, 1)],
                         ids=["exact", "rejection"])  # fmt: skip
def test_tree_sampling_reproduces_the_target_distribution(rule, seed):
    joint = _joint(seed)
    assert total_variation(_emitted_pairs(rule, seed, 20_000), joint) < 0.03
    # The draft's own distribution is far from the target's: the check has teeth.
    _, _, draft_root, draft_following = _toy(seed)
    draft_joint = (draft_root[:, None] * draft_following).flatten()
    assert 0.5 * float((draft_joint - joint).abs().sum()) > 0.15


def test_rejection_without_the_residual_fails_the_same_check():
    """Falling back to the target's distribution after a rejection (no residual) is biased."""

    def no_residual(tokens, parents, draft_probs, target_logits, sampler):
        target_probs = torch.softmax(target_logits, -1)
        kids, path, row = tree.children(parents.tolist()), [], 0
        while True:
            for child in kids[row]:
                token = int(tokens[child])
                if (
                    float(sampler.uniform(1, CPU)) * draft_probs[child, token]
                    < target_probs[row, token]
                ):
                    path.append(child)
                    row = child + 1
                    break
            else:
                return tree.TreeVerdict(path, int(sampler.sample(target_probs[row])))

    assert total_variation(_emitted_pairs(no_residual, 0, 10_000), _joint(0)) > 0.05


# --- Medusa's candidate tree ------------------------------------------------------------------


def test_candidate_paths_are_the_published_prefix_kept_closed():
    assert candidate_paths(4, 4, 100) == [(0,), (0, 0), (1,), (0, 1)]
    for size in (1, 5, 16, 63):
        paths = candidate_paths(size, 4, 10_000)
        assert paths == list(MC_SIM_7B_63[:size])  # the published order is prefix-closed
    # Two heads: depth-3 paths are skipped and later ones fill their places.
    two = candidate_paths(16, 2, 10_000)
    assert len(two) == 16 and max(map(len, two)) == 2
    assert all(p[:-1] in two for p in two if len(p) > 1)
    # A 3-token draft vocabulary: ranks past it go, and so do their descendants.
    small = candidate_paths(63, 4, 3)
    assert all(max(p) < 3 for p in small) and all(p[:-1] in small for p in small if len(p) > 1)


@pytest.mark.parametrize("model", ["qwen2", "llama"])
@pytest.mark.parametrize("k", [1, 2, 4])
@pytest.mark.parametrize("size", [1, 6, 16, 63])
def test_medusa_tree_greedy_equals_baseline(request, model, k, size, prompt_ids):
    lm = request.getfixturevalue(model)
    base = loop.generate(lm, prompt_ids, N)
    drafter = MedusaDrafter(lm, medusa_heads(lm, 4, 64), tree_size=size)
    out = run(lm, drafter, prompt_ids, N, k)
    assert out.token_ids == base.token_ids
    expected = len([p for p in MC_SIM_7B_63[:size] if len(p) <= k])
    assert max(s.proposed for s in out.steps) == expected
    assert all(s.depth <= k for s in out.steps)


def test_medusa_tree_under_sampling_and_typical(qwen2, prompt_ids):
    heads = medusa_heads(qwen2, 3, 64)
    params = SamplingParams(temperature=0.8, top_k=50)
    first = run(qwen2, MedusaDrafter(qwen2, heads, 16), prompt_ids, N, 3, "exact", params, 7)
    again = run(qwen2, MedusaDrafter(qwen2, heads, 16), prompt_ids, N, 3, "exact", params, 7)
    assert first.token_ids == again.token_ids and first.new_tokens == N
    lossy = run(qwen2, MedusaDrafter(qwen2, heads, 16), prompt_ids, N, 3, "typical")
    assert lossy.new_tokens == N
    with pytest.raises(ValueError, match="top-k tokens, not draws"):
        run(qwen2, MedusaDrafter(qwen2, heads, 16), prompt_ids, N, 3, "rejection", params)


def test_medusa_tree_nodes_are_each_heads_top_k(qwen2, prompt_ids):
    # From the same features the chain drafts each head's argmax: the tree's rank-0 path; every
    # node holds the rank-th token of head depth-1.
    heads = medusa_heads(qwen2, 3, 64)
    chain_drafter, tree_drafter = MedusaDrafter(qwen2, heads), MedusaDrafter(qwen2, heads, 16)
    with torch.inference_mode():
        hidden = qwen2.model(input_ids=torch.tensor([prompt_ids]),
                             output_hidden_states=True).hidden_states[-1][0]  # fmt: skip
        for drafter in (chain_drafter, tree_drafter):
            drafter.start(prompt_ids)
            drafter.observe(hidden, 0)
        sequence = prompt_ids + [5]
        chain_tokens = chain_drafter.propose(sequence, 3, GREEDY, False).tokens.tolist()
        proposal = tree_drafter.propose(sequence, 3, GREEDY, False)
        top = tree_drafter.vocab.logits(heads(hidden[len(sequence) - 2])).topk(10).indices
    assert proposal.parents is not None
    paths = list(MC_SIM_7B_63[:16])
    tokens = proposal.tokens.tolist()
    for node, path in enumerate(paths):
        assert tokens[node] == int(tree_drafter.vocab.ids[top[len(path) - 1, path[-1]]])
        assert proposal.parents[node] == (paths.index(path[:-1]) if len(path) > 1 else -1)
    assert [tokens[paths.index(p)] for p in [(0,), (0, 0), (0, 0, 0)]] == chain_tokens


# --- settings ---------------------------------------------------------------------------------


def test_tree_size_setting():
    assert drafter_settings("medusa")["tree_size"] == 16
    assert drafter_settings("medusa", tree_size=None)["tree_size"] is None
    for bad in (0, 64, 2.5, True, "16"):
        with pytest.raises(ValueError, match="tree_size must be null .* from 1 to 63"):
            drafter_settings("medusa", tree_size=bad)


def test_params_yaml_tree_size(tmp_path: Path):
    raw = yaml.safe_load((ROOT / "params.yaml").read_text())
    assert P.load(ROOT / "params.yaml").drafters.settings("medusa")["tree_size"] == 4
    bad = copy.deepcopy(raw)
    bad["drafters"]["params"]["medusa"]["tree_size"] = 0
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(bad, sort_keys=False))
    with pytest.raises(P.ParamsError, match=r"drafters\.params\.medusa.*tree_size must be null"):
        P.load(path)
