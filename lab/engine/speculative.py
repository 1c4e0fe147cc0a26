"""The speculative loop: propose -> verify -> accept -> emit -> roll back caches -> next K."""

from __future__ import annotations

from collections.abc import Callable

import torch

from lab.engine.controllers import Controller
from lab.engine.decode import forward, forward_hidden, rollback, start_session
from lab.engine.drafter import Drafter
from lab.engine.policies import PolicySpec
from lab.engine.records import PromptResult
from lab.engine.sampling import SamplingParams
from lab.models import LoadedModel


@torch.inference_mode()
def generate(
    target: LoadedModel,
    drafter: Drafter,
    policy: PolicySpec,
    controller: Controller,
    prompt_ids: list[int],
    max_new_tokens: int,
    params: SamplingParams | None = None,
    seed: int = 0,
    on_tokens: Callable[[list[int]], None] | None = None,
) -> PromptResult:
    """Speculative decoding of one prompt; returns the same record shape as the baseline."""
    # 0. Prefill the target (which emits the first token) and the drafter.
    session, cache, prefill_ms = start_session(
        target, prompt_ids, max_new_tokens, params or SamplingParams(), seed, on_tokens,
        hidden=drafter.needs_hidden,
    )  # fmt: skip
    t0 = session.clock.now()
    drafter.start(prompt_ids)
    if session.prompt_hidden is not None:
        drafter.observe(session.prompt_hidden, 0)  # (T, H): the prompt's positions 0..T-1
    draft_prefill_ms = session.clock.now() - t0
    sampler = session.sampler
    empty = torch.empty(0, dtype=torch.long, device=target.device)
    while not session.done:
        step_start = session.clock.now()
        sequence = prompt_ids + session.new_ids
        # The target cache holds every token but the last emitted one: len(sequence) - 1.
        # 1. K for this step; never draft past max_new_tokens (the last token is the target's).
        k_chosen = controller.next_k()
        k = min(k_chosen, session.remaining - 1)
        # 2. Draft up to K tokens: (P,) ids on the target's device, P <= K (a drafter may
        # find fewer, e.g. prompt lookup without a match; P = 0 makes this a plain decode step).
        proposal = drafter.propose(sequence, k, sampler, policy.needs_draft_probs) if k else None
        draft_tokens = proposal.tokens.to(target.device) if proposal else empty
        proposed = int(draft_tokens.shape[0])
        verify_start = session.clock.now()
        # 3. One target forward scores all P+1 positions: (P+1, V). Drafters that read the
        # target's features get its (P+1, H) last hidden states, starting at position len - 1.
        ids = torch.cat([torch.tensor(sequence[-1:], device=target.device), draft_tokens])[None]
        if drafter.needs_hidden:
            target_logits, hidden = forward_hidden(target.model, ids, cache, proposed + 1)
            drafter.observe(hidden, len(sequence) - 1)
        else:
            target_logits = forward(target.model, ids, cache, proposed + 1)
        verify_end = session.clock.now()
        # 4. The policy decides how many drafts to keep and which token follows them.
        verdict = policy.fn(
            draft_tokens, proposal.probs if proposal else None, target_logits, sampler
        )
        # 5. Emit accepted drafts plus the correction/bonus token, cut at EOS and max_new_tokens.
        emitted = session.emit(draft_tokens[: verdict.accepted].tolist() + [verdict.next_token])
        # 6. Roll both caches back to the accepted prefix (the new last token stays uncached).
        valid = len(sequence) + verdict.accepted
        rollback(cache, valid)
        drafter.rollback(valid)
        accept_end = session.clock.now()
        # 7. The controller learns from the step and picks the next K.
        if proposed:
            controller.update(proposed, verdict.accepted)
        session.record(
            k=k_chosen, proposed=proposed, accepted=verdict.accepted, emitted=emitted,
            draft_ms=verify_start - step_start, verify_ms=verify_end - verify_start,
            accept_ms=accept_end - verify_end, step_ms=session.clock.now() - step_start,
        )  # fmt: skip
    return session.result(prefill_ms, draft_prefill_ms)
