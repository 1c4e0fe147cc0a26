"""Draft mode "medusa": K heads on the target's last hidden state, one token each."""

from __future__ import annotations

import torch

from lab.drafting.features import Features, draw
from lab.drafting.heads import DraftVocab, MedusaHeads
from lab.engine.drafter import Proposal
from lab.engine.model import LoadedModel
from lab.engine.sampling import Sampler


class MedusaDrafter:
    """Medusa heads (chain, no tree): head i drafts the token i+1 past the one just emitted."""

    needs_hidden = True

    def __init__(self, target: LoadedModel, heads: MedusaHeads) -> None:
        self.heads = heads
        self.vocab = DraftVocab.of(target.model, heads.vocab)
        self.features = Features()

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
        logits = self.vocab.logits(self.heads(hidden, k))  # (P, Vd)
        tokens, probs = draw(logits, self.vocab, sampler, want_probs)
        return Proposal(tokens, probs)

    def rollback(self, length: int) -> None:
        self.features.truncate(length)
