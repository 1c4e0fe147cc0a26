"""The oracle drafter: proposes the target's own greedy continuation, computed beforehand.

Every draft is then accepted at almost no draft cost, so speculative decoding runs at the loop's
ceiling: what lab bench's oracle methods and the roofline sweep measure.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence

import torch

from lab.engine.drafter import Proposal
from lab.engine.model import LoadedModel
from lab.engine.records import PromptResult
from lab.engine.sampling import Sampler


class OracleDrafter:
    """Proposes the target's greedy continuation, known beforehand: all accepted, no model run.

    With a greedy target every proposal is accepted, so speculative decoding runs at its
    ceiling: only the verification forwards and the loop's own overhead remain. If the target's
    verification ever picks another token (bf16 numerics of a K+1-token forward differ from a
    one-token one), the sequence leaves the known continuation and acceptance drops: reported,
    never hidden.
    """

    needs_hidden = False

    def __init__(
        self,
        continuations: Mapping[tuple[int, ...], Sequence[int]],
        vocab_size: int,
        device: torch.device,
    ) -> None:
        self.continuations = continuations
        self.vocab_size = vocab_size
        self.device = device
        self.known = torch.empty(0, dtype=torch.long, device=device)

    def start(self, prompt_ids: list[int]) -> None:
        """Put prompt + continuation on the device, so a proposal is a slice (no copy, no sync)."""
        key = tuple(prompt_ids)
        if key not in self.continuations:
            raise KeyError("oracle drafter: no continuation was computed for this prompt")
        self.known = torch.tensor([*prompt_ids, *self.continuations[key]], device=self.device)

    def propose(self, sequence: list[int], k: int, sampler: Sampler, want_probs: bool) -> Proposal:
        """The next k known tokens (fewer past the end of the continuation); (P,) ids."""
        tokens = self.known[len(sequence) : len(sequence) + k]  # (P,), a view
        # A point mass is the draft distribution, so lossless sampling policies stay lossless.
        probs = torch.nn.functional.one_hot(tokens, self.vocab_size).float() if want_probs else None
        return Proposal(tokens, probs)

    def observe(self, hidden_states: torch.Tensor, start: int) -> None:
        """The oracle reads no hidden states."""

    def rollback(self, length: int) -> None:
        """Nothing to roll back: the oracle keeps no per-step state."""


def oracle_for(results: Mapping[tuple[int, ...], PromptResult], lm: LoadedModel) -> OracleDrafter:
    """An oracle from greedy baseline results, keyed by prompt."""
    continuations = {prompt: r.token_ids for prompt, r in results.items()}
    return OracleDrafter(continuations, lm.model.config.vocab_size, lm.device)


RunOracle = Callable[[OracleDrafter, list[int], int], PromptResult]


def settle(
    run: RunOracle,
    lm: LoadedModel,
    prompt_ids: list[int],
    reference: list[int],
    max_new_tokens: int,
    max_passes: int = 8,
) -> tuple[PromptResult, int]:
    """Run the oracle until this decode path accepts every draft; (last run, passes).

    In bf16 a (K+1)-token verification can round a near-tie (random weights have many)
    differently from the one-token decode the reference came from; the oracle, which knows only
    the reference, is then rejected for the rest of the prompt. The path's own output is the
    target's greedy output under the path's own numerics, so the next pass replays it: every
    step before the first disagreement computes bit for bit as before, so that disagreement is
    now accepted and the next, if any, comes strictly later. Unsettled after max_passes, the
    last run stands and its acceptance says so.
    """
    vocab = lm.model.config.vocab_size
    passes = 0
    while True:
        passes += 1
        oracle = OracleDrafter({tuple(prompt_ids): reference}, vocab, lm.device)
        result = run(oracle, prompt_ids, max_new_tokens)
        if result.token_ids == reference or passes == max_passes:  # settled, or give up
            return result, passes
        reference = result.token_ids
