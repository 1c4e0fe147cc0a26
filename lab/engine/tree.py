"""Token trees: N draft nodes verified in one target forward, and the rules that accept a path.

Node i holds token tokens[i] and its parent parents[i] (-1: the root, i.e. the last emitted
token, which is not yet cached); nodes come in topological order (parents[i] < i). The target
scores root + N nodes at once: row 0 of its logits is the root's, row i + 1 node i's. Each of
those N + 1 new positions attends to the whole cache, its ancestors and itself, at position id
past + depth (the root's depth is 0), so every node is scored exactly as if its root-to-node path
had been fed as a chain.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from lab.engine.sampling import Sampler


@dataclass(frozen=True)
class TreeVerdict:
    """A tree policy's decision: the accepted root-to-leaf path and the token after it."""

    path: list[int]  # accepted node indices, root's child first (empty: none accepted)
    next_token: int  # the target's token after the path (correction or bonus)

    @property
    def accepted(self) -> int:
        return len(self.path)


def depths(parents: torch.Tensor) -> list[int]:
    """Depth of each node (1 for a child of the root); parents (N,) in topological order."""
    out: list[int] = []
    for parent in parents.tolist():
        out.append(1 if parent < 0 else out[parent] + 1)
    return out


def check(tokens: torch.Tensor, parents: torch.Tensor, max_depth: int) -> list[int]:
    """The nodes' depths, after checking that (tokens, parents) is a tree of depth <= max_depth."""
    if parents.ndim != 1 or parents.shape != tokens.shape:
        raise ValueError(
            f"a token tree needs (N,) tokens and (N,) parents, got {tuple(tokens.shape)} tokens "
            f"and {tuple(parents.shape)} parents"
        )
    order = torch.arange(len(parents), device=parents.device)
    if bool(((parents < -1) | (parents >= order)).any()):
        raise ValueError(
            "a token tree's nodes must come in topological order: each parent is -1 (the root) "
            f"or an earlier node, got parents {parents.tolist()}"
        )
    node_depths = depths(parents)
    if node_depths and max(node_depths) > max_depth:
        raise ValueError(
            f"the drafter proposed a tree of depth {max(node_depths)} for K = {max_depth}: a "
            "drafter must keep every root-to-leaf path within K tokens"
        )
    return node_depths


def position_ids(parents: torch.Tensor, past: int) -> torch.Tensor:
    """(1, N+1) position ids of root + nodes: past + depth (the root at past)."""
    offsets = torch.tensor([0, *depths(parents)], dtype=torch.long, device=parents.device)
    return (past + offsets)[None]


def ancestors(parents: torch.Tensor) -> torch.Tensor:
    """(N+1, N+1) bool: row r may see column c (c is r or an ancestor of r); 0 is the root."""
    n = len(parents) + 1
    seen = torch.eye(n, dtype=torch.bool, device=parents.device)
    for node, parent in enumerate(parents.tolist()):  # parents come first: their rows are final
        seen[node + 1] |= seen[parent + 1]
    return seen


def attention_mask(
    parents: torch.Tensor, past: int, dtype: torch.dtype, device: torch.device
) -> torch.Tensor:
    """(1, 1, N+1, past+N+1) additive mask: 0 where a new position may attend, else dtype's min.

    Additive float is what both the eager and the sdpa attention of transformers take (a 4D mask
    is passed through as-is); every row sees the whole cache.
    """
    visible = ancestors(parents.to(device))  # (N+1, N+1)
    visible = torch.cat([visible.new_ones(len(visible), past), visible], dim=1)
    mask = torch.zeros(visible.shape, dtype=dtype, device=device)
    return mask.masked_fill(~visible, torch.finfo(dtype).min)[None, None]


def path_to(parents: list[int], node: int) -> list[int]:
    """Node indices from the root's child down to node (empty for the root, -1)."""
    path: list[int] = []
    while node >= 0:
        path.append(node)
        node = parents[node]
    return path[::-1]


def children(parents: list[int]) -> list[list[int]]:
    """Children of each row: row 0 the root, row i + 1 node i; in node order."""
    kids: list[list[int]] = [[] for _ in range(len(parents) + 1)]
    for node, parent in enumerate(parents):
        kids[parent + 1].append(node)
    return kids


def exact(
    draft_tokens: torch.Tensor,
    parents: torch.Tensor,
    draft_probs: torch.Tensor | None,
    target_logits: torch.Tensor,
    sampler: Sampler,
) -> TreeVerdict:
    """Lossless: from the root, draw the target's token and move to the child holding it.

    Greedy draws the argmax, sampling a seeded draw from the target at the current node; with
    no such child the walk stops and emits the draw. Every emitted token is the target's own draw
    given the path before it, whatever the tree held, so the output distribution is the
    target's (the chain argument, node by node). Siblings with equal tokens: the first wins.
    """
    tokens, kids = draft_tokens.tolist(), children(parents.tolist())
    greedy = target_logits.argmax(-1).tolist() if sampler.greedy else None  # (N+1,)
    path: list[int] = []
    row = 0  # the current node's logits row: 0 the root, i + 1 node i
    while True:
        drawn = greedy[row] if greedy is not None else int(sampler.choose(target_logits[row]))
        child = next((c for c in kids[row] if tokens[c] == drawn), None)
        if child is None:
            return TreeVerdict(path, drawn)
        path.append(child)
        row = child + 1


def deepest_passing(keep: torch.Tensor, parents: torch.Tensor) -> list[int]:
    """The deepest path whose every node passes keep (N,); the earliest node wins ties."""
    best, best_depth = -1, 0
    passing: list[bool] = []
    node_depths: list[int] = []
    for node, (parent, ok) in enumerate(zip(parents.tolist(), keep.tolist(), strict=True)):
        passing.append(bool(ok) and (parent < 0 or passing[parent]))
        node_depths.append(1 if parent < 0 else node_depths[parent] + 1)
        if passing[node] and node_depths[node] > best_depth:
            best, best_depth = node, node_depths[node]
    return path_to(parents.tolist(), best)
