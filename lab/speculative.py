"""The speculative loop: propose -> verify -> accept -> emit -> roll back caches -> next K."""

from __future__ import annotations

import torch

from lab.controllers import Controller
from lab.decode import forward, rollback, start_session
from lab.drafters import Drafter
from lab.models import LoadedModel
from lab.policies import PolicySpec
from lab.records import PromptResult
from lab.sampling import SamplingParams


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
) -> PromptResult:
    """Speculative decoding of one prompt; returns the same record shape as the baseline."""
    # 0. Prefill the target (which emits the first token) and the drafter.
    session, cache, prefill_ms = start_session(
        target, prompt_ids, max_new_tokens, params or SamplingParams(), seed
    )
    t0 = session.clock.now()
    drafter.start(prompt_ids)
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
        # 2. Draft K tokens: (K,) ids on the target's device.
        proposal = drafter.propose(sequence, k, sampler, policy.needs_draft_probs) if k else None
        draft_tokens = proposal.tokens.to(target.device) if proposal else empty
        verify_start = session.clock.now()
        # 3. One target forward scores all K+1 positions: (K+1, V).
        last = torch.tensor(sequence[-1:], device=target.device)  # (1,)
        target_logits = forward(target.model, torch.cat([last, draft_tokens])[None], cache, k + 1)
        # 4. The policy decides how many drafts to keep and which token follows them.
        verdict = policy.fn(
            draft_tokens, proposal.probs if proposal else None, target_logits, sampler
        )
        verify_end = session.clock.now()
        # 5. Emit accepted drafts plus the correction/bonus token, cut at EOS and max_new_tokens.
        emitted = session.emit(draft_tokens[: verdict.accepted].tolist() + [verdict.next_token])
        # 6. Roll both caches back to the accepted prefix (the new last token stays uncached).
        valid = len(sequence) + verdict.accepted
        rollback(cache, valid)
        drafter.rollback(valid)
        # 7. The controller learns from the step and picks the next K.
        if k:
            controller.update(k, verdict.accepted)
        session.record(
            k=k_chosen, proposed=k, accepted=verdict.accepted, emitted=emitted,
            draft_ms=verify_start - step_start, verify_ms=verify_end - verify_start,
            step_ms=session.clock.now() - step_start,
        )  # fmt: skip
    return session.result(prefill_ms, draft_prefill_ms)
