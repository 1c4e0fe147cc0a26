"""The controlled drafter: a real drafter's cost, with an acceptance chosen beforehand.

For machines without trained weights (random models of real shapes), where a draft model's own
proposals are never accepted: it runs the wrapped drafter's forwards, so drafting costs what it
really costs, then throws its tokens away and proposes the target's own greedy token (known from
a greedy baseline run, as the oracle knows it) with probability a, else a wrong one. Speculative
speed-ups can then be measured at any acceptance and held against Leviathan's prediction.
"""

from __future__ import annotations

import zlib
from collections.abc import Mapping, Sequence

import torch

from lab.engine.drafter import Drafter, Proposal
from lab.engine.sampling import Sampler, SamplingParams


def check_settings(acceptance: object, seed: object) -> None:
    """acceptance a number in [0, 1], seed an integer >= 0; else a ValueError."""
    if isinstance(acceptance, bool) or not isinstance(acceptance, int | float):
        raise ValueError(f"drafter 'controlled': acceptance must be a number, got {acceptance!r}")
    if not 0 <= acceptance <= 1:
        raise ValueError(f"drafter 'controlled': acceptance must be in [0, 1], got {acceptance!r}")
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"drafter 'controlled': seed must be an integer >= 0, got {seed!r}")


class ControlledDrafter:
    """Proposes the target's greedy token with probability a per position, at a drafter's cost.

    a is the probability that a drafted token is the target's greedy choice at its position
    (known from the reference continuation), drawn independently per position; otherwise the
    token is uniform over the other V - 1. It is Leviathan et al.'s alpha. Under the exact policy
    a step keeps the drafts up to the first wrong one, so with K drafted tokens the accepted
    count is a geometric run cut at K: P(accepted >= i) = a^i, hence

        E[accepted | K] = sum_{i=1..K} a^i,   tau = E[emitted per step] = 1 + sum_{i=1..K} a^i,

    and the acceptance rate accepted / proposed is that sum over K, below a for K > 1 (K = 4,
    a = 0.7: 1.773 / 4 = 0.443; only K = 1 gives a itself). Drafts after a wrong one are
    rejected whatever they are, so drawing them all independently changes none of this.

    The draws come from this drafter's own generator, reseeded at each start() from the seed
    and the prompt: a prompt's run repeats exactly whatever ran before it, and different prompts
    draw differently. The wrapped drafter keeps its own state in step (its cache then holds its
    own drafts where this drafter's were accepted: those outputs are discarded, and its cost
    depends on how many tokens it reads, not which). Acceptance is a only while the path follows
    the reference: greedy decoding whose verification agrees with the reference's numerics
    (lab.drafting.oracle.settle finds such a reference); the measured rate reports any gap.
    """

    def __init__(
        self,
        drafter: Drafter,
        continuations: Mapping[tuple[int, ...], Sequence[int]],
        vocab_size: int,
        device: torch.device,
        acceptance: float,
        seed: int = 0,
    ) -> None:
        check_settings(acceptance, seed)
        if vocab_size < 2:
            raise ValueError(
                f"drafter 'controlled': a wrong token needs vocab_size >= 2, got {vocab_size}"
            )
        self.drafter = drafter
        self.needs_hidden = drafter.needs_hidden
        self.continuations = continuations
        self.vocab_size = vocab_size
        self.device = device
        self.acceptance = float(acceptance)
        self.seed = seed
        self.generator = torch.Generator(device=device)
        # The wrapped drafter drafts greedily with no randomness of its own, so the target's
        # sampler stream stays the target's alone.
        self.greedy = Sampler(SamplingParams(), 0, device)
        self.known = torch.empty(0, dtype=torch.long, device=device)

    def start(self, prompt_ids: list[int]) -> None:
        """Reseed for this prompt, put prompt + continuation on the device, start the drafter."""
        key = tuple(prompt_ids)
        if key not in self.continuations:
            raise KeyError("drafter 'controlled': no continuation was computed for this prompt")
        # 32 bits: the CPU generator (mt19937) drops any higher ones.
        self.generator.manual_seed(zlib.crc32(f"{self.seed}:{prompt_ids}".encode()))
        self.known = torch.tensor([*prompt_ids, *self.continuations[key]], device=self.device)
        self.drafter.start(prompt_ids)

    def propose(self, sequence: list[int], k: int, sampler: Sampler, want_probs: bool) -> Proposal:
        """The wrapped drafter's k forwards, then per position the right token w.p. a; (P,) ids.

        P = k but fewer past the end of the continuation. With want_probs the draft
        distributions are point masses on the proposed tokens: rejection sampling then keeps a
        draft exactly when the greedy target chooses it, as the exact policy does.
        """
        right = self.known[len(sequence) : len(sequence) + k]  # (P,)
        p = int(right.shape[0])
        if p:
            self.drafter.propose(sequence, p, self.greedy, False)  # the cost; tokens discarded
        hit = torch.rand(p, generator=self.generator, device=self.device) < self.acceptance
        # right + 1 + r, r uniform in [0, V - 2]: uniform over the V - 1 tokens that are not right.
        offset = torch.randint(
            0, self.vocab_size - 1, (p,), generator=self.generator, device=self.device
        )
        tokens = torch.where(hit, right, (right + 1 + offset) % self.vocab_size)
        probs = torch.nn.functional.one_hot(tokens, self.vocab_size).float() if want_probs else None
        return Proposal(tokens, probs)

    def observe(self, hidden_states: torch.Tensor, start: int) -> None:
        """Passed on: a wrapped drafter that reads the target's states keeps its real cost."""
        self.drafter.observe(hidden_states, start)

    def rollback(self, length: int) -> None:
        """The wrapped drafter forgets rejected positions; this one keeps no per-step state."""
        self.drafter.rollback(length)


def expected_accepted(acceptance: float, k: int) -> float:
    """E[accepted drafts per step] with K = k under the exact policy: sum_{i=1..k} a^i."""
    return sum(acceptance**i for i in range(1, k + 1))


def expected_tau(acceptance: float, k: int) -> float:
    """Expected tokens emitted per step (mean accepted length): 1 + sum_{i=1..k} a^i."""
    return 1.0 + expected_accepted(acceptance, k)
