"""OpenAI-compatible HTTP client: timeouts, retries, streaming, errors that say what happened."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator, Mapping
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from typing import Any

import httpx2
from pydantic import BaseModel, ConfigDict, ValidationError

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
