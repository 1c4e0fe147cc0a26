"""What the loop asks of a drafter: a proposal of draft tokens, and the Drafter protocol."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import torch

from lab.engine.sampling import Sampler


@dataclass
class Proposal:
    """Draft tokens (N,): a chain of N <= K, or a token tree of depth <= K (lab.engine.tree).

    probs: for lossless sampling, the (N, V) distribution each token was drafted from (node i's:
    the draft distribution at its parent), else None. parents: None for a chain (node i follows
    node i - 1); for a tree, (N,) long, each node's parent index in tokens, -1 for the root (the
    last emitted token), in topological order (parents[i] < i). Rejection sampling on a tree
    needs each node to be an independent draw from its probs row (siblings with replacement).
    """

    tokens: torch.Tensor
    probs: torch.Tensor | None
    parents: torch.Tensor | None = None


class Drafter(Protocol):
    """Proposes continuations of the sequence so far; keeps whatever state it needs in sync."""

    # True: the loop runs the target with output_hidden_states and calls observe() after each
    # target forward (prefill included). False costs the other drafters nothing.
    needs_hidden: bool

    def start(self, prompt_ids: list[int]) -> None: ...

    def propose(
        self, sequence: list[int], k: int, sampler: Sampler, want_probs: bool
    ) -> Proposal: ...

    def observe(self, hidden_states: torch.Tensor, start: int) -> None:
        """(n, H) target last hidden states of positions start .. start+n-1."""

    def rollback(self, length: int) -> None: ...
