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

    def __init__(self, draft: LoadedModel | Engine, vocab_size: int | None = None) -> None:
        self.engine = engine_for(draft)
        self.lm = self.engine.lm
        self.length = 0  # positions the draft cache holds; a host count, so reading never syncs
        # vocab_size: the target's logit width. A target with padding rows past the draft's
        # (Qwen2.5-7B's 152064 against the 0.5B's 151936, one tokenizer) can emit an id the draft
        # cannot embed: such ids are clamped on the way in, and the draft's logits are padded
        # with -inf to the target's width on the way out (the policies compare equal widths).
        self.rows = _rows(self.lm.model.get_input_embeddings())
        width = _rows(self.lm.model.get_output_embeddings())
        self.pad = 0 if vocab_size is None else vocab_size - width
        if self.pad < 0:
            raise ValueError(
                f"draft model {self.lm.name!r} has {width} logits, more than the target's "
                f"{vocab_size}: a draft may be narrower than its target, not wider"
            )

    def start(self, prompt_ids: list[int]) -> None:
        """Prefill the draft cache on the prompt (the first new token goes in at propose)."""
        self.engine.start(self._embeddable(prompt_ids))
        self.length = len(prompt_ids)

    def _embeddable(self, ids: list[int]) -> list[int]:
        """ids with any past the draft's embedding clamped to its last row (a draft's guess)."""
        return [min(i, self.rows - 1) for i in ids]

    def propose(self, sequence: list[int], k: int, sampler: Sampler, want_probs: bool) -> Proposal:
        """Feed what the cache has not seen yet, then draft k tokens one forward each.

        Each drafted token stays on the device and is fed back as the next input: no host sync
        per drafted token (the loop reads the tokens once, after verification).
        """
        ids = torch.tensor([self._embeddable(sequence[self.length :])], device=self.lm.device)
        tokens: list[torch.Tensor] = []
        probs: list[torch.Tensor] = []
        for _ in range(k):
            logits = self.engine.forward(ids, keep=1)[0][-1]  # (V,)
            if self.pad:  # (V + pad,): the target's padding rows are never proposed
                logits = torch.nn.functional.pad(logits, (0, self.pad), value=float("-inf"))
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


def _rows(embedding: torch.nn.Module | None) -> int:
    """The rows of an embedding or LM head (its vocabulary width)."""
    weight = getattr(embedding, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"a draft model needs embedding matrices, got {embedding!r}")
    return int(weight.shape[0])
