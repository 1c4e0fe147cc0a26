"""Draft mode "draft_model": a smaller causal LM drafting autoregressively on its own cache."""

from __future__ import annotations

import torch
from transformers import DynamicCache

from lab.engine.caches import forward, rollback
from lab.engine.drafter import Proposal
from lab.engine.model import LoadedModel
from lab.engine.sampling import Sampler


class DraftModel:
    """A smaller causal LM with its own KV cache, drafting autoregressively."""

    needs_hidden = False

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self.cache = DynamicCache(config=lm.model.config)

    def start(self, prompt_ids: list[int]) -> None:
        """Prefill the draft cache on the prompt (the first new token goes in at propose)."""
        self.cache = DynamicCache(config=self.lm.model.config)
        forward(self.lm.model, self._ids(prompt_ids), self.cache, keep=1)

    def propose(self, sequence: list[int], k: int, sampler: Sampler, want_probs: bool) -> Proposal:
        """Feed what the cache has not seen yet, then draft k tokens one forward each."""
        pending = sequence[
            self.cache.get_seq_length() :
        ]  # >= 1 token: the last one is never cached
        tokens: list[torch.Tensor] = []
        probs: list[torch.Tensor] = []
        for _ in range(k):
            logits = forward(self.lm.model, self._ids(pending), self.cache, keep=1)[-1]  # (V,)
            if want_probs:
                probs.append(sampler.probs(logits))
                token = sampler.sample(probs[-1])
            else:
                token = sampler.choose(logits)
            tokens.append(token)
            pending = [int(token)]
        return Proposal(torch.stack(tokens), torch.stack(probs) if want_probs else None)

    def observe(self, hidden_states: torch.Tensor, start: int) -> None:
        """Not used: a draft model reads tokens, not the target's states."""

    def rollback(self, length: int) -> None:
        """Forget cached positions at or past length (rejected drafts)."""
        rollback(self.cache, length)

    def _ids(self, ids: list[int]) -> torch.Tensor:
        return torch.tensor([ids], device=self.lm.device)  # (1, n)
