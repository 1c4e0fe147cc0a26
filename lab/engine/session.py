"""State of one generation: tokens so far, stop conditions, the clock and the step records."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import psutil
import torch

from lab.engine.model import LoadedModel
from lab.engine.records import PromptResult, StepRecord
from lab.engine.sampling import Sampler

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

    @property
    def done(self) -> bool:
        return self.stop_reason == "eos" or len(self.new_ids) >= self.max_new_tokens

    @property
    def remaining(self) -> int:
        return self.max_new_tokens - len(self.new_ids)

    @property
    def sequence(self) -> list[int]:
        return self.prompt_ids + self.new_ids

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
