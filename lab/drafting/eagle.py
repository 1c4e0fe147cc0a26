"""Draft mode "eagle": one decoder layer over (feature, next token), drafting a chain or a tree.

With tree_size set it drafts EAGLE-2's dynamic tree (Li et al. 2024, "EAGLE-2: Faster Inference
of Language Models with Dynamic Draft Trees"): expand the top_k most likely nodes level by level,
scoring each node by its path's draft probability, then keep the tree_size best nodes.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lab.drafting.features import Features, draw
from lab.drafting.heads import DraftVocab, EagleHead
from lab.engine.caches import rollback
from lab.engine.drafter import Proposal
from lab.engine.model import LoadedModel
from lab.engine.sampling import Sampler


def candidates(depth: int, top_k: int) -> int:
    """Nodes a tree of depth levels grows before reranking: top_k, then top_k**2 per level."""
    return top_k + (depth - 1) * top_k**2


def _whole(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def check_tree_settings(tree_size: object, depth: object, top_k: object) -> None:
    """Raise a ValueError naming the setting unless tree_size/depth/top_k describe a tree."""
    for key, value in (("depth", depth), ("top_k", top_k)):
        if not (isinstance(value, int) and _whole(value) and value >= 1):
            raise ValueError(f"drafter 'eagle': {key} must be an integer >= 1, got {value!r}")
    assert isinstance(depth, int) and isinstance(top_k, int)
    largest = candidates(depth, top_k)
    if tree_size is None or (isinstance(tree_size, int) and _whole(tree_size)
                             and 1 <= tree_size <= largest):  # fmt: skip
        return
    raise ValueError(
        f"drafter 'eagle': tree_size must be null (a chain) or an integer from 1 to {largest} "
        f"(the nodes that depth {depth} and top_k {top_k} grow), got {tree_size!r}"
    )


@dataclass
class DraftTree:
    """Tree nodes in topological order (a parent before its children)."""

    tokens: torch.Tensor  # (N,) target token ids
    parents: torch.Tensor  # (N,) index of each node's parent, -1: the root (last emitted token)
    scores: torch.Tensor  # (N,) draft log-probability of the root-to-node path (fp32)


def keep_best(
    scores: torch.Tensor, parents: torch.Tensor, size: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) indices of the size best of (M,) nodes, ascending, and (N,) their renumbered parents.

    Nodes come in creation order, parents first, and a child never outscores its parent (its
    log-probability is <= 0), so a stable descending sort ranks a parent before a tied child
    and every prefix of the ranking is closed under parents.
    """
    order = torch.sort(scores, descending=True, stable=True).indices[:size]
    keep = order.sort().values  # (N,) creation order is topological
    new_index = torch.full_like(parents, -1)
    new_index[keep] = torch.arange(len(keep), device=keep.device)
    kept_parents = parents[keep]
    mapped = torch.where(kept_parents >= 0, new_index[kept_parents.clamp(min=0)], -1)
    assert bool(((kept_parents < 0) | (mapped >= 0)).all()), "a kept node lost its parent"
    return keep, mapped


class EagleDrafter:
    """EAGLE: the draft layer runs autoregressively on features, decoded by the target's LM head.

    Its KV cache holds one entry per position t, computed from (feature t, token t+1); only
    entries from the target's true features are kept between steps (drafted ones are dropped).
    tree_size None drafts a chain of K tokens; otherwise a tree of at most tree_size nodes and
    min(depth, K) levels, each level one draft-layer forward over top_k nodes.
    """

    needs_hidden = True

    def __init__(
        self,
        target: LoadedModel,
        head: EagleHead,
        tree_size: int | None = None,
        depth: int = 5,
        top_k: int = 4,
    ) -> None:
        self.head = head
        check_tree_settings(tree_size, depth, top_k)
        self.vocab = DraftVocab.of(target.model, head.vocab)
        if top_k > len(self.vocab.ids):
            raise ValueError(f"drafter 'eagle': top_k {top_k} exceeds the "
                             f"{len(self.vocab.ids)}-token draft vocabulary")  # fmt: skip
        self.tree_size, self.depth, self.top_k = tree_size, depth, top_k
        self.embed = target.model.get_input_embeddings()
        self.device = target.device
        self.cache = head.new_cache()
        self.features = Features()
        self.prompt_ids: list[int] = []

    def start(self, prompt_ids: list[int]) -> None:
        self.cache = self.head.new_cache()
        self.features = Features()
        self.prompt_ids = prompt_ids

    def observe(self, hidden_states: torch.Tensor, start: int) -> None:
        self.features.add(hidden_states, start)
        if start == 0:
            # Prefill: the prompt's own next tokens are known, so all but its last position
            # enter the draft cache now (counted as draft prefill, not as a drafting step).
            self._ingest(self.prompt_ids, len(self.prompt_ids) - 2)

    def _ingest(self, sequence: list[int], last: int) -> torch.Tensor | None:
        """Feed (feature t, token t+1) for uncached t .. last; (H,) predicted feature last+1."""
        done = self.cache.get_seq_length()
        if last < done:
            return None
        features = self.features.since(done)[: last + 1 - done]  # (m, H)
        next_ids = torch.tensor(sequence[done + 1 : last + 2], device=self.device)  # (m,)
        predicted = self.head(features[None], self.embed(next_ids)[None], self.cache)
        self.features.drop_before(last + 1)
        return predicted[0, -1]

    def propose(self, sequence: list[int], k: int, sampler: Sampler, want_probs: bool) -> Proposal:
        """A chain of k tokens, or a tree (draft probs None: its nodes are top-k, not samples)."""
        if self.tree_size is not None:
            if want_probs:
                raise ValueError(
                    "drafter 'eagle' grows its tree from each node's top_k tokens, not samples, so "
                    "rejection sampling would not be lossless: use the exact policy (lossless when "
                    "sampling too) or tree_size null (a chain)"
                )
            tree = self.tree(sequence, min(self.depth, k))
            return Proposal(tree.tokens, None, parents=tree.parents)
        last = len(sequence) - 2  # the last position with a true feature
        predicted = self._ingest(sequence, last)
        assert predicted is not None
        tokens: list[torch.Tensor] = []
        probs: list[torch.Tensor] = []
        for i in range(k):
            token, token_probs = draw(self.vocab.logits(predicted), self.vocab, sampler,
                                       want_probs)  # fmt: skip
            tokens.append(token)
            if token_probs is not None:
                probs.append(token_probs[0])
            if i + 1 < k:  # (1, 1, H) predicted feature and its token -> the next feature
                embeds = self.embed(token.reshape(1, 1))
                predicted = self.head(predicted.reshape(1, 1, -1), embeds, self.cache)[0, -1]
        rollback(self.cache, last + 1)  # drafted entries came from predicted features: drop them
        return Proposal(torch.stack(tokens), torch.stack(probs) if want_probs else None)

    def tree(self, sequence: list[int], levels: int) -> DraftTree:
        """EAGLE-2's tree, levels deep, after sequence; the draft cache keeps true entries only."""
        assert self.tree_size is not None and levels >= 1
        last = len(sequence) - 2  # the root (last emitted token) has its entry at last
        predicted = self._ingest(sequence, last)
        assert predicted is not None
        nodes = self._expand(predicted, last, levels)
        rollback(self.cache, last + 1)  # drop the drafted entries
        return nodes

    def _expand(self, predicted: torch.Tensor, last: int, levels: int) -> DraftTree:
        """Grow the candidate tree level by level, then keep the tree_size best nodes."""
        assert self.tree_size is not None
        top = self._log_probs(predicted[None]).topk(self.top_k)  # the root's children
        ids, scores = [top.indices[0]], [top.values[0]]  # draft-vocab ids, path log-probs
        parents = [torch.full((self.top_k,), -1, device=predicted.device)]
        frontier = torch.arange(self.top_k, device=predicted.device)  # (F,) node numbers
        frontier_ids, frontier_scores = ids[0], scores[0]  # (F,)
        hidden = predicted.expand(self.top_k, -1)  # (F, H) each frontier node's input feature
        # (F, drafted entries): which drafted cache entries each frontier node sees (ancestors)
        seen = torch.zeros(self.top_k, 0, dtype=torch.bool, device=predicted.device)
        count = self.top_k
        for level in range(1, levels):
            # Each frontier node also sees its own entry, written by this forward.
            seen = torch.cat([seen, torch.eye(len(frontier), dtype=torch.bool,
                                               device=seen.device)], dim=1)  # fmt: skip
            # A node `level` deep has its draft-layer entry at position last + level, as in a chain.
            out = self._forward(hidden, frontier_ids, seen, last + level)  # (F, H)
            top = self._log_probs(out).topk(self.top_k)  # (F, top_k) children of each
            child_scores = (frontier_scores[:, None] + top.values).flatten()  # (F * top_k,)
            ids.append(top.indices.flatten())
            scores.append(child_scores)
            parents.append(frontier.repeat_interleave(self.top_k))
            best = child_scores.topk(self.top_k).indices  # the next frontier, by path score
            rows = best // self.top_k  # (F,) their parents' rows
            frontier, frontier_ids = count + best, ids[-1][best]
            frontier_scores, hidden, seen = child_scores[best], out[rows], seen[rows]
            count += len(child_scores)
        all_scores = torch.cat(scores)
        keep, kept_parents = keep_best(all_scores, torch.cat(parents), self.tree_size)
        return DraftTree(self.vocab.ids[torch.cat(ids)[keep]], kept_parents, all_scores[keep])

    def _forward(
        self, hidden: torch.Tensor, draft_ids: torch.Tensor, seen: torch.Tensor, position: int
    ) -> torch.Tensor:
        """One draft-layer forward of F frontier nodes at one position -> (F, H) next features.

        Each node attends to every true entry, its ancestors' drafted entries and its own.
        """
        # (F, cached + F) over the true entries, the drafted ones so far and the F new ones.
        true_length = self.cache.get_seq_length() + len(draft_ids) - seen.shape[1]
        allowed = torch.cat([seen.new_ones(len(draft_ids), true_length), seen], dim=1)
        # An additive mask works for every attention implementation (eager adds it, sdpa too).
        bias = torch.zeros(allowed.shape, dtype=hidden.dtype, device=hidden.device)
        bias = bias.masked_fill(~allowed, torch.finfo(hidden.dtype).min)[None, None]
        positions = torch.full((1, len(draft_ids)), position, device=hidden.device)
        embeds = self.embed(self.vocab.ids[draft_ids])[None]  # (1, F, H)
        out = self.head(hidden[None], embeds, self.cache, attention_mask=bias,
                        position_ids=positions)  # fmt: skip
        return out[0]

    def _log_probs(self, features: torch.Tensor) -> torch.Tensor:
        """(n, H) features -> (n, Vd) fp32 draft log-probabilities, <= 0 (keep_best needs it)."""
        logits = self.vocab.logits(features).float()
        return torch.log_softmax(logits, dim=-1).clamp(max=0.0)

    def rollback(self, length: int) -> None:
        self.features.truncate(length)
