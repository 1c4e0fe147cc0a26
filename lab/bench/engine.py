"""`lab bench-engine`: the machine's read bandwidth, then per model, dtype and engine the costs
speculative decoding rests on: decode tok/s against the bandwidth limit, a forward of n = 1..9
tokens against one of 1, the draft's c, prefill tok/s. One JSON per (model, dtype, engine) under
experiments/engine/<machine>/.
"""

from __future__ import annotations

import gc
import json
import random
import re
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any

import torch

from lab import machine
from lab.bench.results import environment
from lab.bench.roofline import weight_bytes_per_token
from lab.engine import caches, prepack, quantize, smallm
from lab.engine.caches import ENGINES, Engine, StaticEngine
from lab.engine.fuse import is_fused
from lab.engine.model import LoadedModel

SIZES = tuple(range(1, 10))  # tokens in one forward: decode (1) and verify at K = 1..8
# A compiled engine compiles (and on CUDA captures) one graph per size, about 15-30 s each for a
# 1.5B model: nine sizes ran past the GPU's time budget, so it measures decode, the draft model's
# 2-token step and verify at K = 4 and K = 8 only.
COMPILED_SIZES = (1, 2, 5, 9)
# Attention kernels a benchmark can ask for: transformers' sdpa (on CUDA bf16 torch dispatches it
# to cuDNN), sdpa with cuDNN's backend switched off (torch then picks memory-efficient attention),
# or transformers' eager attention (matmul + softmax, which inductor fuses in a compiled step).
ATTENTIONS = ("sdpa", "sdpa-no-cudnn", "eager")
VERIFY_K4 = 5  # K = 4 drafts verified with the bonus position: a forward of 5 tokens
# CPU flags that decide which dtype and kernels are fast (bf16 matrix units, wide vectors).
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16", "amx_int8")
GIB = 2**30


@dataclass(frozen=True)
class Settings:
    """How much each measurement runs: sizes in tokens, repetitions of each timed call."""

    prompt_tokens: int = 128  # cache length the forwards and decode steps run on
    prefill_tokens: int = 256
    repeats: int = 9  # rounds of the interleaved forward sizes; median over rounds
    decode_steps: int = 32
    prefill_repeats: int = 3
    bandwidth_bytes: int | None = None  # streamed buffer; default 1 GiB on CPU, 4 GiB on GPU
    seed: int = 0
    fuse: bool | None = None  # fused q/k/v and gate/up on static engines (None: the device's)
    # oneDNN-prepacked linears for multi-token steps (lab.engine.prepack). None: where they
    # apply (CPU float32), each engine measured both without and with them, side by side.
    prepack: bool | None = None
    attention: str = "sdpa"  # one of ATTENTIONS
    quantize: bool = False  # int8 weight-only linears (lab.engine.quantize; CPU)

    def __post_init__(self) -> None:
        for name in ("prompt_tokens", "prefill_tokens", "repeats", "decode_steps",
                     "prefill_repeats"):  # fmt: skip
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive integer, got {getattr(self, name)}")
        if self.attention not in ATTENTIONS:
            raise ValueError(f"unknown attention {self.attention!r}: use one of "
                             f"{', '.join(ATTENTIONS)}")  # fmt: skip
        if self.quantize and self.prepack:
            raise ValueError("int8 linears replace prepacked ones: not both")
        if self.bandwidth_bytes is not None and self.bandwidth_bytes < 2**20:
            raise ValueError(f"bandwidth_bytes must be at least 1 MiB, got {self.bandwidth_bytes}")

    @property
    def max_len(self) -> int:
        """Static cache positions every measurement fits in."""
        return max(self.prefill_tokens, self.prompt_tokens + self.decode_steps + max(SIZES))


def set_attention(lm: LoadedModel, name: str) -> None:
    """Run lm's attention with the named kernel (ATTENTIONS); sdpa-no-cudnn is process-wide."""
    if name not in ATTENTIONS:
        raise ValueError(f"unknown attention {name!r}: use one of {', '.join(ATTENTIONS)}")
    torch.backends.cuda.enable_cudnn_sdp(name != "sdpa-no-cudnn")
    lm.model.set_attn_implementation("eager" if name == "eager" else "sdpa")


def check_engines(names: Sequence[str]) -> None:
    """Raise naming the valid engines unless every name is one."""
    unknown = [n for n in names if n not in ENGINES]
    if unknown or not names:
        raise ValueError(f"unknown engine(s) {unknown or names}: use some of {', '.join(ENGINES)}")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _seconds(call: Callable[[], object], device: torch.device) -> float:
    """Wall time of one call, device work included."""
    _sync(device)
    start = time.perf_counter()
    call()
    _sync(device)
    return time.perf_counter() - start


# --- the machine ---------------------------------------------------------------------------------


@torch.inference_mode()
def read_bandwidth(device: torch.device, nbytes: int | None = None, repeats: int = 5) -> float:
    """Bytes/s of a streaming read of a buffer far larger than the caches (a sum on GPU, the
    fastest matrix-vector product on CPU), best of `repeats`: the rate a decode step can read
    its weights at, measured rather than datasheet."""
    nbytes = nbytes or (4 * GIB if device.type == "cuda" else GIB)
    buffer = torch.ones(nbytes // 4, dtype=torch.float32, device=device)  # (N,): touches all pages
    reads: list[Callable[[], object]] = [buffer.sum]
    if device.type == "cpu":
        # A decode step reads its weights through a matrix-vector product, which streams faster
        # than torch.sum on 2 cores (MKL 21 against 17.6 GB/s on a Xeon): the probe must read
        # the way decoding does, or decode would show above 1.0 of its "limit". Which product is
        # fastest depends on the CPU (MKL's is slow on an AMD EPYC, oneDNN's packed one is what
        # prepacked linears run there): the best of them.
        matrix = buffer.view(-1, 4096)  # (N / 4096, 4096)
        vector = torch.ones(1, 4096, dtype=torch.float32)
        reads = [partial(torch.mv, matrix, vector[0])]
        if prepack.applies(device, torch.float32):
            packed = prepack.reorder(matrix)
            reads.append(partial(prepack.packed_linear, vector, packed, None))
        if prepack.plan().kernel:  # lab's own kernel, where linears run it
            blocks = smallm.pack(matrix)
            reads.append(partial(smallm.linear, vector, blocks))
    best = float("inf")
    for read in reads:
        read()  # first call: kernel selection, thread-pool start
        best = min(best, *(_seconds(read, device) for _ in range(repeats)))
    size = buffer.numel() * buffer.element_size()
    del buffer, reads
    return size / best


def cpu_flags() -> list[str]:
    """Of CPU_FLAGS, the ones this CPU has (Linux /proc/cpuinfo; empty elsewhere)."""
    have = machine.cpu_flags()
    return [f for f in CPU_FLAGS if f in have]


def machine_slug(device_name: str) -> str:
    """A file-system-safe folder name for a device: 'NVIDIA H200' -> 'nvidia-h200'."""
    name = re.sub(r"\((r|tm)\)|\bcpu\b|@\s*[0-9.]+\s*ghz", " ", device_name.lower())  # marks, clock
    slug = re.sub(r"[^a-z0-9.]+", "-", name).strip("-.")
    if not slug:
        raise ValueError(f"device name {device_name!r} gives no folder name")
    return slug


# --- one model on one engine ---------------------------------------------------------------------


def sizes_for(engine_name: str) -> tuple[int, ...]:
    """The forward sizes measured on an engine: all of SIZES unless each must be compiled."""
    return COMPILED_SIZES if engine_name == "compiled" else SIZES


def make_engine(lm: LoadedModel, name: str, max_len: int, fuse: bool | None = None) -> Engine:
    """The named engine around a loaded model, with fixed steps of sizes_for(name)."""
    check_engines([name])
    return caches.make_engine(lm, name, max_len, sizes=sizes_for(name), fuse=fuse)


def token_ids(lm: LoadedModel, n: int, seed: int) -> list[int]:
    """n seeded random token ids: costs depend on how many tokens, not which."""
    rng = random.Random(seed)
    return [rng.randrange(lm.model.config.vocab_size) for _ in range(n)]


@torch.inference_mode()
def forward_costs(
    engine: Engine, prompt_ids: list[int], repeats: int, seed: int = 0,
    sizes: Sequence[int] = SIZES,
) -> dict[int, dict[str, float]]:  # fmt: skip
    """Per n in sizes: median ms of a forward of n tokens on the warm prompt, and its ratio to n=1.

    Each round runs every n once, in a fresh random order, each followed by a rollback to the
    prompt; the ratio is the median over rounds of t(n) / t(1) within the round, so load that
    changes between rounds moves both alike.
    """
    device = engine.lm.device
    engine.start(prompt_ids)
    fed = torch.tensor([token_ids(engine.lm, max(sizes), seed + 1)], device=device)  # (1, max)
    length = len(prompt_ids)
    rng = random.Random(seed)
    rounds: list[dict[int, float]] = []
    for r in range(repeats + 1):  # round 0 warms every size and is dropped
        order = list(sizes)
        rng.shuffle(order)
        times = {}
        for n in order:
            times[n] = _seconds(partial(engine.forward, fed[:, :n], n), device)
            engine.rollback(length)
        if r:
            rounds.append(times)
    return {
        n: {
            "ms": 1000.0 * statistics.median(t[n] for t in rounds),
            "ratio": statistics.median(t[n] / t[1] for t in rounds),
        }
        for n in sizes
    }


@torch.inference_mode()
def decode_steps_ms(
    engines: Sequence[Engine], prompts: Sequence[list[int]], steps: int
) -> list[float]:
    """Median ms of a greedy decode step (forward of 1, argmax read on the host) per engine.

    The engines' steps alternate (in turn-rotating order), so the draft's and the target's
    step times, whose ratio is c, are taken side by side. A first, untimed pass over the same
    positions warms every shape the timed one meets (cuDNN attention is slow on a new one).
    """
    times: list[list[float]] = [[] for _ in engines]
    for timed in (False, True):
        tokens = []
        for engine, ids in zip(engines, prompts, strict=True):
            logits, _ = engine.start(ids)  # (1, V)
            tokens.append(int(logits[-1].argmax()))
        for step in range(steps):
            turn = step % len(engines)
            for i in [*range(turn, len(engines)), *range(turn)]:
                start = time.perf_counter()
                fed = torch.tensor([[tokens[i]]], device=engines[i].lm.device)  # (1, 1)
                logits, _ = engines[i].forward(fed, 1)  # (1, V)
                tokens[i] = int(logits[-1].argmax())  # the host reads the token, as the loop does
                if timed:
                    times[i].append(time.perf_counter() - start)
    return [1000.0 * statistics.median(t) for t in times]


@torch.inference_mode()
def prefill_ms(engine: Engine, prompt_ids: list[int], repeats: int) -> float:
    """Median ms of prefilling the prompt into a fresh cache (one untimed warm-up first)."""
    device = engine.lm.device
    engine.start(prompt_ids)
    return 1000.0 * statistics.median(
        _seconds(partial(engine.start, prompt_ids), device) for _ in range(repeats)
    )


# --- a run: every model on one engine ------------------------------------------------------------


def _entry(
    lm: LoadedModel, engine_name: str, bandwidth: float, step_ms: float,
    costs: dict[int, dict[str, float]], prefill: float, settings: Settings,
) -> dict[str, Any]:  # fmt: skip
    """One (model, dtype, engine) result, without the machine's fields."""
    weight_bytes = weight_bytes_per_token(lm.model)
    limit = bandwidth / weight_bytes
    rate = 1000.0 / step_ms
    return {
        "model": lm.name,
        "dtype": str(lm.dtype).removeprefix("torch."),
        "engine": engine_name,
        "weight_bytes_per_token": weight_bytes,
        "bandwidth_limit_tokens_per_s": limit,
        "decode_step_ms": step_ms,
        "decode_tokens_per_s": rate,
        "fraction_of_bandwidth_limit": rate / limit,
        "forward": [{"tokens": n, **costs[n]} for n in sorted(costs)],
        "verify_over_decode_k4": costs[VERIFY_K4]["ratio"],
        "prefill_tokens": settings.prefill_tokens,
        "prefill_ms": prefill,
        "prefill_tokens_per_s": 1000.0 * settings.prefill_tokens / prefill,
    }


def bench_engine(
    target: LoadedModel, draft: LoadedModel | None, engine_name: str, bandwidth: float,
    settings: Settings,
) -> list[dict[str, Any]]:  # fmt: skip
    """The target's (and the draft's) entries on one engine; the target's carries c."""
    lms = [target] if draft is None else [target, draft]
    engines = [make_engine(lm, engine_name, settings.max_len, settings.fuse) for lm in lms]
    prompts = [token_ids(lm, settings.prompt_tokens, settings.seed) for lm in lms]
    long = [token_ids(lm, settings.prefill_tokens, settings.seed + 2) for lm in lms]
    for engine, ids in zip(engines, prompts, strict=True):
        if isinstance(engine, StaticEngine):
            engine.warmup(ids)  # compiles (and captures) every size before anything is timed
    steps = decode_steps_ms(engines, prompts, settings.decode_steps)
    entries = []
    for lm, engine, ids, ids_long, step in zip(lms, engines, prompts, long, steps, strict=True):
        costs = forward_costs(engine, ids, settings.repeats, settings.seed, sizes_for(engine_name))
        prefill = prefill_ms(engine, ids_long, settings.prefill_repeats)
        entry = _entry(lm, engine_name, bandwidth, step, costs, prefill, settings)
        compile_s = engine.compile_s if isinstance(engine, StaticEngine) else 0.0
        role = "target" if lm is target else "draft"
        fused = is_fused(lm.model)  # in place: what this engine's steps ran
        packed = prepack.is_prepacked(lm.model)
        rows = next((m.min_rows for m in lm.model.modules()
                     if isinstance(m, prepack.PrepackedLinear)), None)  # fmt: skip
        kernel = prepack.runs_kernel(lm.model)
        int8 = quantize.is_quantized(lm.model)
        entries.append(entry | {"role": role, "compile_s": compile_s, "draft": None, "c": None,
                                "fused": fused, "prepacked": packed, "prepack_min_rows": rows,
                                "prepack_kernel": kernel, "int8": int8,
                                "int8_kernel": quantize.runs_kernel(lm.model)})  # fmt: skip
    if draft is not None:
        # c: the draft's cost per proposed token over the target's decode step (DESIGN.md).
        entries[0] |= {"draft": draft.name, "c": steps[1] / steps[0]}
    return entries


def machine_fields(device: torch.device, bandwidth: float) -> dict[str, Any]:
    """What every entry records of where it ran."""
    env = environment(device)
    name = env["device"] if device.type == "cuda" else machine.cpu_label()
    return {
        "device": name,
        "machine": machine_slug(name),
        "cpu": machine.cpu_name(),
        "cpu_flags": cpu_flags(),
        "read_bandwidth_bytes_per_s": bandwidth,
        "environment": env,
    }


def run(
    load: Callable[[str, str | None], LoadedModel], target: str, draft: str | None,
    dtypes: Sequence[str | None], engines: Sequence[str], device: torch.device,
    settings: Settings,
) -> list[dict[str, Any]]:  # fmt: skip
    """Bandwidth once, then every dtype x engine; load(name, dtype) gives a model on the device."""
    check_engines(engines)
    bandwidth = read_bandwidth(device, settings.bandwidth_bytes)
    where = machine_fields(device, bandwidth)
    plan = prepack.plan()
    out = []
    for dtype in dtypes:
        lm = load(target, dtype)
        small = load(draft, dtype) if draft else None
        for model in (lm, small):
            if model is not None:
                set_attention(model, settings.attention)
                if settings.quantize:
                    quantize.quantize(model.model, plan.kernel)
        for packed in _prepack_variants(lm, settings.prepack):
            for model in [m for m in (lm, small) if m is not None] if packed else []:
                prepack.prepack(model.model, *plan)
            for name in engines:
                for entry in bench_engine(lm, small, name, bandwidth, settings):
                    out.append(where | entry | {"settings": asdict(settings)})
                _free(device)
        del lm, small
    return out


def _prepack_variants(lm: LoadedModel, setting: bool | None) -> list[bool]:
    """Without, then with prepacked linears: both where they apply unless the setting says."""
    applies = prepack.applies(lm.device, lm.dtype) and not quantize.is_quantized(lm.model)
    if setting and not applies:
        raise ValueError(
            f"prepacked linears need a CPU float32 model (bfloat16 where lab's kernel runs), "
            f"not {lm.dtype} on {lm.device}"
        )
    if setting is None:
        return [False, True] if applies else [False]
    return [setting]


def _free(device: torch.device) -> None:
    """Drop the last engines' compiled code, graphs and caches: on an H200 host time per step
    grew from 0.1 to 0.5 ms with each engine one process had built (shared/GPU.md)."""
    gc.collect()
    torch._dynamo.reset()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def packing(entry: dict[str, Any]) -> str:
    """How an entry's linears were packed: "kernel" (lab.engine.smallm), "prepacked" (oneDNN)
    or "" (not packed)."""
    if not entry.get("prepacked"):
        return ""
    return "kernel" if entry.get("prepack_kernel") else "prepacked"


def file_name(entry: dict[str, Any]) -> str:
    """<model>-<dtype>-<engine>[-<packing>][-int8[-kernel]].json, the model's '/' made safe."""
    model = re.sub(r"[^A-Za-z0-9._-]+", "_", entry["model"])
    packed = f"-{packing(entry)}" if packing(entry) else ""
    int8 = ("-int8-kernel" if entry.get("int8_kernel") else "-int8") if entry.get("int8") else ""
    return f"{model}-{entry['dtype']}-{entry['engine']}{packed}{int8}.json"


def write(entries: Sequence[dict[str, Any]], folder: Path) -> list[Path]:
    """folder/<machine>/<model>-<dtype>-<engine>.json, one entry each."""
    written = []
    for entry in entries:
        path = folder / entry["machine"] / file_name(entry)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(entry, indent=1) + "\n")
        written.append(path)
    return written


def summary_line(entry: dict[str, Any]) -> str:
    """One human line per entry, for the CLI."""
    c = f", c {entry['c']:.3f}" if entry.get("c") is not None else ""
    packed = f"{packing(entry)} " if packing(entry) else ""
    return (
        f"{entry['model']:28} {entry['dtype']:9} {entry['engine']:9} {packed}"
        f"decode {entry['decode_tokens_per_s']:8.2f} tok/s "
        f"({entry['fraction_of_bandwidth_limit']:.3f} of the bandwidth limit), "
        f"verify(K=4)/decode {entry['verify_over_decode_k4']:.2f}{c}, "
        f"prefill {entry['prefill_tokens_per_s']:.0f} tok/s"
    )
