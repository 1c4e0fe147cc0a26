"""Draft mode "draft_model": a smaller causal LM drafting autoregressively on its own engine."""

from __future__ import annotations

import torch

from lab.engine.caches import Engine, engine_for
from lab.engine.drafter import Proposal
from lab.engine.model import LoadedModel
from lab.engine.sampling import Sampler

# The feeds a draft engine sees: the one correction token after a rejection, or the last draft
# and the bonus token after a full acceptance. A static draft engine needs just these sizes.
DRAFT_STEP_SIZES = (1, 2)


class DraftModel:
    """A smaller causal LM with its own KV cache (any engine), drafting autoregressively."""

    needs_hidden = False

    def __init__(self, draft: LoadedModel | Engine) -> None:
        self.engine = engine_for(draft)
        self.lm = self.engine.lm
        self.length = 0  # positions the draft cache holds; a host count, so reading never syncs

    def start(self, prompt_ids: list[int]) -> None:
        """Prefill the draft cache on the prompt (the first new token goes in at propose)."""
        self.engine.start(prompt_ids)
        self.length = len(prompt_ids)

    def propose(self, sequence: list[int], k: int, sampler: Sampler, want_probs: bool) -> Proposal:
        """Feed what the cache has not seen yet, then draft k tokens one forward each.

        Each drafted token stays on the device and is fed back as the next input: no host sync
        per drafted token (the loop reads the tokens once, after verification).
        """
        ids = torch.tensor([sequence[self.length :]], device=self.lm.device)  # (1, n >= 1)
        tokens: list[torch.Tensor] = []
        probs: list[torch.Tensor] = []
        for _ in range(k):
            logits = self.engine.forward(ids, keep=1)[0][-1]  # (V,)
            self.length += ids.shape[1]
            if want_probs:
                probs.append(sampler.probs(logits))
                token = sampler.sample(probs[-1])
            else:
                token = sampler.choose(logits)
            tokens.append(token)
            ids = token.reshape(1, 1)
        return Proposal(torch.stack(tokens), torch.stack(probs) if want_probs else None)

    def observe(self, hidden_states: torch.Tensor, start: int) -> None:
        """Not used: a draft model reads tokens, not the target's states."""

    def rollback(self, length: int) -> None:
        """Forget cached positions at or past length (rejected drafts)."""
        self.engine.rollback(length)
        self.length = min(self.length, length)
