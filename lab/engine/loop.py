"""The one decode loop: plain decoding is speculation with no drafter, on any engine.

Each step: choose K -> draft -> verify in one target forward -> accept -> emit -> roll back both
caches -> update the controller. With no speculation K is 0, so a step is one decode forward and
the sampled token; the same clock points time every phase for every method. A drafter may
propose a token tree instead of a chain (Proposal.parents): the step then verifies every node in
one forward and keeps one root-to-leaf path (_tree_step).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from lab.engine import tree
from lab.engine.caches import Engine, engine_for
from lab.engine.controllers import Controller
from lab.engine.drafter import Drafter, Proposal
from lab.engine.model import LoadedModel
from lab.engine.policies import PolicySpec, Verdict
from lab.engine.records import PromptResult
from lab.engine.sampling import Sampler, SamplingParams
from lab.engine.session import Clock, Session, check_generation_args


@dataclass(frozen=True)
class Speculation:
    """What turns plain decoding into speculative decoding: who drafts, who accepts, which K."""

    drafter: Drafter
    policy: PolicySpec
    controller: Controller


@torch.inference_mode()
def generate(
    target: Engine | LoadedModel,
    prompt_ids: list[int],
    max_new_tokens: int,
    params: SamplingParams | None = None,
    seed: int = 0,
    on_tokens: Callable[[list[int]], None] | None = None,
    speculation: Speculation | None = None,
) -> PromptResult:
    """Generate from one prompt; a LoadedModel runs on the reference dynamic-cache engine."""
    engine = engine_for(target)
    hidden = speculation is not None and speculation.drafter.needs_hidden
    # 0. Prefill the target, which emits the first token, then the drafter.
    session, prefill_ms, prompt_hidden = _start(
        engine, prompt_ids, max_new_tokens, params or SamplingParams(), seed, on_tokens, hidden
    )
    draft_prefill_ms = 0.0
    if speculation is not None:
        t0 = session.clock.now()
        speculation.drafter.start(prompt_ids)
        if prompt_hidden is not None:
            speculation.drafter.observe(prompt_hidden, 0)  # (T, H): positions 0..T-1
        draft_prefill_ms = session.clock.now() - t0
    while not session.done:
        _step(engine, session, speculation)
    return session.result(prefill_ms, draft_prefill_ms)


def _start(
    engine: Engine,
    prompt_ids: list[int],
    max_new_tokens: int,
    params: SamplingParams,
    seed: int,
    on_tokens: Callable[[list[int]], None] | None,
    hidden: bool,
) -> tuple[Session, float, torch.Tensor | None]:
    """Step 0: prefill and emit the first token; (session, prefill ms, (T, H) hidden or None)."""
    lm = engine.lm
    check_generation_args(lm, max_new_tokens, prompt_ids)
    clock = Clock(lm.device)
    if clock.cuda:
        torch.cuda.reset_peak_memory_stats()
    start = clock.now()
    sampler = Sampler(params, seed, lm.device)
    session = Session(lm, prompt_ids, max_new_tokens, sampler, clock, start, on_tokens=on_tokens)
    logits, prompt_hidden = engine.start(prompt_ids, hidden)  # (1, V), (T, H) | None
    session.emit([int(sampler.choose(logits[-1]))])
    return session, clock.now() - start, prompt_hidden


def _step(engine: Engine, session: Session, speculation: Speculation | None) -> None:
    """One target forward: a decode step, or a verification step of the drafted tokens."""
    clock, device = session.clock, engine.lm.device
    step_start = clock.now()
    sequence = session.sequence
    # The target cache holds every token but the last emitted one: len(sequence) - 1.
    # 1. K for this step; never draft past max_new_tokens (the last token is the target's).
    k_chosen = speculation.controller.next_k() if speculation else 0
    k = min(k_chosen, session.remaining - 1)
    # 2. Draft up to K tokens: (P,) ids on the target's device, P <= K (a drafter may find
    # fewer, e.g. prompt lookup without a match; P = 0 makes this a plain decode step).
    proposal = _draft(speculation, sequence, k, session.sampler) if speculation and k else None
    if proposal is not None and proposal.parents is not None and len(proposal.tokens):
        assert speculation is not None
        _tree_step(engine, session, speculation, proposal, k_chosen, k, step_start)
        return
    draft_tokens = (
        proposal.tokens.to(device) if proposal else torch.empty(0, dtype=torch.long, device=device)
    )
    proposed = int(draft_tokens.shape[0])
    verify_start = clock.now()
    # 3. One target forward scores all P+1 positions: (P+1, V). Drafters that read the
    # target's features get its (P+1, H) last hidden states, starting at position len - 1.
    ids = torch.cat([torch.tensor(sequence[-1:], device=device), draft_tokens])[None]
    hidden = speculation is not None and speculation.drafter.needs_hidden
    target_logits, target_hidden = engine.forward(ids, proposed + 1, hidden)
    if speculation is not None and target_hidden is not None:
        speculation.drafter.observe(target_hidden, len(sequence) - 1)
    verify_end = clock.now()
    # 4. The policy decides how many drafts to keep and which token follows them; plain
    # decoding samples the target's next token.
    verdict = _verdict(speculation, draft_tokens, proposal, target_logits, session.sampler)
    # 5. Emit accepted drafts plus the correction/bonus token, cut at EOS and max_new_tokens.
    emitted = session.emit(draft_tokens[: verdict.accepted].tolist() + [verdict.next_token])
    # 6. Roll both caches back to the accepted prefix (the new last token stays uncached).
    valid = len(sequence) + verdict.accepted
    engine.rollback(valid)
    if speculation is not None:
        speculation.drafter.rollback(valid)
    accept_end = clock.now()
    # 7. The controller learns from the step and picks the next K.
    if speculation is not None and proposed:
        speculation.controller.update(proposed, verdict.accepted)
    session.record(
        k=k_chosen, proposed=proposed, depth=proposed, accepted=verdict.accepted, emitted=emitted,
        draft_ms=verify_start - step_start if speculation else 0.0,
        verify_ms=verify_end - verify_start,
        accept_ms=accept_end - verify_end, step_ms=clock.now() - step_start,
    )  # fmt: skip


def _tree_step(
    engine: Engine,
    session: Session,
    speculation: Speculation,
    proposal: Proposal,
    k_chosen: int,
    k: int,
    step_start: float,
) -> None:
    """Steps 3-7 for a token tree: verify all N nodes at once, keep the accepted path."""
    assert proposal.parents is not None
    clock, device, sampler = session.clock, engine.lm.device, session.sampler
    sequence = session.sequence
    draft_tokens, parents = proposal.tokens.to(device), proposal.parents.to(device)  # (N,), (N,)
    depth = max(tree.check(draft_tokens, parents, k), default=0)
    rule = speculation.policy.tree_rule()
    verify_start = clock.now()
    # 3. One forward scores root + N nodes under the tree mask: (N+1, V) and (N+1, H) | None.
    ids = torch.cat([torch.tensor(sequence[-1:], device=device), draft_tokens])[None]
    hidden = speculation.drafter.needs_hidden
    target_logits, target_hidden = engine.forward_tree(ids, parents, hidden)
    verify_end = clock.now()
    # 4. The policy picks one root-to-leaf path and the target's token after it.
    verdict = rule(draft_tokens, parents, proposal.probs, target_logits, sampler)
    path = verdict.path
    # 5. Emit the path plus the correction/bonus token, cut at EOS and max_new_tokens.
    emitted = session.emit(draft_tokens[path].tolist() + [verdict.next_token])
    # 6. Both caches keep the root and the path, in path order, as if it had been a chain:
    # feature drafters see the (1 + accepted, H) states of root + path from position len - 1.
    valid = len(sequence) + len(path)
    engine.keep_path(len(sequence), path)
    if target_hidden is not None:
        speculation.drafter.observe(target_hidden[[0, *(1 + n for n in path)]], len(sequence) - 1)
    speculation.drafter.rollback(valid)
    accept_end = clock.now()
    # 7. The controller sees the tree as a chain of its depth.
    speculation.controller.update(depth, len(path))
    session.record(
        k=k_chosen, proposed=len(draft_tokens), depth=depth, accepted=len(path), emitted=emitted,
        draft_ms=verify_start - step_start, verify_ms=verify_end - verify_start,
        accept_ms=accept_end - verify_end, step_ms=clock.now() - step_start,
    )  # fmt: skip


def _draft(speculation: Speculation, sequence: list[int], k: int, sampler: Sampler) -> Proposal:
    """The drafter's proposal of up to k tokens (with their distributions if the policy asks)."""
    return speculation.drafter.propose(sequence, k, sampler, speculation.policy.needs_draft_probs)


def _verdict(
    speculation: Speculation | None,
    draft_tokens: torch.Tensor,
    proposal: Proposal | None,
    target_logits: torch.Tensor,
    sampler: Sampler,
) -> Verdict:
    """The policy's verdict on the drafts; with no speculation, the sampled next token."""
    if speculation is None:
        return Verdict(0, int(sampler.choose(target_logits[-1])))
    probs = proposal.probs if proposal else None
    return speculation.policy.fn(draft_tokens, probs, target_logits, sampler)
