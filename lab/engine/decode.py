"""Baseline autoregressive decoding with a KV cache, and the pieces every decode loop shares."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil
import torch
from transformers import DynamicCache, PreTrainedModel

from lab.engine.records import PromptResult, StepRecord
from lab.engine.sampling import Sampler, SamplingParams
from lab.models import LoadedModel

_PROCESS = psutil.Process()


def rss_mb() -> float:
    """Resident memory of this process in MiB."""
    return _PROCESS.memory_info().rss / 2**20


class Clock:
    """perf_counter in ms; synchronises CUDA first so GPU work is inside the interval."""

    def __init__(self, device: torch.device) -> None:
        self.cuda = device.type == "cuda"

    def now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize()
        return time.perf_counter() * 1000.0


def forward(
    model: PreTrainedModel, input_ids: torch.Tensor, cache: DynamicCache, keep: int
) -> torch.Tensor:
    """Run (1, n) new tokens through the model, extending cache; (keep, V) logits of the last."""
    out = model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=keep)
    return out.logits[0]


def forward_hidden(
    model: PreTrainedModel, input_ids: torch.Tensor, cache: DynamicCache, keep: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """forward() that also returns the (n, H) last hidden states (after the final norm)."""
    out = model(
        input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=keep,
        output_hidden_states=True,
    )  # fmt: skip
    return out.logits[0], out.hidden_states[-1][0]


def rollback(cache: DynamicCache, length: int) -> None:
    """Drop cached positions at or past length (transformers >= 5.24 crops by a negative count)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


@dataclass
class Session:
    """State of one generation: tokens so far, stop conditions, clock and step records."""

    lm: LoadedModel
    prompt_ids: list[int]
    max_new_tokens: int
    sampler: Sampler
    clock: Clock
    start_ms: float
    new_ids: list[int] = field(default_factory=list)
    steps: list[StepRecord] = field(default_factory=list)
    peak_rss: float = 0.0
    stop_reason: str = "length"
    # Called with each batch of kept tokens as it is emitted (lab serve streams from here).
    on_tokens: Callable[[list[int]], None] | None = None
    prompt_hidden: torch.Tensor | None = None  # (T, H), when start_session was asked for it

    @property
    def done(self) -> bool:
        return self.stop_reason == "eos" or len(self.new_ids) >= self.max_new_tokens

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.new_ids)

    def emit(self, tokens: list[int]) -> int:
        """Append tokens, cut at the first EOS and at max_new_tokens; return how many were kept."""
        kept: list[int] = []
        for token in tokens[: self.remaining]:
            kept.append(token)
            if token in self.lm.eos_token_ids:
                self.stop_reason = "eos"
                break
        self.new_ids.extend(kept)
        if self.on_tokens is not None and kept:
            self.on_tokens(kept)
        return len(kept)

    def record(self, **fields: float | int) -> None:
        """Append a step record, sampling RSS now."""
        rss = rss_mb()
        self.peak_rss = max(self.peak_rss, rss)
        self.steps.append(StepRecord(step=len(self.steps), rss_mb=rss, **fields))  # type: ignore[arg-type]

    def result(self, prefill_ms: float, draft_prefill_ms: float = 0.0) -> PromptResult:
        """The finished PromptResult."""
        total_ms = self.clock.now() - self.start_ms
        cuda = self.lm.device.type == "cuda"
        return PromptResult(
            prompt_ids=self.prompt_ids,
            token_ids=self.new_ids,
            text=str(self.lm.tokenizer.decode(self.new_ids, skip_special_tokens=True)),
            prefill_ms=prefill_ms,
            total_ms=total_ms,
            peak_rss_mb=max(self.peak_rss, rss_mb()),
            peak_cuda_mb=torch.cuda.max_memory_allocated() / 2**20 if cuda else None,
            steps=self.steps,
            draft_prefill_ms=draft_prefill_ms,
            stop_reason=self.stop_reason,
        )


def context_length(lm: LoadedModel) -> int | None:
    """How many positions the model can attend over, when its config says."""
    return getattr(lm.model.config, "max_position_embeddings", None)


def check_generation_args(lm: LoadedModel, max_new_tokens: int, prompt_ids: list[int]) -> None:
    """Reject arguments that cannot produce a generation, before any forward runs."""
    if not isinstance(max_new_tokens, int) or max_new_tokens <= 0:
        raise ValueError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not prompt_ids:
        raise ValueError("the prompt is empty: give at least one token")
    limit = context_length(lm)
    if limit is not None and len(prompt_ids) + max_new_tokens > limit:
        raise ValueError(
            f"prompt of {len(prompt_ids)} tokens + max_new_tokens {max_new_tokens} exceeds "
            f"{lm.name}'s context of {limit} tokens: shorten the prompt or max_new_tokens"
        )


def start_session(
    lm: LoadedModel,
    prompt_ids: list[int],
    max_new_tokens: int,
    params: SamplingParams,
    seed: int,
    on_tokens: Callable[[list[int]], None] | None = None,
    *,
    hidden: bool = False,
) -> tuple[Session, DynamicCache, float]:
    """Step 0: prefill the target on the prompt and emit the first token; (session, cache, ms).

    hidden=True also keeps the prompt's last hidden states in session.prompt_hidden.
    """
    check_generation_args(lm, max_new_tokens, prompt_ids)
    clock = Clock(lm.device)
    if clock.cuda:
        torch.cuda.reset_peak_memory_stats()
    start = clock.now()
    session = Session(
        lm, prompt_ids, max_new_tokens, Sampler(params, seed, lm.device), clock, start,
        on_tokens=on_tokens,
    )  # fmt: skip
    cache = DynamicCache(config=lm.model.config)
    ids = torch.tensor([prompt_ids], device=lm.device)  # (1, T)
    if hidden:
        logits, session.prompt_hidden = forward_hidden(lm.model, ids, cache, keep=1)
    else:
        logits = forward(lm.model, ids, cache, keep=1)  # (1, V)
    session.emit([int(session.sampler.choose(logits[-1]))])
    return session, cache, clock.now() - start


@torch.inference_mode()
def generate(
    lm: LoadedModel,
    prompt_ids: list[int],
    max_new_tokens: int,
    params: SamplingParams | None = None,
    seed: int = 0,
    on_tokens: Callable[[list[int]], None] | None = None,
) -> PromptResult:
    """Plain autoregressive decoding: one target forward per new token."""
    session, cache, prefill_ms = start_session(
        lm, prompt_ids, max_new_tokens, params or SamplingParams(), seed, on_tokens
    )
    while not session.done:
        t0 = session.clock.now()
        last = torch.tensor([[session.new_ids[-1]]], device=lm.device)  # (1, 1)
        logits = forward(lm.model, last, cache, keep=1)  # (1, V)
        token = int(session.sampler.choose(logits[-1]))
        t1 = session.clock.now()
        emitted = session.emit([token])
        session.record(
            k=0, proposed=0, accepted=0, emitted=emitted,
            draft_ms=0.0, verify_ms=t1 - t0, step_ms=session.clock.now() - t0,
        )  # fmt: skip
    return session.result(prefill_ms)
