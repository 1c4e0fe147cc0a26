"""Draft mode "eagle": one decoder layer over (feature, next token), drafting autoregressively."""

from __future__ import annotations

import torch

from lab.drafting.features import Features, draw
from lab.drafting.heads import DraftVocab, EagleHead
from lab.engine.caches import rollback
from lab.engine.drafter import Proposal
from lab.engine.model import LoadedModel
from lab.engine.sampling import Sampler


class EagleDrafter:
    """EAGLE: the draft layer runs autoregressively on features, decoded by the target's LM head.

    Its KV cache holds one entry per position t, computed from (feature t, token t+1); only
    entries from the target's true features are kept between steps (drafted ones are dropped).
    """

    needs_hidden = True

    def __init__(self, target: LoadedModel, head: EagleHead) -> None:
        self.head = head
        self.vocab = DraftVocab.of(target.model, head.vocab)
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
        """k tokens, one draft-layer forward each (the first also takes in the new true states)."""
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

    def rollback(self, length: int) -> None:
        self.features.truncate(length)
