"""A static KV cache and compiled fixed-shape steps for decoding and verification (as gpt-fast).

An engine owns a target and its KV cache behind three calls: `start` (prefill), `forward`
(n new tokens -> logits) and `rollback` (forget positions). `DynamicEngine` is what decode.py
and speculative.py do; `StaticEngine` preallocates a `StaticCache` once, so every step has the
same tensor addresses, compiles each step size with torch.compile and, on CUDA, captures it
as a CUDA graph. The two loops here are decode.generate and speculative.generate written
against an engine.

Why our own graphs rather than torch.compile(mode="reduce-overhead"): measured on an H200 with
the Qwen2.5-1.5B shape, that mode spent about 1 ms of host time per step (dynamo's guard check
over every parameter, then cudagraph-tree bookkeeping) against 2.3 ms of GPU work, and a loop
that must read each token before the next step cannot hide it. A captured torch.cuda.CUDAGraph
replays with one launch: the guards run once, at capture.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from typing import Protocol

import torch
from transformers import DynamicCache, StaticCache

from lab.engine.controllers import Controller
from lab.engine.decode import Clock, Session, check_generation_args, forward, rollback
from lab.engine.drafter import Drafter
from lab.engine.policies import PolicySpec
from lab.engine.records import PromptResult
from lab.engine.sampling import Sampler, SamplingParams
from lab.models import LoadedModel

# Every step size (and the cache-length guard) is one dynamo cache entry of the same code
# object; the default limit of 8 would silently drop K sweeps back to eager.
_RECOMPILE_LIMIT = 64


class Engine(Protocol):
    """A target model with its KV cache: prefill, forward new tokens, roll back."""

    lm: LoadedModel

    def start(self, prompt_ids: list[int]) -> torch.Tensor: ...

    def forward(self, input_ids: torch.Tensor, keep: int) -> torch.Tensor: ...

    def rollback(self, length: int) -> None: ...


class DynamicEngine:
    """A DynamicCache that grows each step and is cropped on rollback (decode.py's path)."""

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self.cache = DynamicCache(config=lm.model.config)

    def start(self, prompt_ids: list[int]) -> torch.Tensor:
        """Fresh cache, prefill the prompt; (1, V) logits of its last token."""
        self.cache = DynamicCache(config=self.lm.model.config)
        ids = torch.tensor([prompt_ids], device=self.lm.device)  # (1, T)
        return forward(self.lm.model, ids, self.cache, keep=1)

    def forward(self, input_ids: torch.Tensor, keep: int) -> torch.Tensor:
        """(1, n) new tokens -> (keep, V) logits of the last keep of them."""
        return forward(self.lm.model, input_ids, self.cache, keep)

    def rollback(self, length: int) -> None:
        """Drop cached positions at or past length."""
        rollback(self.cache, length)


class StaticEngine:
    """A preallocated StaticCache; steps of the sizes in `sizes` run as (compiled) fixed shapes.

    Rolling back only moves the cache's write position: entries past it stay in memory but the
    causal mask (query positions start at the cache length) never lets a query see them, and
    the next forward overwrites them. A step of n tokens that is not one of `sizes` is padded
    up to the next one with copies of its last token; the padded positions are written past
    the valid prefix and dropped at once, so a K sweep needs one graph per K, not one per tail
    length. Steps longer than every size (and all steps when `sizes` is empty) run as they come.
    """

    def __init__(
        self, lm: LoadedModel, max_len: int, compile: bool = False, sizes: Iterable[int] = ()
    ) -> None:
        self.lm = lm
        self.max_len = max_len
        self.cache = StaticCache(config=lm.model.config, max_cache_len=max_len)
        self.length = 0  # positions the cache holds; a host copy, so reading it never syncs
        self.compiled = compile
        self.sizes = sorted(set(sizes))
        self.compile_s = 0.0  # wall time spent compiling and capturing, all sizes together
        self._step: Callable[[torch.Tensor, int], torch.Tensor] = self._forward
        self._graphs: dict[int, _Graph] = {}
        self._seen: set[int] = set()
        if compile:
            if not self.sizes:
                raise ValueError("a compiled StaticEngine needs its step sizes, e.g. (1, K + 1)")
            torch._dynamo.config.recompile_limit = max(
                torch._dynamo.config.recompile_limit, _RECOMPILE_LIMIT
            )
            # Default mode: inductor's kernels without its own CUDA graphs (see the module doc).
            self._step = torch.compile(self._forward, fullgraph=True, dynamic=False)

    def start(self, prompt_ids: list[int]) -> torch.Tensor:
        """Reset the write position and prefill eagerly (prompt lengths vary); (1, V) logits."""
        self.rollback(0)
        ids = torch.tensor([prompt_ids], device=self.lm.device)  # (1, T)
        self._reserve(ids.shape[1])
        logits = self._forward(ids, 1)
        self.length = ids.shape[1]
        return logits

    def forward(self, input_ids: torch.Tensor, keep: int) -> torch.Tensor:
        """(1, n) new tokens -> (keep, V) logits of the last keep of them."""
        n = input_ids.shape[1]
        size = next((s for s in self.sizes if s >= n), None)
        if size is None:  # longer than every fixed size (or none given): run as it comes
            self._reserve(n)
            logits = self._forward(input_ids, keep)
            self.length += n
            return logits
        self._reserve(size)
        if size > n:  # pad with the last token; the extra positions are rolled back below
            input_ids = torch.cat([input_ids, input_ids[:, -1:].expand(1, size - n)], dim=1)
        logits = self._fixed(input_ids, size)[n - keep : n]  # (keep, V)
        self.length += size
        self.rollback(self.length - (size - n))
        return logits

    def rollback(self, length: int) -> None:
        """Move the write position back to length (stale entries are masked, then overwritten)."""
        if length < self.length:
            self.cache.crop(length - self.length)  # a negative count: remove that many
            self.length = length

    def warmup(self, prompt_ids: list[int]) -> None:
        """Compile (and on CUDA capture) every size now, so no timed step pays for it."""
        if not self.compiled:
            return
        self.start(prompt_ids)
        for size in self.sizes:
            self._prepare(size)
        self.rollback(0)

    def _fixed(self, input_ids: torch.Tensor, size: int) -> torch.Tensor:
        """One fixed-shape step of `size` tokens; (size, V) logits owned by the caller."""
        if not self.compiled:
            return self._forward(input_ids, size)
        self._prepare(size)
        graph = self._graphs.get(size)
        if graph is None:  # CPU: inductor's compiled code, called directly
            return self._step(input_ids, size)
        graph.input_ids.copy_(input_ids)
        graph.graph.replay()  # writes graph.logits and advances the cache by `size` positions
        # The next replay of this graph overwrites its logits: hand out a copy.
        return graph.logits.clone()

    def _prepare(self, size: int) -> None:
        """Compile `size` once (and capture it on CUDA), leaving the cache as it found it."""
        if size in self._seen:
            return
        start = time.perf_counter()
        ids = torch.zeros((1, size), dtype=torch.long, device=self.lm.device)  # (1, size)

        def undo() -> None:  # a trial step really ran: move the write position back
            self.cache.crop(-size)

        if self.lm.device.type == "cuda":
            self._graphs[size] = _Graph.capture(self._step, ids, undo)
        else:
            self._step(ids, size)
            undo()
        self._seen.add(size)
        self.compile_s += time.perf_counter() - start

    def _forward(self, input_ids: torch.Tensor, keep: int) -> torch.Tensor:
        """The model's public forward on the static cache; (keep, V) logits."""
        out = self.lm.model(input_ids=input_ids, cache=self.cache, use_cache=True,
                            logits_to_keep=keep)  # fmt: skip
        return out.logits[0]

    def _reserve(self, n: int) -> None:
        if self.length + n > self.max_len:
            raise ValueError(
                f"static cache of {self.max_len} positions is full: {self.length} cached + {n} "
                "new; build the engine with a larger max_len (prompt + max_new_tokens + K + 1)"
            )


class _Graph:
    """One captured step: its static input buffer, the CUDA graph, and the logits it writes."""

    def __init__(
        self, input_ids: torch.Tensor, graph: torch.cuda.CUDAGraph, logits: torch.Tensor
    ) -> None:
        self.input_ids = input_ids  # (1, size), copied into before each replay
        self.graph = graph
        self.logits = logits  # (size, V), rewritten by each replay

    @classmethod
    def capture(
        cls,
        step: Callable[[torch.Tensor, int], torch.Tensor],
        input_ids: torch.Tensor,
        undo: Callable[[], None],
    ) -> _Graph:
        """Compile step on input_ids' shape, then capture one call of it as a CUDA graph."""
        size = input_ids.shape[1]
        # Warm-up calls (compilation, cuBLAS workspaces) belong on a side stream before the
        # capture; they really run, so each is undone.
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                step(input_ids, size)
                undo()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # records without running: the cache is left as it was
            logits = step(input_ids, size)
        torch.cuda.synchronize()
        return cls(input_ids, graph, logits)


def cache_length(prompts: list[list[int]], max_new_tokens: int, max_k: int) -> int:
    """Static cache positions enough for every prompt: prompt + new tokens + one K+1 step."""
    return max(map(len, prompts)) + max_new_tokens + max_k + 1


def start_session(
    engine: Engine, prompt_ids: list[int], max_new_tokens: int, params: SamplingParams, seed: int
) -> tuple[Session, float]:
    """Step 0: prefill the target and emit the first token; (session, prefill ms)."""
    lm = engine.lm
    check_generation_args(lm, max_new_tokens, prompt_ids)
    clock = Clock(lm.device)
    if clock.cuda:
        torch.cuda.reset_peak_memory_stats()
    start = clock.now()
    sampler = Sampler(params, seed, lm.device)
    session = Session(lm, prompt_ids, max_new_tokens, sampler, clock, start)
    logits = engine.start(prompt_ids)  # (1, V)
    session.emit([int(sampler.choose(logits[-1]))])
    return session, clock.now() - start


@torch.inference_mode()
def generate(
    engine: Engine,
    prompt_ids: list[int],
    max_new_tokens: int,
    params: SamplingParams | None = None,
    seed: int = 0,
) -> PromptResult:
    """Plain autoregressive decoding on an engine: one target forward per new token."""
    session, prefill_ms = start_session(
        engine, prompt_ids, max_new_tokens, params or SamplingParams(), seed
    )
    device = engine.lm.device
    while not session.done:
        t0 = session.clock.now()
        last = torch.tensor([[session.new_ids[-1]]], device=device)  # (1, 1)
        logits = engine.forward(last, keep=1)  # (1, V)
        token = int(session.sampler.choose(logits[-1]))
        t1 = session.clock.now()
        emitted = session.emit([token])
        session.record(
            k=0, proposed=0, accepted=0, emitted=emitted,
            draft_ms=0.0, verify_ms=t1 - t0, step_ms=session.clock.now() - t0,
        )  # fmt: skip
    return session.result(prefill_ms)


@torch.inference_mode()
def speculative(
    engine: Engine,
    drafter: Drafter,
    policy: PolicySpec,
    controller: Controller,
    prompt_ids: list[int],
    max_new_tokens: int,
    params: SamplingParams | None = None,
    seed: int = 0,
) -> PromptResult:
    """Speculative decoding of one prompt on an engine; the same steps as speculative.generate."""
    if drafter.needs_hidden:
        raise ValueError(
            "drafters that read the target's hidden states (medusa, eagle) run on the dynamic "
            "cache only: use static_cache: false for them"
        )
    # 0. Prefill the target (which emits the first token) and the drafter.
    session, prefill_ms = start_session(
        engine, prompt_ids, max_new_tokens, params or SamplingParams(), seed
    )
    t0 = session.clock.now()
    drafter.start(prompt_ids)
    draft_prefill_ms = session.clock.now() - t0
    device = engine.lm.device
    empty = torch.empty(0, dtype=torch.long, device=device)
    while not session.done:
        step_start = session.clock.now()
        sequence = prompt_ids + session.new_ids
        # The target cache holds every token but the last emitted one: len(sequence) - 1.
        # 1. K for this step; never draft past max_new_tokens (the last token is the target's).
        k_chosen = controller.next_k()
        k = min(k_chosen, session.remaining - 1)
        # 2. Draft up to K tokens: (P,) ids on the target's device, P <= K.
        want_probs = policy.needs_draft_probs
        proposal = drafter.propose(sequence, k, session.sampler, want_probs) if k else None
        draft_tokens = proposal.tokens.to(device) if proposal else empty
        proposed = int(draft_tokens.shape[0])
        verify_start = session.clock.now()
        # 3. One target forward scores all P+1 positions: (P+1, V).
        ids = torch.cat([torch.tensor(sequence[-1:], device=device), draft_tokens])[None]
        target_logits = engine.forward(ids, proposed + 1)
        # 4. The policy decides how many drafts to keep and which token follows them.
        verdict = policy.fn(
            draft_tokens, proposal.probs if proposal else None, target_logits, session.sampler
        )
        verify_end = session.clock.now()
        # 5. Emit accepted drafts plus the correction/bonus token, cut at EOS and max_new_tokens.
        emitted = session.emit(draft_tokens[: verdict.accepted].tolist() + [verdict.next_token])
        # 6. Roll both caches back to the accepted prefix (the new last token stays uncached).
        valid = len(sequence) + verdict.accepted
        engine.rollback(valid)
        drafter.rollback(valid)
        # 7. The controller learns from the step and picks the next K.
        if proposed:
            controller.update(proposed, verdict.accepted)
        session.record(
            k=k_chosen, proposed=proposed, accepted=verdict.accepted, emitted=emitted,
            draft_ms=verify_start - step_start, verify_ms=verify_end - verify_start,
            step_ms=session.clock.now() - step_start,
        )  # fmt: skip
    return session.result(prefill_ms, draft_prefill_ms)
