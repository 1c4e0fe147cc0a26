"""OpenAI-compatible HTTP client, and a load benchmark of any server that speaks that API."""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import math
import time
from collections.abc import AsyncIterator, Callable, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager, contextmanager, nullcontext
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import httpx2
import numpy as np
import pandas as pd
from pydantic import BaseModel, ConfigDict, ValidationError

from lab.prompts import Prompt
from lab.stats import summarize

log = logging.getLogger("lab.serve.http")

# --- errors ---------------------------------------------------------------------------------------


class ServerError(RuntimeError):
    """A request that did not produce a usable answer; the message says why."""


class ServerDown(ServerError):
    """No connection, or the connection broke (after the retries)."""


class ServerTimeout(ServerError):
    """The server accepted the request but sent nothing for longer than the read timeout."""


class BadStatus(ServerError):
    """An HTTP 4xx/5xx answer (5xx only after the retries), or an error event in a stream."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class MalformedResponse(ServerError):
    """A body that is not the JSON or SSE an OpenAI-compatible server sends."""


class MissingUsage(ServerError):
    """The server reported no token usage and no tokenizer was given to count tokens."""


# --- client ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ClientConfig:
    """Where the server is and how patient to be with it."""

    url: str  # base URL, e.g. http://127.0.0.1:8000 (without /v1)
    model: str | None = None  # the `model` field; None: the first id /v1/models lists
    timeout_s: float = 60.0  # longest wait for the next byte: a stalled server fails after this
    connect_timeout_s: float = 5.0
    retries: int = 3  # extra attempts on connection errors and 5xx answers
    backoff_s: float = 0.5  # first retry delay; doubles each retry
    api_key: str | None = None

    def __post_init__(self) -> None:
        if not self.url.startswith(("http://", "https://")):
            raise ValueError(f"server url must start with http:// or https://, got {self.url!r}")
        if self.timeout_s <= 0 or self.connect_timeout_s <= 0:
            raise ValueError("timeouts must be positive")
        if self.retries < 0 or self.backoff_s < 0:
            raise ValueError("retries and backoff_s must be >= 0")


@dataclass(frozen=True)
class Request:
    """One completion request; `prompt` is the user message for chat, the text otherwise."""

    prompt: str
    chat: bool = True
    stream: bool = True
    max_tokens: int = 64
    temperature: float = 0.0
    seed: int | None = None
    extra: Mapping[str, Any] = field(default_factory=dict)  # merged into the JSON body last

    def body(self, model: str | None) -> dict[str, Any]:
        """The JSON body for /v1/chat/completions or /v1/completions."""
        out: dict[str, Any] = {"max_tokens": self.max_tokens, "temperature": self.temperature,
                               "stream": self.stream}  # fmt: skip
        if model is not None:
            out["model"] = model
        if self.chat:
            out["messages"] = [{"role": "user", "content": self.prompt}]
        else:
            out["prompt"] = self.prompt
        if self.stream:
            # Usage in the last chunk (OpenAI) and in every chunk (vLLM's extension), so tokens
            # per chunk are known exactly; servers that ignore these leave counting to us.
            out["stream_options"] = {"include_usage": True, "continuous_usage_stats": True}
        if self.seed is not None:
            out["seed"] = self.seed
        return {**out, **self.extra}

    @property
    def path(self) -> str:
        return "/v1/chat/completions" if self.chat else "/v1/completions"


@dataclass
class Completion:
    """What came back, with client-side timings (ms since the request was first sent)."""

    text: str
    finish_reason: str | None
    prompt_tokens: int | None  # from `usage`; None when the server sent none
    completion_tokens: int | None
    e2e_ms: float
    attempts: int = 1
    chunk_ms: list[float] = field(default_factory=list)  # arrival of each chunk carrying text
    chunk_text: list[str] = field(default_factory=list)
    chunk_tokens: list[int | None] = field(default_factory=list)  # completion tokens so far

    @property
    def ttft_ms(self) -> float:
        """Time to the first text chunk; the whole request when not streamed."""
        return self.chunk_ms[0] if self.chunk_ms else self.e2e_ms


# Response shapes, validated by pydantic so a malformed body names its bad field.
class _Usage(BaseModel):
    prompt_tokens: int | None = None
    completion_tokens: int


class _Message(BaseModel):
    content: str | None = None


class _Choice(BaseModel):
    text: str | None = None  # completions
    message: _Message | None = None  # chat
    delta: _Message | None = None  # chat stream
    finish_reason: str | None = None

    @property
    def content(self) -> str:
        part = self.message or self.delta
        return self.text if self.text is not None else (part.content or "" if part else "")


class _Body(BaseModel):
    model_config = ConfigDict(extra="ignore")

    choices: list[_Choice] = []
    usage: _Usage | None = None
    error: Any = None


def _parse(data: str | bytes, where: str) -> _Body:
    try:
        return _Body.model_validate_json(data)
    except ValidationError as err:
        snippet = (data if isinstance(data, str) else data.decode(errors="replace"))[:200]
        problem = err.errors()[0]
        raise MalformedResponse(
            f"{where}: not an OpenAI-style JSON body ({'.'.join(map(str, problem['loc']))}: "
            f"{problem['msg']}): {snippet!r}"
        ) from None


def _error_message(status: int, raw: bytes) -> str:
    """The message of an OpenAI-style error body, else the start of the body."""
    try:
        body = json.loads(raw)
        error = body.get("error", body) if isinstance(body, dict) else body
        message = error.get("message", error) if isinstance(error, dict) else error
    except ValueError:
        message = raw.decode(errors="replace")[:300]
    return f"HTTP {status}: {message}"


# Connection-level failures worth a retry (a timeout waiting for an answer is not one).
_RETRYABLE = (httpx2.ConnectError, httpx2.ConnectTimeout, httpx2.RemoteProtocolError,
              httpx2.ReadError, httpx2.WriteError)  # fmt: skip


class Client:
    """Async client of an OpenAI-compatible server, with timeouts, retries and clear errors."""

    def __init__(
        self, config: ClientConfig, transport: httpx2.AsyncBaseTransport | None = None
    ) -> None:
        self.config = config
        self.model = config.model
        headers = {"Authorization": f"Bearer {config.api_key}"} if config.api_key else None
        self._http = httpx2.AsyncClient(
            base_url=config.url,
            timeout=httpx2.Timeout(config.timeout_s, connect=config.connect_timeout_s),
            headers=headers,
            transport=transport,
            # Concurrency is the benchmark's to set, not the pool's (default 100 connections).
            limits=httpx2.Limits(max_connections=None, max_keepalive_connections=None),
            # Proxies from the environment would put a third party into every measurement.
            trust_env=False,
        )

    async def __aenter__(self) -> Client:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def models(self) -> list[str]:
        """Model ids from /v1/models."""
        async with self._send("GET", "/v1/models") as (response, _):
            raw = await response.aread()
        try:
            return [str(card["id"]) for card in json.loads(raw)["data"]]
        except (ValueError, KeyError, TypeError):
            raise MalformedResponse(f"/v1/models: no list of models: {raw[:200]!r}") from None

    async def health(self) -> str:
        """Check the server answers (/v1/models, else /health); resolve the model if unset."""
        try:
            ids = await self.models()
        except BadStatus as err:
            if err.status != 404:
                raise
            async with self._send("GET", "/health"):
                return f"{self.config.url} is up (/health; no /v1/models)"
        if self.model is None and ids:
            self.model = ids[0]
        return f"{self.config.url} is up, serving {', '.join(ids) or 'no models'}"

    async def complete(self, request: Request) -> Completion:
        """One completion, streamed or not; raises a ServerError subclass on any failure."""
        start = time.perf_counter()
        where = f"POST {self.config.url}{request.path}"
        async with self._send("POST", request.path, request.body(self.model)) as (resp, tries):
            if request.stream:
                out = await self._read_stream(resp, where, start)
            else:
                out = await self._read_whole(resp, where, start)
        out.attempts = tries
        return out

    @asynccontextmanager
    async def _send(
        self, method: str, path: str, body: dict[str, Any] | None = None
    ) -> AsyncIterator[tuple[httpx2.Response, int]]:
        """An open 2xx response and the attempts it took; retries connection errors and 5xx."""
        where = f"{method} {self.config.url}{path}"
        attempt = 0
        while True:
            attempt += 1
            last = attempt > self.config.retries
            try:
                request = self._http.build_request(method, path, json=body)
                response = await self._http.send(request, stream=True)
            except _RETRYABLE as err:
                if last:
                    raise ServerDown(f"{where}: server unreachable after {attempt} attempt(s): "
                                     f"{_describe(err)}") from err  # fmt: skip
            except httpx2.TimeoutException as err:
                raise ServerTimeout(f"{where}: no answer within {self.config.timeout_s} s "
                                    f"({type(err).__name__})") from err  # fmt: skip
            else:
                if response.status_code < 400:
                    break
                if response.status_code < 500 or last:
                    raw = await response.aread()
                    await response.aclose()
                    message = _error_message(response.status_code, raw)
                    raise BadStatus(response.status_code, f"{where}: {message}")
                await response.aclose()
            await asyncio.sleep(self.config.backoff_s * 2 ** (attempt - 1))
        try:
            with _translated(where):
                yield response, attempt
        finally:
            await response.aclose()

    async def _read_whole(self, response: httpx2.Response, where: str, start: float) -> Completion:
        body = _parse(await response.aread(), where)
        if body.error is not None:
            raise BadStatus(response.status_code, f"{where}: error in body: {body.error}")
        if not body.choices:
            raise MalformedResponse(f"{where}: the answer has no choices")
        usage = body.usage
        return Completion(
            text=body.choices[0].content,
            finish_reason=body.choices[0].finish_reason,
            prompt_tokens=usage.prompt_tokens if usage else None,
            completion_tokens=usage.completion_tokens if usage else None,
            e2e_ms=_ms_since(start),
        )

    async def _read_stream(self, response: httpx2.Response, where: str, start: float) -> Completion:
        out = Completion("", None, None, None, 0.0)
        done = False
        events = 0
        async for event in httpx2.EventSource(response):
            events += 1
            if event.data == "[DONE]":
                done = True
                break
            chunk = _parse(event.data, f"{where} stream event {events}")
            if chunk.error is not None:
                raise BadStatus(response.status_code, f"{where}: error event: {chunk.error}")
            if chunk.usage is not None:
                out.prompt_tokens = chunk.usage.prompt_tokens
                out.completion_tokens = chunk.usage.completion_tokens
            if not chunk.choices:
                continue  # the usage-only chunk
            choice = chunk.choices[0]
            out.finish_reason = choice.finish_reason or out.finish_reason
            if text := choice.content:
                out.chunk_ms.append(_ms_since(start))
                out.chunk_text.append(text)
                out.chunk_tokens.append(chunk.usage.completion_tokens if chunk.usage else None)
        if not done:
            raise MalformedResponse(
                f"{where}: the stream ended without 'data: [DONE]' after {len(out.chunk_ms)} "
                "text chunk(s)"
            )
        out.text = "".join(out.chunk_text)
        out.e2e_ms = _ms_since(start)
        return out


@contextmanager
def _translated(where: str) -> Iterator[None]:
    """httpx errors while reading a body, as ServerError subclasses that say what happened."""
    try:
        yield
    except httpx2.SSEError as err:
        raise MalformedResponse(f"{where}: not a server-sent event stream: {err}") from err
    except httpx2.TimeoutException as err:
        raise ServerTimeout(f"{where}: the server stopped sending mid-answer "
                            f"({type(err).__name__})") from err  # fmt: skip
    except (httpx2.RemoteProtocolError, httpx2.ReadError) as err:
        raise ServerDown(f"{where}: connection broke mid-answer: {_describe(err)}") from err


def _describe(err: Exception) -> str:
    return f"{type(err).__name__}: {err}" if str(err) else type(err).__name__


def _ms_since(start: float) -> float:
    return (time.perf_counter() - start) * 1000.0


# --- load benchmark -------------------------------------------------------------------------------


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


Progress = Callable[[int, Completion | ServerError], None]


async def run_load(
    client: Client,
    prompts: Sequence[Prompt],
    template: Request,
    spec: LoadSpec,
    tokenizer: Any = None,
    progress: Progress | None = None,
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
                result: Completion | ServerError = err
            else:
                rows.append({**row, "request_index": index, "arrival_s": at_s, "sent_s": sent_s})
                result = done
        if progress is not None:
            progress(index, result)

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
    steps = [{"step": i, "k": 0, "proposed": 0, "accepted": 0, "emitted": n, "draft_ms": 0.0,
              "verify_ms": math.nan, "step_ms": ms, "rss_mb": math.nan}
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
        frame, steps = frames(ok)
        local = summarize(frame, steps, None, None, seed)
        local["peak_rss_mb"] = None  # the server's memory is not visible from here
        out.update(local)
    return out


def frames(rows: list[dict[str, Any]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Rows and their step records as the frames lab.stats works on."""
    frame = pd.DataFrame(rows)
    frame["question_id"] = frame["question_id"].astype(str)
    columns = ["question_id", "repetition", "step", "k", "proposed", "accepted", "emitted",
               "draft_ms", "verify_ms", "step_ms", "rss_mb"]  # fmt: skip
    steps = pd.DataFrame(
        [{"question_id": str(r["question_id"]), "repetition": r["repetition"], **s}
         for r in rows for s in r["steps"]],
        columns=columns,
    )  # fmt: skip
    return frame, steps


async def benchmark(
    config: ClientConfig,
    prompts: Sequence[Prompt],
    template: Request,
    spec: LoadSpec,
    tokenizer: Any = None,
    progress: Progress | None = None,
) -> LoadRun:
    """Check the server is up (fail before sending load), then run the load benchmark."""
    async with Client(config) as client:
        log.info(await client.health())
        return await run_load(client, prompts, template, spec, tokenizer, progress)


def wait_until_up(url: str, process: Any = None, timeout_s: float = 60.0) -> str:
    """Poll the health check until the server answers; fail early if `process` has exited."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            return asyncio.run(_health(ClientConfig(url, timeout_s=5.0, retries=0)))
        except ServerDown as err:
            if process is not None and process.poll() is not None:
                exited = f"{url}: the server process exited with {process.returncode}"
                raise ServerDown(exited) from err
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


async def _health(config: ClientConfig) -> str:
    async with Client(config) as client:
        return await client.health()


# --- files and text -------------------------------------------------------------------------------

ERRORS = "errors.jsonl"  # one line per failed request (the rows in prompts.jsonl all succeeded)


def write_run(out: Path, config: dict[str, Any], run: LoadRun, metrics: dict[str, Any]) -> None:
    """experiments/<stage>/<item>/ in the local stages' layout, plus errors.jsonl."""
    from lab.pipeline import store

    store.write_item(out, config, run.rows, metrics)
    with open(out / ERRORS, "w") as f:
        for error in run.errors:
            f.write(json.dumps(error) + "\n")


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


SECTION_COLUMNS = {
    "server": "server",
    "endpoint": "endpoint",
    "concurrency": "concurrency",
    "request_rate": "rate (req/s)",
    "completed": "completed",
    "errors": "errors",
    "request_throughput": "req/s",
    "output_throughput": "output tok/s",
    "ttft_ms_median": "TTFT median (ms)",
    "ttft_ms_p99": "TTFT p99 (ms)",
    "tpot_ms_median": "TPOT median (ms)",
    "itl_ms_median": "ITL median (ms)",
    "itl_ms_p99": "ITL p99 (ms)",
    "e2el_ms_median": "E2E median (ms)",
    "e2el_ms_p99": "E2E p99 (ms)",
    "mean_accepted_length": "tokens/chunk",
}


def http_frame(experiments: Path, stage: str = "loadtest") -> pd.DataFrame:
    """One row of raw numbers per experiments/<stage>/<item>/ load run (SECTION_COLUMNS keys)."""
    rows = []
    for item in sorted((experiments / stage).glob("*/metrics.json")):
        metrics = json.loads(item.read_text())
        config = json.loads((item.parent / "config.json").read_text())
        rows.append({**metrics, "server": config.get("server", item.parent.name),
                     "endpoint": config.get("endpoint", "")})  # fmt: skip
    return pd.DataFrame(rows).reindex(columns=list(SECTION_COLUMNS))


def http_section(experiments: Path, stage: str = "loadtest") -> str:
    """Markdown section with the table of every load run; '' when there is none."""
    frame = http_frame(experiments, stage)
    if frame.empty:
        return ""
    shown = frame.map(lambda v: "n/a" if v is None or v != v else _cell(v))
    header = "| " + " | ".join(SECTION_COLUMNS.values()) + " |"
    rule = "|" + "---|" * len(SECTION_COLUMNS)
    body = ["| " + " | ".join(map(str, r)) + " |" for r in shown.itertuples(index=False)]
    note = (
        "Latencies are client-side, per request, in ms. TTFT: until the first chunk with text. "
        "TPOT: (E2E - TTFT) / (output tokens - 1). ITL: between text chunks, so a speculative "
        "server's chunk of several tokens counts once (tokens/chunk says how many)."
    )
    return "\n".join(["## Served over HTTP", "", note, "", header, rule, *body, ""])


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.2f}" if abs(value) < 1000 else f"{value:.0f}"
    return str(value)


# --- the pipelines/http stage ---------------------------------------------------------------------


@dataclass(frozen=True)
class StageSettings:
    """pipelines/http/params.yaml `loadtest`, validated, with the root params it borrows."""

    server: str  # "lab" or a base URL
    label: str  # the server as the report names it
    serve_args: list[str]  # `lab serve` arguments when server is "lab"
    model: str | None
    tokenizer: str
    endpoint: str
    stream: bool
    requests: int
    rate: float | None
    warmup: int
    timeout_s: float


def _setting(section: Mapping[str, Any], key: str, check: Callable[[Any], bool], want: str) -> Any:
    """section[key], or a ParamsError naming loadtest.<key>, the value and what is allowed."""
    from lab.pipeline.params import ParamsError

    if key not in section:
        raise ParamsError(f"params.yaml: missing key 'loadtest.{key}'")
    value = section[key]
    if not check(value):
        raise ParamsError(f"params.yaml: loadtest.{key} must be {want}, got {value!r}")
    return value


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _positive_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v > 0


def _lab_or_url(v: Any) -> bool:
    return v == "lab" or (isinstance(v, str) and v.startswith(("http://", "https://")))


def _check_root(root: dict[str, Any]) -> None:
    """The root params.yaml keys the stage reads (and no others, so it runs beside any)."""
    from lab.pipeline import params as P

    P.model_name(root, "target")
    P.sampling(root)
    P.prompts(root)
    tokens = root.get("generation", {}).get("max_new_tokens")
    if not _positive_int(tokens):
        raise P.ParamsError(f"params.yaml: generation.max_new_tokens must be a positive integer, "
                            f"got {tokens!r}")  # fmt: skip
    if not isinstance(root.get("seed"), int):
        raise P.ParamsError(f"params.yaml: seed must be an integer, got {root.get('seed')!r}")


def stage_settings(section: Mapping[str, Any], root: dict[str, Any]) -> StageSettings:
    """Validate the `loadtest` section and the root params it borrows, before any server starts."""
    _check_root(root)
    server = _setting(section, "server", _lab_or_url, "'lab' or an http(s):// URL")
    serve = _setting(section, "serve", lambda v: isinstance(v, dict), "a mapping")
    target, draft = root["models"]["target"], serve.get("draft")
    args = ["--target", target, "--max-new-tokens", str(root["generation"]["max_new_tokens"]),
            "--max-queue", str(serve.get("max_queue", 64))]  # fmt: skip
    for key in ("device", "dtype"):
        if root["models"].get(key):
            args += [f"--{key}", str(root["models"][key])]
    label = f"lab serve {target}"
    if draft:
        k, policy = serve.get("k", 4), serve.get("policy", "exact")
        args += ["--draft", str(draft), "--k", str(k), "--policy", str(policy)]
        label += f" + {draft} (K={k}, {policy})"
    if serve.get("threads"):
        args += ["--threads", str(serve["threads"])]
    return StageSettings(
        server=server,
        label=label if server == "lab" else server,
        serve_args=args,
        model=section.get("model"),
        tokenizer=str(section.get("tokenizer") or target),
        endpoint=_setting(
            section, "endpoint", lambda v: v in ("chat", "completions"), "chat or completions"
        ),  # fmt: skip
        stream=_setting(section, "stream", lambda v: isinstance(v, bool), "true or false"),
        requests=_setting(section, "requests", _positive_int, "a positive integer"),
        rate=_setting(
            section,
            "rate",
            lambda v: v is None or _positive_number(v),
            "null or a positive number of requests/s",
        ),  # fmt: skip
        warmup=_setting(section, "warmup", lambda v: v == 0 or _positive_int(v), "an int >= 0"),
        timeout_s=_setting(section, "timeout_s", _positive_number, "a positive number of s"),
    )


@contextmanager
def stage_server(settings: StageSettings) -> Iterator[str]:
    """The URL to benchmark: `lab serve` started (and stopped) here, or the given one."""
    if settings.server != "lab":
        yield settings.server
        return
    from lab.serve import server

    with server.launched(settings.serve_args) as launched:
        log.info("lab serve %s at %s", " ".join(settings.serve_args), launched.url)
        yield launched.url


def run_stage(
    concurrency: int, out: Path, section: Mapping[str, Any], root: dict[str, Any]
) -> None:
    """One stage item: benchmark the server at this concurrency, write out/, log to MLflow."""
    from lab import models
    from lab.pipeline import params as P
    from lab.pipeline import store, tracking
    from lab.pipeline.stage import _log

    if not _positive_int(concurrency):
        raise P.ParamsError(f"params.yaml: loadtest.concurrency values must be positive integers, "
                            f"got {concurrency!r}")  # fmt: skip
    settings = stage_settings(section, root)
    prompts, sampling = P.prompts(root), P.sampling(root)
    tokenizer = models.load_tokenizer(settings.tokenizer)
    spec = LoadSpec(settings.requests, concurrency, settings.rate, settings.warmup, root["seed"])
    template = Request("", settings.endpoint == "chat", settings.stream,
                       root["generation"]["max_new_tokens"], sampling.temperature,
                       root["seed"])  # fmt: skip
    config = {"stage": "loadtest", "item": out.name, "server": settings.label,
              "endpoint": settings.endpoint, "loadtest": dict(section), "concurrency": concurrency,
              "request": template.body(settings.model), "prompts": root["prompts"]}  # fmt: skip
    with tracking.stage_run("loadtest", out.name, config) as mlrun:
        with stage_server(settings) as url:
            client = ClientConfig(url, settings.model, settings.timeout_s)
            run = asyncio.run(benchmark(client, prompts, template, spec, tokenizer))
        if not run.rows:  # nothing was measured: fail the stage rather than write empty numbers
            raise ServerError(f"every request failed; the first: {run.errors[0]['message']}")
        metrics = summarize_load(run, root["seed"])
        write_run(out, config, run, metrics)
        _log(mlrun, store.read_item(out), out)
    print(format_summary(metrics))
