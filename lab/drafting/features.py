"""The target's hidden states as the feature drafters (Medusa, EAGLE) see them."""

from __future__ import annotations

import torch

from lab.drafting.heads import DraftVocab
from lab.engine.sampling import Sampler


class Features:
    """The target's last hidden states for positions [start, start + n), kept in sync."""

    def __init__(self) -> None:
        self.start = 0
        self.rows: torch.Tensor | None = None  # (n, H)

    def add(self, hidden_states: torch.Tensor, start: int) -> None:
        """Rows for positions from start on replace any kept rows there."""
        if self.rows is None:
            self.start, self.rows = start, hidden_states
            return
        keep = start - self.start
        if not 0 <= keep <= len(self.rows):
            raise RuntimeError(
                f"hidden states for position {start} do not follow the kept ones "
                f"({self.start}..{self.start + len(self.rows) - 1})"
            )
        self.rows = torch.cat([self.rows[:keep], hidden_states])

    def since(self, position: int) -> torch.Tensor:
        """(m, H) rows of positions position .. last kept."""
        assert self.rows is not None and position >= self.start
        return self.rows[position - self.start :]

    def drop_before(self, position: int) -> None:
        """Forget rows before position (consumed)."""
        assert self.rows is not None
        self.rows = self.rows[position - self.start :]
        self.start = position

    def truncate(self, length: int) -> None:
        """Forget rows at or past length (rejected drafts)."""
        if self.rows is not None:
            self.rows = self.rows[: max(0, length - self.start)]


def draw(
    logits: torch.Tensor, vocab: DraftVocab, sampler: Sampler, want_probs: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(..., Vd) draft logits -> (...) target token ids and, if asked, (..., V) probabilities."""
    if not want_probs:
        return vocab.ids[sampler.choose(logits)], None
    draft_probs = sampler.probs(logits)  # (..., Vd)
    tokens = vocab.ids[sampler.sample(draft_probs)]
    return tokens, vocab.full_probs(draft_probs.reshape(-1, draft_probs.shape[-1]))
