"""`lab serve`: an OpenAI-compatible HTTP server over lab's baseline or speculative engine."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import queue
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from contextlib import ExitStack, asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import uvicorn
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.sse import EventSourceResponse, format_sse_event
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from lab.drafting.draft_model import DRAFT_STEP_SIZES
from lab.engine.caches import Engine, StaticEngine, make_engine
from lab.engine.model import LoadedModel
from lab.engine.records import PromptResult
from lab.engine.sampling import SamplingParams
from lab.method import DraftSource, Method, generate_one, make_drafter

log = logging.getLogger("lab.serve")

# --- the worker: one generation at a time behind a bounded queue ----------------------------------


class QueueFull(Exception):
    """Every worker slot and queue place is taken."""


class Cancelled(Exception):
    """Raised inside the decode loop to stop a generation nobody is waiting for."""


# Events a job sends to its request handler: ("tokens", [ids]), ("done", PromptResult),
# ("error", exception).
Event = tuple[Literal["tokens", "done", "error"], Any]


@dataclass
class Job:
    """One admitted request: what to generate and where to send tokens as they come."""

    prompt_ids: list[int]
    max_tokens: int
    sampling: SamplingParams
    seed: int
    loop: asyncio.AbstractEventLoop
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    cancelled: threading.Event = field(default_factory=threading.Event)

    def post(self, event: Event) -> None:
        """Hand an event from the worker thread to the request's event loop."""
        try:
            self.loop.call_soon_threadsafe(self.events.put_nowait, event)
        except RuntimeError:  # the loop has closed (server shutting down): nobody is listening
            self.cancelled.set()


def engines(
    target: LoadedModel, draft: LoadedModel | None, method: Method, kind: str, context: int
) -> tuple[Engine, DraftSource]:
    """The target (and a draft model) on the named engine, compiled now, not per request.

    context: the positions a request may fill (prompt + max_tokens); a static cache also holds
    one verify step of K + 1 past them.
    """
    sizes = [1] if method.baseline else sorted({1, method.k + 1})
    reserve = 0 if method.baseline else method.k + 1
    engine = make_engine(target, kind, context + reserve, sizes=sizes)
    draft_engine = None
    if draft is not None:
        draft_engine = make_engine(draft, kind, context + reserve, sizes=DRAFT_STEP_SIZES)
    warm = [int(i) for i in target.tokenizer("warm up")["input_ids"]]
    for built in (engine, draft_engine):
        if isinstance(built, StaticEngine):
            built.warmup(warm)  # compiles every step size before the first request
    return engine, draft_engine


class Worker:
    """Runs jobs one at a time (batch size 1); at most max_queue wait.

    engine: the target on the engine that generates (engines()); None: the dynamic reference.
    context: the most positions (prompt + max_tokens) a request may fill; None: the model's.
    own_thread: start() runs the jobs on a thread of its own (in-process servers, tests);
    False: the caller runs them with run(), on the main thread, as `serve` does. torch's CPU
    kernels that split work with OpenMP (the int8 linears' among them) ran 1.1-2x slower per
    decode step from a second Python thread than from the main one (2 cores, AMD EPYC).
    """

    def __init__(
        self,
        target: LoadedModel,
        draft: DraftSource,
        method: Method,
        max_queue: int,
        engine: Engine | None = None,
        context: int | None = None,
        own_thread: bool = True,
    ) -> None:
        if max_queue < 0:
            raise ValueError(f"max_queue must be >= 0, got {max_queue}")
        self.target, self.draft, self.method, self.max_queue = target, draft, method, max_queue
        self.engine: LoadedModel | Engine = target if engine is None else engine
        self.context = context
        if not method.baseline:
            make_drafter(method, target, draft)  # a missing draft fails now, not per request
        self._jobs: queue.Queue[Job | None] = queue.Queue()
        self._admitted = 0  # running + waiting
        self._lock = threading.Lock()
        thread = threading.Thread(target=self.run, name="lab-worker", daemon=True)
        self._thread = thread if own_thread else None

    @property
    def admitted(self) -> int:
        return self._admitted

    @property
    def engine_name(self) -> str:
        if not isinstance(self.engine, StaticEngine):
            return "dynamic"
        return "compiled" if self.engine.compiled else "static"

    def start(self) -> None:
        """Start the worker's own thread (nothing to do when the caller runs run())."""
        if self._thread is not None:
            self._thread.start()

    def stop(self) -> None:
        """Let run() finish its job and return; wait for the worker's own thread."""
        self._jobs.put(None)
        if self._thread is not None and self._thread.is_alive():
            self._thread.join(timeout=30)

    def submit(self, job: Job) -> None:
        """Queue a job, or raise QueueFull when the running one and max_queue waiting exist."""
        with self._lock:
            if self._admitted >= 1 + self.max_queue:
                raise QueueFull(f"{self._admitted} requests running or waiting")
            self._admitted += 1
        self._jobs.put(job)

    def run(self) -> None:
        """Run jobs as they come until stop()."""
        while (job := self._jobs.get()) is not None:
            event = self._run(job)
            with self._lock:  # free the slot before answering, so a follow-up request fits
                self._admitted -= 1
            if event is not None:
                job.post(event)

    def _run(self, job: Job) -> Event | None:
        """Generate one job; the final event, or None when the client has gone."""
        if job.cancelled.is_set():
            return None

        def on_tokens(tokens: list[int]) -> None:
            if job.cancelled.is_set():
                raise Cancelled
            job.post(("tokens", tokens))

        try:
            return ("done", self.generate(job, on_tokens))
        except Cancelled:
            return None
        except Exception as err:  # answered as HTTP 500 and logged; the server keeps serving
            log.exception("generation failed")
            return ("error", err)

    def generate(self, job: Job, on_tokens: Callable[[list[int]], None]) -> PromptResult:
        """One generation under the configured method (fresh drafter and controller)."""
        return generate_one(self.method, self.engine, self.draft, job.prompt_ids,
                            job.max_tokens, job.sampling, job.seed, on_tokens)  # fmt: skip


# --- text: incremental detokenization -------------------------------------------------------------


class TextStream:
    """Turns token batches into text deltas, holding back incomplete UTF-8 characters."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer
        self.ids: list[int] = []
        self.sent = ""

    def push(self, tokens: list[int]) -> str:
        """The new text these tokens complete (may be empty)."""
        self.ids.extend(tokens)
        text = self._decode()
        # A byte-level token can end inside a multi-byte character: wait for the rest of it.
        if text.endswith("\ufffd"):
            return ""
        return self._advance(text)

    def finish(self) -> str:
        """Whatever is left, replacement characters included."""
        return self._advance(self._decode())

    def _decode(self) -> str:
        return str(self.tokenizer.decode(self.ids, skip_special_tokens=True))

    def _advance(self, text: str) -> str:
        # Decoding a longer sequence can rewrite the tail (e.g. spaces before punctuation);
        # send only what extends the text already sent.
        if not text.startswith(self.sent):
            return ""
        delta, self.sent = text[len(self.sent) :], text
        return delta


# --- the OpenAI API -------------------------------------------------------------------------------


class StreamOptions(BaseModel):
    include_usage: bool = False
    continuous_usage_stats: bool = False  # vLLM's extension: usage in every chunk


class _Body(BaseModel):
    """Fields both endpoints share; unknown fields are ignored, as OpenAI servers do."""

    model_config = ConfigDict(extra="ignore")

    model: str | None = None
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=-1)  # vLLM's extension; -1 and 0 both mean off
    seed: int | None = None
    stream: bool = False
    stream_options: StreamOptions | None = None
    n: int = 1
    stop: str | list[str] | None = None
    logprobs: Any = None
    logit_bias: dict[str, float] | None = None
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


class CompletionBody(_Body):
    prompt: str | list[int]
    echo: bool = False


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: str
    content: str | list[dict[str, Any]]


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)


class APIError(Exception):
    """An error answered in OpenAI's shape: {"error": {"message", "type", "code"}}."""

    def __init__(self, status: int, message: str, code: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def error_response(status: int, message: str, code: str | None = None) -> JSONResponse:
    kind = "invalid_request_error" if status < 500 else "server_error"
    headers = {"Retry-After": "1"} if status in (429, 503) else None
    body = {"error": {"message": message, "type": kind, "code": code, "param": None}}
    return JSONResponse(body, status_code=status, headers=headers)


@dataclass(frozen=True)
class APIConfig:
    """What the API layer needs beyond the worker."""

    name: str  # the model id /v1/models lists and requests may name
    max_tokens: int  # the largest max_tokens a request may ask for; chat's default


def _unsupported(body: _Body) -> str | None:
    """The first requested feature lab serve does not implement, if any."""
    checks = {
        "n > 1": body.n != 1,
        "stop": bool(body.stop),
        "logprobs": body.logprobs not in (None, False, 0),
        "logit_bias": bool(body.logit_bias),
        "presence_penalty": body.presence_penalty != 0.0,
        "frequency_penalty": body.frequency_penalty != 0.0,
        "echo": isinstance(body, CompletionBody) and body.echo,
    }
    return next((name for name, asked in checks.items() if asked), None)


def _text(content: str | list[dict[str, Any]]) -> str:
    """A message's text: a string, or the text parts of a content list."""
    if isinstance(content, str):
        return content
    return "".join(str(p.get("text", "")) for p in content if p.get("type") == "text")


class API:
    """Request handling: validate, tokenize, queue, answer (JSON or SSE)."""

    def __init__(self, worker: Worker, config: APIConfig) -> None:
        self.worker, self.config = worker, config
        self.tokenizer = worker.target.tokenizer
        model = int(getattr(worker.target.model.config, "max_position_embeddings", 0))
        self.context = min(filter(None, (model, worker.context)), default=0)

    def models(self) -> dict[str, Any]:
        card = {"id": self.config.name, "object": "model", "created": 0, "owned_by": "lab"}
        return {"object": "list", "data": [card]}

    async def completion(self, body: CompletionBody) -> Response:
        if isinstance(body.prompt, str):
            ids = [int(i) for i in self.tokenizer(body.prompt)["input_ids"]]
        else:
            ids = list(body.prompt)
        return await self._answer(body, ids, body.max_tokens or 16, chat=False)

    async def chat(self, body: ChatBody) -> Response:
        if not getattr(self.tokenizer, "chat_template", None):
            raise APIError(400, f"model {self.config.name!r} has no chat template: use "
                           "/v1/completions")  # fmt: skip
        messages = [{"role": m.role, "content": _text(m.content)} for m in body.messages]
        text = self.tokenizer.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        # The template writes its own BOS: adding special tokens again would double it.
        ids = [int(i) for i in self.tokenizer(str(text), add_special_tokens=False)["input_ids"]]
        limit = body.max_completion_tokens or body.max_tokens or self.config.max_tokens
        return await self._answer(body, ids, limit, chat=True)

    def _check(self, body: _Body, ids: list[int], max_tokens: int) -> None:
        """Refuse what the engine cannot do, with OpenAI's status codes."""
        if body.model not in (None, self.config.name):
            raise APIError(404, f"model {body.model!r} not found: this server serves "
                           f"{self.config.name!r}", "model_not_found")  # fmt: skip
        if (feature := _unsupported(body)) is not None:
            raise APIError(400, f"{feature} is not supported by lab serve", "unsupported")
        if not ids:
            raise APIError(400, "the prompt is empty")
        if any(not 0 <= i < len(self.tokenizer) for i in ids):
            raise APIError(400, f"prompt token ids must be in [0, {len(self.tokenizer)})")
        if max_tokens > self.config.max_tokens:
            raise APIError(400, f"max_tokens {max_tokens} is above this server's limit "
                           f"{self.config.max_tokens} (lab serve --max-new-tokens)")  # fmt: skip
        if self.context and len(ids) + max_tokens > self.context:
            raise APIError(400, f"prompt ({len(ids)} tokens) + max_tokens ({max_tokens}) exceeds "
                           f"the context length {self.context}",
                           "context_length_exceeded")  # fmt: skip

    async def _answer(self, body: _Body, ids: list[int], max_tokens: int, chat: bool) -> Response:
        self._check(body, ids, max_tokens)
        sampling = SamplingParams(body.temperature, max(body.top_k, 0), body.top_p)
        job = Job(ids, max_tokens, sampling, body.seed or 0, asyncio.get_running_loop())
        try:
            self.worker.submit(job)
        except QueueFull as err:
            raise APIError(429, f"server busy: {err}; retry later", "queue_full") from None
        reply = Reply(self.config.name, chat, len(ids), body.stream_options or StreamOptions())
        if body.stream:
            return EventSourceResponse(self._stream(job, reply))
        try:
            result = await _final(job)
        finally:
            job.cancelled.set()  # a client that went away stops its generation
        return JSONResponse(reply.whole(result))

    async def _stream(self, job: Job, reply: Reply) -> AsyncIterator[bytes]:
        """SSE chunks as the worker emits tokens, then the finish chunk, usage and [DONE]."""
        text = TextStream(self.tokenizer)
        done = 0
        try:
            if reply.chat:
                yield _sse(reply.chunk("", None, role=True))
            while True:
                kind, payload = await job.events.get()
                if kind == "tokens":
                    done += len(payload)
                    if delta := text.push(payload):
                        yield _sse(reply.chunk(delta, done))
                elif kind == "done":
                    if tail := text.finish():
                        yield _sse(reply.chunk(tail, done))
                    yield _sse(reply.chunk("", done, finish=_finish_reason(payload)))
                    if reply.options.include_usage:
                        yield _sse(reply.usage_chunk(done))
                    break
                else:
                    yield _sse({"error": {"message": str(payload), "type": "server_error"}})
                    break
            yield format_sse_event(data_str="[DONE]")
        finally:
            job.cancelled.set()  # no-op when finished; stops the generation if the client left


async def _final(job: Job) -> PromptResult:
    """Wait for a job's result, skipping token events (non-streamed requests)."""
    while True:
        kind, payload = await job.events.get()
        if kind == "done":
            return payload
        if kind == "error":
            raise APIError(500, f"generation failed: {payload}")


def _sse(payload: dict[str, Any]) -> bytes:
    return format_sse_event(data_str=json.dumps(payload))


def _finish_reason(result: PromptResult) -> str:
    return "stop" if result.stop_reason == "eos" else "length"


@dataclass
class Reply:
    """Builds the response bodies of one request in OpenAI's completion or chat shape."""

    model: str
    chat: bool
    prompt_tokens: int
    options: StreamOptions
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def _envelope(self, obj: str, choices: list[dict[str, Any]]) -> dict[str, Any]:
        prefix = "chatcmpl" if self.chat else "cmpl"
        return {"id": f"{prefix}-{self.id}", "object": obj, "created": self.created,
                "model": self.model, "choices": choices}  # fmt: skip

    def usage(self, completion_tokens: int) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": completion_tokens,
                "total_tokens": self.prompt_tokens + completion_tokens}  # fmt: skip

    def whole(self, result: PromptResult) -> dict[str, Any]:
        """The non-streamed answer."""
        choice: dict[str, Any] = {"index": 0, "finish_reason": _finish_reason(result)}
        if self.chat:
            choice["message"] = {"role": "assistant", "content": result.text}
        else:
            choice.update(text=result.text, logprobs=None)
        obj = "chat.completion" if self.chat else "text_completion"
        return {**self._envelope(obj, [choice]), "usage": self.usage(result.new_tokens)}

    def chunk(
        self, text: str, done: int | None, finish: str | None = None, role: bool = False
    ) -> dict[str, Any]:
        """One stream chunk; `done` is the completion tokens so far (for continuous usage)."""
        choice: dict[str, Any] = {"index": 0, "finish_reason": finish}
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else {"content": text}
            choice["delta"] = {} if finish else delta
        else:
            choice.update(text=text, logprobs=None)
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        out = self._envelope(obj, [choice])
        if self.options.continuous_usage_stats and done is not None:
            out["usage"] = self.usage(done)
        return out

    def usage_chunk(self, done: int) -> dict[str, Any]:
        """The last chunk when stream_options.include_usage: no choices, the usage."""
        obj = "chat.completion.chunk" if self.chat else "text_completion"
        return {**self._envelope(obj, []), "usage": self.usage(done)}


def create_app(worker: Worker, config: APIConfig) -> FastAPI:
    """The FastAPI app; starts and stops the worker's thread with the app."""
    api = API(worker, config)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        worker.start()
        yield
        worker.stop()

    app = FastAPI(title="lab serve", lifespan=lifespan)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, err: APIError) -> JSONResponse:
        return error_response(err.status, err.message, err.code)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, err: RequestValidationError) -> JSONResponse:
        # OpenAI servers answer 400 (not FastAPI's 422) for a body that does not validate.
        problems = "; ".join(
            f"{'.'.join(map(str, e['loc'][1:])) or 'body'}: {e['msg']}" for e in err.errors()
        )
        return error_response(400, f"invalid request: {problems}", "invalid_request")

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, err: StarletteHTTPException) -> JSONResponse:
        return error_response(err.status_code, str(err.detail))

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "admitted": worker.admitted, "max_queue": worker.max_queue,
                "engine": worker.engine_name}  # fmt: skip

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return api.models()

    @app.post("/v1/completions")
    async def completions(body: CompletionBody) -> Response:
        return await api.completion(body)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody) -> Response:
        return await api.chat(body)

    return app


# --- running it -----------------------------------------------------------------------------------


def bind(host: str, port: int) -> socket.socket:
    """A listening socket (port 0 picks a free one), so the real address is known up front."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    sock.listen(128)
    return sock


def url_of(sock: socket.socket) -> str:
    host, port = sock.getsockname()[:2]
    return f"http://[{host}]:{port}" if ":" in host else f"http://{host}:{port}"


def serve(
    app: FastAPI, worker: Worker, host: str, port: int, ready_file: Path | None = None
) -> None:
    """Serve until SIGINT/SIGTERM; writes the URL to ready_file once it accepts connections.

    HTTP runs on a thread, the worker (built with own_thread=False) on this, the main thread.
    """
    sock = bind(host, port)
    url = url_of(sock)
    print(f"lab serve: listening on {url}", file=sys.stderr, flush=True)
    if ready_file is not None:
        tmp = ready_file.with_name(ready_file.name + ".tmp")
        tmp.write_text(url)
        os.replace(tmp, ready_file)  # whole or absent: a reader never sees half a URL
    config = uvicorn.Config(app, log_level="warning", access_log=False,
                            timeout_graceful_shutdown=5)  # fmt: skip
    http = uvicorn.Server(config)

    def run_http() -> None:
        try:
            http.run(sockets=[sock])
        finally:  # however HTTP ends, the worker's loop ends with it
            worker.stop()

    def on_signal(signum: int, frame: object) -> None:
        # uvicorn listens for signals only on the main thread: pass them on. Its shutdown
        # cancels open streams, which stops a running generation at its next token.
        http.should_exit = True

    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, on_signal)
    thread = threading.Thread(target=run_http, name="lab-http")
    thread.start()
    worker.run()
    thread.join()


@dataclass
class Launched:
    """A `lab serve` subprocess and where it listens (url is set once it does)."""

    process: subprocess.Popen[bytes]
    ready: Path  # the file `lab serve --ready-file` writes its URL to
    log: Path
    url: str = ""

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])


@contextmanager
def launched(args: Sequence[str], startup_timeout_s: float = 300.0) -> Iterator[Launched]:
    """Start `lab serve ARGS` on a free port, wait until it listens, stop it on exit."""
    with launched_all([args], startup_timeout_s) as (server,):
        yield server


@contextmanager
def launched_all(
    arg_lists: Sequence[Sequence[str]], startup_timeout_s: float = 300.0
) -> Iterator[list[Launched]]:
    """Start several `lab serve`s at once (their models load in parallel); stop all on exit."""
    with tempfile.TemporaryDirectory(prefix="lab-serve-") as tmp, ExitStack() as stack:
        servers = []
        for i, args in enumerate(arg_lists):
            servers.append(_start(args, Path(tmp) / str(i)))
            stack.callback(stop, servers[-1].process)
        for server in servers:
            server.url = _wait_ready(server, startup_timeout_s)
        yield servers


def _start(args: Sequence[str], folder: Path) -> Launched:
    folder.mkdir()
    ready, log_path = folder / "url", folder / "serve.log"
    cmd = [sys.executable, "-m", "lab.cli", "serve", "--port", "0", *args,
           "--ready-file", str(ready)]  # fmt: skip
    with log_path.open("wb") as log_file:  # a file, not a pipe: nobody has to drain it
        proc = subprocess.Popen(cmd, stdout=log_file, stderr=subprocess.STDOUT)
    return Launched(proc, ready, log_path)


def _wait_ready(server: Launched, timeout_s: float) -> str:
    deadline = time.monotonic() + timeout_s
    while not server.ready.exists():
        if server.process.poll() is not None:
            raise RuntimeError(f"lab serve exited with {server.process.returncode} before "
                               f"listening:\n{server.log_tail()}")  # fmt: skip
        if time.monotonic() > deadline:
            raise TimeoutError(f"lab serve did not listen within {timeout_s:.0f} s:\n"
                               f"{server.log_tail()}")  # fmt: skip
        time.sleep(0.05)
    return server.ready.read_text().strip()


def stop(proc: subprocess.Popen[bytes], timeout_s: float = 10.0) -> None:
    """SIGTERM, then SIGKILL if it has not exited within timeout_s."""
    if proc.poll() is not None:
        return
    proc.terminate()
    try:
        proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
