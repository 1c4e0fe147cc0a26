"""Draft mode "medusa": heads on the target's last hidden state, as a chain or a candidate tree."""

from __future__ import annotations

import torch

from lab.drafting.features import Features, draw
from lab.drafting.heads import DraftVocab, MedusaHeads
from lab.engine.drafter import Proposal
from lab.engine.model import LoadedModel
from lab.engine.sampling import Sampler

# The sparse candidate tree the Medusa authors published for their 7B model ("mc_sim_7b_63" in
# medusa/model/medusa_choices.py of github.com/FasterDecoding/Medusa, Apache-2.0): each path
# lists, per depth d, the rank of the token in head d-1's top-k, and the paths are ordered by the
# acceptance each was measured to add, so any prefix of the list is a good tree of that size.
MC_SIM_7B_63: tuple[tuple[int, ...], ...] = (
    (0,), (0, 0), (1,), (0, 1), (2,), (0, 0, 0), (1, 0), (0, 2), (3,), (0, 3), (4,), (0, 4),
    (2, 0), (0, 5), (0, 0, 1), (5,), (0, 6), (6,), (0, 7), (0, 1, 0), (1, 1), (7,), (0, 8),
    (0, 0, 2), (3, 0), (0, 9), (8,), (9,), (1, 0, 0), (0, 2, 0), (1, 2), (0, 0, 3), (4, 0),
    (2, 1), (0, 0, 4), (0, 0, 5), (0, 0, 0, 0), (0, 1, 1), (0, 0, 6), (0, 3, 0), (5, 0), (1, 3),
    (0, 0, 7), (0, 0, 8), (0, 0, 9), (6, 0), (0, 4, 0), (1, 4), (7, 0), (0, 1, 2), (2, 0, 0),
    (3, 1), (2, 2), (8, 0), (0, 5, 0), (1, 5), (1, 0, 1), (0, 2, 1), (9, 0), (0, 6, 0),
    (0, 0, 0, 1), (1, 6), (0, 7, 0),
)  # fmt: skip
MAX_TREE_SIZE = len(MC_SIM_7B_63)


def candidate_paths(size: int, num_heads: int, vocab: int) -> list[tuple[int, ...]]:
    """The first `size` paths of MC_SIM_7B_63 that these heads can fill, kept prefix-closed.

    A path deeper than the heads, or ranking past the draft vocabulary, is skipped, and so is any
    path whose parent was skipped.
    """
    kept: list[tuple[int, ...]] = []
    for path in MC_SIM_7B_63:
        if len(kept) == size:
            break
        fits = len(path) <= num_heads and max(path) < vocab
        if fits and (len(path) == 1 or path[:-1] in kept):
            kept.append(path)
    return kept


class CandidateTree:
    """A static tree of top-k index paths as node tensors, and its cut to each depth K."""

    def __init__(self, paths: list[tuple[int, ...]], device: torch.device) -> None:
        index = {path: node for node, path in enumerate(paths)}
        self.paths = paths
        self.parents = torch.tensor([index.get(p[:-1], -1) for p in paths], device=device)  # (N,)
        self.heads = torch.tensor([len(p) - 1 for p in paths], device=device)  # (N,) head = depth-1
        self.ranks = torch.tensor([p[-1] for p in paths], device=device)  # (N,) top-k rank
        self.depth = max(map(len, paths))
        self.width = max(self.ranks.tolist()) + 1
        self._cuts: dict[int, CandidateTree] = {}

    def cut(self, k: int) -> CandidateTree:
        """The nodes within depth k (a prefix-closed list stays prefix-closed)."""
        if k >= self.depth:
            return self
        if k not in self._cuts:
            self._cuts[k] = CandidateTree([p for p in self.paths if len(p) <= k], self.ranks.device)
        return self._cuts[k]


class MedusaDrafter:
    """Medusa heads: head i drafts the token i+1 past the one just emitted.

    tree_size None drafts a chain (each head's choice); an int drafts Medusa's static candidate
    tree of that many nodes (node token = the rank-th of its head's top-k), verified at once.
    """

    needs_hidden = True

    def __init__(
        self, target: LoadedModel, heads: MedusaHeads, tree_size: int | None = None
    ) -> None:
        self.heads = heads
        self.vocab = DraftVocab.of(target.model, heads.vocab)
        self.features = Features()
        self.tree: CandidateTree | None = None
        if tree_size is not None:
            paths = candidate_paths(tree_size, heads.num_heads, len(self.vocab.ids))
            self.tree = CandidateTree(paths, target.device)

    def start(self, prompt_ids: list[int]) -> None:
        self.features = Features()

    def observe(self, hidden_states: torch.Tensor, start: int) -> None:
        self.features.add(hidden_states, start)

    def propose(self, sequence: list[int], k: int, sampler: Sampler, want_probs: bool) -> Proposal:
        """min(k, heads) tokens from one pass of the heads: one LM-head matmul for all of them."""
        # The state at len-2 is the one whose LM head chose the last token (the target's own
        # next-token prediction, Medusa's first token); head i predicts i+1 tokens past it.
        position = len(sequence) - 2
        self.features.drop_before(position)
        hidden = self.features.since(position)[0]  # (H,)
        if self.tree is not None:
            return self._propose_tree(hidden, k, want_probs)
        logits = self.vocab.logits(self.heads(hidden, k))  # (P, Vd)
        tokens, probs = draw(logits, self.vocab, sampler, want_probs)
        return Proposal(tokens, probs)

    def _propose_tree(self, hidden: torch.Tensor, k: int, want_probs: bool) -> Proposal:
        """The candidate tree cut to depth k: (N,) tokens and parents, from each head's top-k."""
        if want_probs:
            raise ValueError(
                "medusa's candidate tree holds each head's top-k tokens, not draws from it, so a "
                "policy that needs draft probabilities (rejection) cannot verify it: use exact "
                "(lossless) or typical, or tree_size: null for a chain"
            )
        assert self.tree is not None
        tree = self.tree.cut(k)
        logits = self.vocab.logits(self.heads(hidden, tree.depth))  # (D, Vd)
        top = logits.topk(tree.width, dim=-1).indices  # (D, width) draft-vocabulary indices
        tokens = self.vocab.ids[top[tree.heads, tree.ranks]]  # (N,) target ids
        return Proposal(tokens, None, tree.parents)

    def rollback(self, length: int) -> None:
        self.features.truncate(length)
