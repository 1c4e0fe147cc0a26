"""A load benchmark of any OpenAI-compatible server, in the local stages' record shape."""

from __future__ import annotations

import asyncio
import itertools
import logging
import math
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import asdict, dataclass, replace
from typing import Any

import numpy as np
import pandas as pd

from lab.engine.records import STEP_COLUMNS, StepRecord
from lab.prompts import Prompt
from lab.serve.client import Client, ClientConfig, Completion, MissingUsage, Request, ServerError
from lab.stats import summarize

log = logging.getLogger("lab.serve.load")


@dataclass(frozen=True)
class LoadSpec:
    """How many requests, how fast, and how many warm-up requests to discard first."""

    requests: int
    concurrency: int | None = 1  # in flight at once; None: no limit
    rate: float | None = None  # mean requests/s with Poisson arrivals; None: all at once
    warmup: int = 1
    seed: int = 0

    def __post_init__(self) -> None:
        if self.requests <= 0:
            raise ValueError(f"requests must be a positive integer, got {self.requests}")
        if self.concurrency is not None and self.concurrency <= 0:
            raise ValueError(f"concurrency must be positive or None, got {self.concurrency}")
        if self.rate is not None and not self.rate > 0:
            raise ValueError(f"rate must be positive (requests/s) or None, got {self.rate}")
        if self.warmup < 0:
            raise ValueError(f"warmup must be >= 0, got {self.warmup}")


def arrival_times(n: int, rate: float | None, seed: int) -> list[float]:
    """Send times in s: a Poisson process of `rate` per s starting at 0; all 0 without a rate."""
    if rate is None:
        return [0.0] * n
    gaps = np.random.default_rng(seed).exponential(1.0 / rate, size=n)
    return [0.0, *np.cumsum(gaps[:-1]).tolist()]


@dataclass
class LoadRun:
    """The measured requests: rows in the local stages' record shape, and the failures."""

    rows: list[dict[str, Any]]
    errors: list[dict[str, Any]]
    duration_s: float
    spec: LoadSpec


async def run_load(
    client: Client,
    prompts: Sequence[Prompt],
    template: Request,
    spec: LoadSpec,
    tokenizer: Any = None,
) -> LoadRun:
    """spec.requests requests over the prompts (cycled), after spec.warmup discarded ones."""
    if not prompts:
        raise ValueError("no prompts to send")
    for i in range(spec.warmup):  # first requests pay the server's one-off costs
        try:
            await client.complete(replace(template, prompt=prompts[i % len(prompts)].turns[0]))
        except ServerError as err:
            raise ServerError(f"warm-up request {i + 1} failed: {err}") from err
    gate = asyncio.Semaphore(spec.concurrency) if spec.concurrency else None
    rows: list[dict[str, Any]] = []
    errors: list[dict[str, Any]] = []
    start = time.perf_counter()

    async def one(index: int, at_s: float) -> None:
        prompt, repetition = prompts[index % len(prompts)], index // len(prompts)
        await asyncio.sleep(max(0.0, at_s - (time.perf_counter() - start)))
        async with gate or nullcontext():
            sent_s = time.perf_counter() - start
            try:
                done = await client.complete(replace(template, prompt=prompt.turns[0]))
                row = request_row(prompt, repetition, done, tokenizer)
            except ServerError as err:
                errors.append({"request_index": index, "question_id": str(prompt.question_id),
                               "repetition": repetition, "error_type": type(err).__name__,
                               "message": str(err), "sent_s": sent_s,
                               "failed_s": time.perf_counter() - start})  # fmt: skip
            else:
                rows.append({**row, "request_index": index, "arrival_s": at_s, "sent_s": sent_s})

    times = arrival_times(spec.requests, spec.rate, spec.seed)
    await asyncio.gather(*(one(i, t) for i, t in enumerate(times)))
    rows.sort(key=lambda r: r["request_index"])
    errors.sort(key=lambda r: r["request_index"])
    if counted := sum(r["tokens_counted_locally"] for r in rows):
        log.warning("the server sent no usage for %d request(s): their output tokens were counted "
                    "with the given tokenizer", counted)  # fmt: skip
    return LoadRun(rows, errors, time.perf_counter() - start, spec)


def _count(tokenizer: Any, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def chunk_token_counts(done: Completion, tokenizer: Any) -> list[int]:
    """Tokens carried by each text chunk: from the server's running usage, else re-tokenized."""
    if done.chunk_tokens and all(t is not None for t in done.chunk_tokens):
        totals = [int(t) for t in done.chunk_tokens if t is not None]
    elif tokenizer is not None:
        prefixes = itertools.accumulate(done.chunk_text)
        totals = [_count(tokenizer, p) for p in prefixes]
    else:
        return [1] * len(done.chunk_ms)  # vLLM bench's assumption: one token per chunk
    # Re-tokenizing a longer text can merge across a chunk boundary: never count below zero.
    return [max(0, b - a) for a, b in zip([0, *totals[:-1]], totals, strict=True)]


def _served_step(step: int, emitted: int, step_ms: float) -> StepRecord:
    """One server step as the client sees it: tokens and time; what it cannot see is NaN."""
    return StepRecord(step=step, k=0, proposed=0, depth=0, accepted=0, emitted=emitted,
                      draft_ms=0.0, verify_ms=math.nan, step_ms=step_ms, rss_mb=math.nan,
                      accept_ms=math.nan)  # fmt: skip


def request_row(
    prompt: Prompt, repetition: int, done: Completion, tokenizer: Any
) -> dict[str, Any]:
    """One request in the record shape of PromptResult.to_dict, plus the HTTP timings."""
    counted = done.completion_tokens is None
    if counted and tokenizer is None:
        raise MissingUsage("the server sent no `usage`: give a tokenizer to count output tokens")
    new_tokens = _count(tokenizer, done.text) if counted else int(done.completion_tokens or 0)
    emitted = chunk_token_counts(done, tokenizer)
    itl = [b - a for a, b in zip(done.chunk_ms, done.chunk_ms[1:], strict=False)]
    # The first chunk is the prefill's token (TTFT); each later chunk is one server step, so a
    # speculative server's chunks carry several tokens, as in the local stages' step records.
    steps = [asdict(_served_step(i, n, ms))
             for i, (n, ms) in enumerate(zip(emitted[1:], itl, strict=True))]  # fmt: skip
    return {
        "question_id": prompt.question_id,
        "category": prompt.category,
        "repetition": repetition,
        "new_tokens": new_tokens,
        "prefill_ms": done.ttft_ms,
        "ttft_ms": done.ttft_ms,
        "total_ms": done.e2e_ms,
        "tokens_per_s": 1000.0 * new_tokens / done.e2e_ms if done.e2e_ms > 0 else 0.0,
        "acceptance_rate": None,
        "mean_accepted_length": sum(emitted[1:]) / len(steps) if steps else None,
        "n_steps": len(steps),
        "peak_rss_mb": None,
        "peak_cuda_mb": None,
        "stop_reason": "eos" if done.finish_reason == "stop" else "length",
        "prompt_ids": [],  # the server tokenized the prompt; its ids are not sent back
        "token_ids": [],
        "text": done.text,
        "draft_prefill_ms": 0.0,
        "steps": steps,
        # HTTP-only fields
        "e2el_ms": done.e2e_ms,
        "tpot_ms": (done.e2e_ms - done.ttft_ms) / (new_tokens - 1) if new_tokens > 1 else None,
        "itl_ms": itl,
        "prompt_tokens": done.prompt_tokens,
        "tokens_counted_locally": counted,
        "finish_reason": done.finish_reason,
        "attempts": done.attempts,
    }


LATENCIES = ("ttft_ms", "tpot_ms", "itl_ms", "e2el_ms")
STATISTICS: dict[str, Callable[[list[float]], float]] = {
    "mean": lambda v: float(np.mean(v)),
    "median": lambda v: float(np.median(v)),
    "p90": lambda v: float(np.percentile(v, 90)),
    "p99": lambda v: float(np.percentile(v, 99)),
}


def summarize_load(run: LoadRun, seed: int = 0) -> dict[str, Any]:
    """metrics.json: the local stages' summary plus `vllm bench serve`'s throughput and latency."""
    ok = run.rows
    out: dict[str, Any] = {
        "requests": run.spec.requests,
        "completed": len(ok),
        "errors": len(run.errors),
        "duration_s": run.duration_s,
        "concurrency": run.spec.concurrency,
        "request_rate": run.spec.rate,
        "request_throughput": len(ok) / run.duration_s,
        "output_throughput": sum(r["new_tokens"] for r in ok) / run.duration_s,
        "total_token_throughput": sum(r["new_tokens"] + (r["prompt_tokens"] or 0) for r in ok)
        / run.duration_s,
        "tokens_counted_locally": sum(bool(r["tokens_counted_locally"]) for r in ok),
    }
    for name in LATENCIES:
        values = [v for r in ok for v in (r[name] if name == "itl_ms" else [r[name]])]
        values = [v for v in values if v is not None]
        for stat, fn in STATISTICS.items():
            out[f"{name}_{stat}"] = float(fn(values)) if values else None
    if ok:
        frame, steps = _frames(ok)
        local = summarize(frame, steps, seed)
        local["peak_rss_mb"] = None  # the server's memory is not visible from here
        out.update(local)
    return out


def _frames(rows: list[dict[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows and their step records as the frames lab.stats works on."""
    frame = pd.DataFrame(rows)
    frame["question_id"] = frame["question_id"].astype(str)
    steps = pd.DataFrame(
        [{"question_id": str(r["question_id"]), "repetition": r["repetition"], **s}
         for r in rows for s in r["steps"]],
        columns=list(STEP_COLUMNS),
    )  # fmt: skip
    return frame, steps


async def benchmark(
    config: ClientConfig,
    prompts: Sequence[Prompt],
    template: Request,
    spec: LoadSpec,
    tokenizer: Any = None,
) -> LoadRun:
    """Check the server is up (fail before sending load), then run the load benchmark."""
    async with Client(config) as client:
        log.info(await client.health())
        return await run_load(client, prompts, template, spec, tokenizer)


def format_summary(metrics: Mapping[str, Any]) -> str:
    """A `vllm bench serve`-style plain-text summary."""

    def num(key: str, digits: int = 2) -> str:
        value = metrics.get(key)
        return "n/a" if value is None else f"{value:.{digits}f}"

    lines = [
        f"{'Successful requests:':40}{metrics['completed']}",
        f"{'Failed requests:':40}{metrics['errors']}",
        f"{'Benchmark duration (s):':40}{num('duration_s')}",
        f"{'Request throughput (req/s):':40}{num('request_throughput')}",
        f"{'Output token throughput (tok/s):':40}{num('output_throughput')}",
        f"{'Total token throughput (tok/s):':40}{num('total_token_throughput')}",
    ]
    if metrics.get("tokens_counted_locally"):
        lines.append(f"{'Output tokens counted locally:':40}{metrics['tokens_counted_locally']} "
                     "requests (the server sent no usage)")  # fmt: skip
    for name, title in (("ttft_ms", "Time to First Token"), ("tpot_ms", "Time per Output Token "
                         "(excl. 1st)"), ("itl_ms", "Inter-token (chunk) Latency"),
                        ("e2el_ms", "End-to-end Latency")):  # fmt: skip
        lines.append(f"{'-' * 10}{title}{'-' * 10}")
        lines += [f"{f'{stat.title()} (ms):':40}{num(f'{name}_{stat}')}" for stat in STATISTICS]
    return "\n".join(lines)
