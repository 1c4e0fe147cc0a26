"""Drafters: propose up to K tokens (and, when asked, the probabilities they were drawn from).

draft_model: a smaller LM; prompt_lookup: copy what followed an earlier occurrence of the last
n-gram; medusa and eagle: trained heads on the target's own hidden states (lab.heads).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

import torch
from transformers import DynamicCache

from lab.decode import forward, rollback
from lab.heads import DraftVocab, EagleHead, MedusaHeads
from lab.models import LoadedModel
from lab.sampling import Sampler


@dataclass
class Proposal:
    """P <= K draft tokens (P,) and, for lossless sampling, the (P, V) distributions behind them."""

    tokens: torch.Tensor
    probs: torch.Tensor | None


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


class _Features:
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


def _draw(
    logits: torch.Tensor, vocab: DraftVocab, sampler: Sampler, want_probs: bool
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(..., Vd) draft logits -> (...) target token ids and, if asked, (..., V) probabilities."""
    if not want_probs:
        return vocab.ids[sampler.choose(logits)], None
    draft_probs = sampler.probs(logits)  # (..., Vd)
    tokens = vocab.ids[sampler.sample(draft_probs)]
    return tokens, vocab.full_probs(draft_probs.reshape(-1, draft_probs.shape[-1]))


class MedusaDrafter:
    """Medusa heads (chain, no tree): head i drafts the token i+1 past the one just emitted."""

    needs_hidden = True

    def __init__(self, target: LoadedModel, heads: MedusaHeads) -> None:
        self.heads = heads
        self.vocab = DraftVocab.of(target.model, heads.vocab)
        self.features = _Features()

    def start(self, prompt_ids: list[int]) -> None:
        self.features = _Features()

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
        tokens, probs = _draw(logits, self.vocab, sampler, want_probs)
        return Proposal(tokens, probs)

    def rollback(self, length: int) -> None:
        self.features.truncate(length)


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
        self.features = _Features()
        self.prompt_ids: list[int] = []

    def start(self, prompt_ids: list[int]) -> None:
        self.cache = self.head.new_cache()
        self.features = _Features()
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
            token, token_probs = _draw(self.vocab.logits(predicted), self.vocab, sampler,
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


DRAFTERS: dict[str, type[DraftModel] | type[PromptLookup] | type[MedusaDrafter]
               | type[EagleDrafter]] = {
    "draft_model": DraftModel,
    "prompt_lookup": PromptLookup,
    "medusa": MedusaDrafter,
    "eagle": EagleDrafter,
}  # fmt: skip

# Each drafter's settings with their defaults (params.yaml drafters.params.<name>, the CLI).
# heads: the folder of trained heads (lab.heads.save) that the pipeline and the CLI load.
DRAFTER_SETTINGS: dict[str, dict[str, Any]] = {
    "draft_model": {},
    "prompt_lookup": {"max_ngram": 3},
    "medusa": {"heads": None},
    "eagle": {"heads": None},
}


def drafter_settings(name: str, **params: Any) -> dict[str, Any]:
    """A drafter's settings with defaults filled in; unknown names, keys or bad values raise."""
    if name not in DRAFTERS:
        raise ValueError(f"unknown drafter {name!r}: use one of {', '.join(DRAFTERS)}")
    defaults = DRAFTER_SETTINGS[name]
    unknown = sorted(set(params) - set(defaults))
    if unknown:
        takes = ", ".join(defaults) or "no settings"
        raise ValueError(f"drafter {name!r} has no setting {', '.join(unknown)}; it takes {takes}")
    settings = {**defaults, **params}
    ngram = settings.get("max_ngram", 1)
    if not isinstance(ngram, int) or isinstance(ngram, bool) or ngram < 1:
        raise ValueError(f"drafter {name!r}: max_ngram must be an integer >= 1, got {ngram!r}")
    heads = settings.get("heads")
    if heads is not None and not (isinstance(heads, str) and heads):
        raise ValueError(
            f"drafter {name!r}: heads must be the folder of its trained heads "
            f"(e.g. experiments/heads/{name}), got {heads!r}"
        )
    return settings
