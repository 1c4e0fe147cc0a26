"""Draft mode "prompt_lookup": copy what followed an earlier match of the last n-gram."""

from __future__ import annotations

import torch

from lab.engine.drafter import Proposal
from lab.engine.sampling import Sampler


def lookup(sequence: list[int], k: int, max_ngram: int) -> list[int]:
    """Up to k tokens that followed the latest earlier occurrence of the longest final n-gram."""
    for n in range(min(max_ngram, len(sequence) - 1), 0, -1):
        tail = sequence[-n:]
        # Latest first; start + n <= len - 1 keeps the continuation non-empty.
        for start in range(len(sequence) - n - 1, -1, -1):
            if sequence[start + n - 1] == tail[-1] and sequence[start : start + n] == tail:
                return sequence[start + n : start + n + k]
    return []


class PromptLookup:
    """Prompt lookup decoding: no model, copy what followed the last n-gram's latest match.

    Tries n = max_ngram down to 1; without any match it proposes nothing (a plain decode step).
    """

    needs_hidden = False

    def __init__(self, vocab_size: int, max_ngram: int = 3, device: str | torch.device = "cpu"):
        self.vocab_size = vocab_size
        self.max_ngram = max_ngram
        self.device = torch.device(device)

    def start(self, prompt_ids: list[int]) -> None:
        """Nothing to prepare: the sequence itself is the draft source."""

    def propose(self, sequence: list[int], k: int, sampler: Sampler, want_probs: bool) -> Proposal:
        """The continuation of the latest match (a point mass when probs are asked)."""
        tokens = torch.tensor(lookup(sequence, k, self.max_ngram), dtype=torch.long,
                              device=self.device)  # (P,)  # fmt: skip
        probs = None
        if want_probs:
            probs = torch.nn.functional.one_hot(tokens, self.vocab_size).float()  # (P, V)
        return Proposal(tokens, probs)

    def observe(self, hidden_states: torch.Tensor, start: int) -> None:
        """Not used."""

    def rollback(self, length: int) -> None:
        """Nothing cached: the next proposal reads the sequence as it is."""
