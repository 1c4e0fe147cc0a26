"""Engines: a model with its KV cache behind prefill, forward and rollback (the loop takes one).

An engine owns a model and its KV cache behind three calls: `start` (prefill), `forward`
(n new tokens -> logits) and `rollback` (forget positions). `DynamicEngine` grows a transformers
DynamicCache and is the reference; `StaticEngine` preallocates a `StaticCache` once, so every
step has the same tensor addresses, compiles each step size with torch.compile and, on CUDA,
captures it as a CUDA graph (as gpt-fast does).

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
from transformers.cache_utils import DynamicLayer

from lab.engine import fuse as fusion
from lab.engine import tree
from lab.engine.model import LoadedModel

# Every step size (and the cache-length guard) is one dynamo cache entry of the same code
# object; the default limit of 8 would silently drop K sweeps back to eager.
_RECOMPILE_LIMIT = 64


def forward(
    model: torch.nn.Module, input_ids: torch.Tensor, cache: DynamicCache, keep: int
) -> torch.Tensor:
    """Run (1, n) new tokens through the model, extending cache; (keep, V) logits of the last."""
    out = model(input_ids=input_ids, cache=cache, use_cache=True, logits_to_keep=keep)
    return out.logits[0]


def forward_hidden(
    model: torch.nn.Module, input_ids: torch.Tensor, cache: DynamicCache, keep: int
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


def keep_slots(cache: DynamicCache, length: int, slots: list[int]) -> None:
    """Keep positions [0, length) and then the cached positions in slots, in that order."""
    if slots != list(range(length, length + len(slots))):  # a chain's prefix needs no copy
        for layer in cache.layers:
            if type(layer) is not DynamicLayer:  # a sliding window would shift the slots
                kind = type(layer).__name__
                raise ValueError(f"token trees compact plain DynamicCache layers only, not {kind}")
            keys, values = layer.keys, layer.values  # (B, heads, positions, D)
            assert keys is not None and values is not None
            index = torch.tensor(slots, device=keys.device)
            # Gather first (a copy), then write: sources and destinations may overlap.
            keys[..., length : length + len(slots), :] = keys[..., index, :]
            values[..., length : length + len(slots), :] = values[..., index, :]
    rollback(cache, length + len(slots))


class Engine(Protocol):
    """A model with its KV cache: prefill, forward new tokens, roll back.

    hidden=True also returns the (n, H) last hidden states of the n positions fed (the feature
    drafters read them); otherwise the second value is None.
    """

    lm: LoadedModel

    def start(
        self, prompt_ids: list[int], hidden: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def forward(
        self, input_ids: torch.Tensor, keep: int, hidden: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]: ...

    def rollback(self, length: int) -> None: ...

    def forward_tree(
        self, input_ids: torch.Tensor, parents: torch.Tensor, hidden: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(1, N+1) root + tree nodes (lab.engine.tree) -> (N+1, V) logits, all in one forward."""
        ...

    def keep_path(self, length: int, path: list[int]) -> None:
        """After forward_tree: keep positions [0, length) (root included), then path's nodes."""
        ...


class DynamicEngine:
    """A DynamicCache that grows each step and is cropped on rollback: the reference engine."""

    def __init__(self, lm: LoadedModel) -> None:
        self.lm = lm
        self.cache = DynamicCache(config=lm.model.config)

    def start(
        self, prompt_ids: list[int], hidden: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Fresh cache, prefill the prompt; (1, V) logits of its last token."""
        self.cache = DynamicCache(config=self.lm.model.config)
        ids = torch.tensor([prompt_ids], device=self.lm.device)  # (1, T)
        return self.forward(ids, 1, hidden)

    def forward(
        self, input_ids: torch.Tensor, keep: int, hidden: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(1, n) new tokens -> (keep, V) logits of the last keep of them."""
        if hidden:
            return forward_hidden(self.lm.model, input_ids, self.cache, keep)
        return forward(self.lm.model, input_ids, self.cache, keep), None

    def rollback(self, length: int) -> None:
        """Drop cached positions at or past length."""
        rollback(self.cache, length)

    def forward_tree(
        self, input_ids: torch.Tensor, parents: torch.Tensor, hidden: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(1, N+1) root + nodes -> (N+1, V) logits under the tree mask and per-node positions."""
        past = self.cache.get_seq_length()
        model, device = self.lm.model, self.lm.device
        out = model(
            input_ids=input_ids, cache=self.cache, use_cache=True,
            attention_mask=tree.attention_mask(parents, past, model.dtype, device),  # (1,1,N+1,L)
            position_ids=tree.position_ids(parents.to(device), past),  # (1, N+1)
            logits_to_keep=input_ids.shape[1], output_hidden_states=hidden,
        )  # fmt: skip
        return out.logits[0], out.hidden_states[-1][0] if hidden else None

    def keep_path(self, length: int, path: list[int]) -> None:
        """Keep [0, length) and the path's nodes (node i sits at length + i after forward_tree)."""
        keep_slots(self.cache, length, [length + node for node in path])


class StaticEngine:
    """A preallocated StaticCache; steps of the sizes in `sizes` run as (compiled) fixed shapes.

    Rolling back only moves the cache's write position: entries past it stay in memory but the
    causal mask (query positions start at the cache length) never lets a query see them, and
    the next forward overwrites them. A step of n tokens that is not one of `sizes` is padded
    up to the next one with copies of its last token; the padded positions are written past
    the valid prefix and dropped at once, so a K sweep needs one graph per K, not one per tail
    length. Steps longer than every size (and all steps when `sizes` is empty) run as they come.
    fuse=True fuses the model's q/k/v and gate/up projections in place (lab.engine.fuse): every
    engine on that model then runs them fused.
    """

    def __init__(
        self, lm: LoadedModel, max_len: int, compile: bool = False, sizes: Iterable[int] = (),
        fuse: bool = False,
    ) -> None:  # fmt: skip
        if fuse:
            fusion.fuse(lm.model)
        self.fused = fusion.is_fused(lm.model)
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

    def start(
        self, prompt_ids: list[int], hidden: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Reset the write position and prefill eagerly (prompt lengths vary); (1, V) logits."""
        _no_hidden(hidden)
        self.rollback(0)
        ids = torch.tensor([prompt_ids], device=self.lm.device)  # (1, T)
        self._reserve(ids.shape[1])
        logits = self._forward(ids, 1)
        self.length = ids.shape[1]
        return logits, None

    def forward(
        self, input_ids: torch.Tensor, keep: int, hidden: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(1, n) new tokens -> (keep, V) logits of the last keep of them."""
        _no_hidden(hidden)
        n = input_ids.shape[1]
        size = next((s for s in self.sizes if s >= n), None)
        if size is None:  # longer than every fixed size (or none given): run as it comes
            self._reserve(n)
            logits = self._forward(input_ids, keep)
            self.length += n
            return logits, None
        self._reserve(size)
        if size > n:  # pad with the last token; the extra positions are rolled back below
            input_ids = torch.cat([input_ids, input_ids[:, -1:].expand(1, size - n)], dim=1)
        logits = self._fixed(input_ids, size)[n - keep : n]  # (keep, V)
        self.length += size
        self.rollback(self.length - (size - n))
        return logits, None

    def forward_tree(
        self, input_ids: torch.Tensor, parents: torch.Tensor, hidden: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Token trees are verified on the dynamic engine only."""
        raise ValueError(_NO_TREES)

    def keep_path(self, length: int, path: list[int]) -> None:
        """Token trees are verified on the dynamic engine only."""
        raise ValueError(_NO_TREES)

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


_NO_TREES = (
    "token trees (a drafter's proposal with parents, e.g. medusa's tree_size) are verified on "
    "the dynamic engine only: use the dynamic engine (static_cache: false), or a chain "
    "(tree_size: null)"
)


def _no_hidden(hidden: bool) -> None:
    if hidden:
        raise ValueError(
            "drafters that read the target's hidden states (medusa, eagle) run on the dynamic "
            "engine only: use the dynamic engine (static_cache: false) for them"
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


ENGINES = ("dynamic", "static", "compiled")


def make_engine(
    lm: LoadedModel, kind: str, max_len: int | None = None, sizes: Iterable[int] = (),
    fuse: bool | None = None,
) -> DynamicEngine | StaticEngine:  # fmt: skip
    """The engine named kind for lm; static and compiled need max_len (see cache_length).

    fuse: whether a static or compiled engine fuses the model's projections (None: the
    device's default, lab.engine.fuse.default_fuse); the dynamic reference never fuses.
    """
    if kind == "dynamic":
        return DynamicEngine(lm)
    if kind not in ENGINES:
        raise ValueError(f"unknown engine {kind!r}: use one of {', '.join(ENGINES)}")
    if max_len is None:
        raise ValueError(f"a {kind} engine needs max_len: prompt + max_new_tokens + K + 1")
    fuse = fusion.default_fuse(lm.device) if fuse is None else fuse
    return StaticEngine(lm, max_len, compile=kind == "compiled", sizes=sizes, fuse=fuse)


def engine_for(lm: LoadedModel | Engine) -> Engine:
    """An engine as given, or the reference DynamicEngine around a loaded model."""
    return DynamicEngine(lm) if isinstance(lm, LoadedModel) else lm
