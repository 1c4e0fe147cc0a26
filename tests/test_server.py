"""`lab serve` in-process: validation, the bounded queue, cancellation, speculative serving."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import httpx2
import pytest
import uvicorn

from lab.engine import loop
from lab.engine.model import LoadedModel
from lab.engine.sampling import SamplingParams
from lab.method import Method
from lab.serve import server
from lab.serve.client import Client, ClientConfig, Completion, Request


@contextmanager
def running(worker: server.Worker, max_tokens: int = 2000) -> Iterator[str]:
    """Serve the worker on a free loopback port in a thread; yields the base URL."""
    app = server.create_app(worker, server.APIConfig("tiny", max_tokens))
    sock = server.bind("127.0.0.1", 0)
    uv = uvicorn.Server(uvicorn.Config(app, log_level="warning", access_log=False))
    thread = threading.Thread(target=uv.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not uv.started:
        time.sleep(0.01)
    try:
        yield server.url_of(sock)
    finally:
        uv.should_exit = True
        thread.join(10)


@pytest.fixture(scope="module")
def url(qwen2: LoadedModel) -> Iterator[str]:
    with running(server.Worker(qwen2, None, Method(), max_queue=2)) as base:
        yield base


def stream(url: str, prompt: str, max_tokens: int) -> Completion:
    async def go() -> Completion:
        async with Client(ClientConfig(url, timeout_s=20)) as client:
            return await client.complete(Request(prompt, chat=False, max_tokens=max_tokens))

    return asyncio.run(go())


def test_text_stream_holds_back_split_characters(qwen2: LoadedModel) -> None:
    ids = qwen2.tokenizer("é!", add_special_tokens=False)["input_ids"]
    assert len(ids) == 3  # byte-level: é is two tokens
    text = server.TextStream(qwen2.tokenizer)
    assert [text.push([i]) for i in ids] == ["", "é", "!"]
    assert text.finish() == ""


def test_worker_refuses_past_its_queue(qwen2: LoadedModel) -> None:
    worker = server.Worker(qwen2, None, Method(), max_queue=1)  # thread not started: jobs wait
    loop = asyncio.new_event_loop()
    try:
        job = server.Job([1, 2], 4, SamplingParams(), 0, loop)
        worker.submit(job)
        worker.submit(job)
        with pytest.raises(server.QueueFull, match="2 requests running or waiting"):
            worker.submit(job)
    finally:
        loop.close()


@pytest.mark.parametrize(
    ("path", "body", "status", "match"),
    [
        ("/v1/completions", {"prompt": "hi", "n": 2}, 400, "n > 1 is not supported"),
        ("/v1/completions", {"prompt": "hi", "stop": ["\n"]}, 400, "stop is not supported"),
        ("/v1/completions", {"prompt": ""}, 400, "the prompt is empty"),
        ("/v1/completions", {"prompt": [1, 10**6]}, 400, "token ids must be in"),
        ("/v1/completions", {"prompt": "hi", "max_tokens": 2001}, 400, "above this server's limit"),
        ("/v1/completions", {"prompt": "x" * 2040, "max_tokens": 16}, 400, "context length 2048"),
        ("/v1/completions", {"prompt": "hi", "model": "gpt-4"}, 404, "model 'gpt-4' not found"),
        ("/v1/completions", {"prompt": "hi", "temperature": -1}, 400, "temperature"),
        ("/v1/completions", {"max_tokens": 4}, 400, "prompt: Field required"),
        ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ],
)  # fmt: skip
def test_bad_requests_get_openai_errors(
    url: str, path: str, body: dict[str, Any], status: int, match: str
) -> None:
    response = httpx2.post(url + path, json=body, timeout=10)
    assert response.status_code == status
    assert match in response.json()["error"]["message"]


def test_unstreamed_chat_answer_shape(url: str) -> None:
    body = {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 5, "temperature": 0}
    answer = httpx2.post(url + "/v1/chat/completions", json=body, timeout=10).json()
    assert answer["object"] == "chat.completion" and answer["model"] == "tiny"
    assert answer["choices"][0]["message"]["role"] == "assistant"
    assert answer["usage"]["completion_tokens"] == 5 and answer["choices"][0]["finish_reason"]


def test_client_that_leaves_stops_its_generation(url: str) -> None:
    body = {"prompt": "hi", "max_tokens": 1900, "temperature": 0, "stream": True}
    with httpx2.stream("POST", url + "/v1/completions", json=body, timeout=10) as response:
        lines = response.iter_lines()
        assert next(lines).startswith("data: ")  # generating; now hang up
    deadline = time.monotonic() + 3  # 1900 tokens would take far longer than this
    while httpx2.get(url + "/health").json()["admitted"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert httpx2.get(url + "/health").json()["admitted"] == 0
    assert stream(url, "again", 3).completion_tokens == 3


def test_speculative_server_streams_several_tokens_per_chunk(qwen2: LoadedModel) -> None:
    # The target drafting for itself accepts every draft: each step emits K+1 = 4 tokens.
    worker = server.Worker(qwen2, qwen2, Method("draft_model", "exact", 3), max_queue=0)
    with running(worker) as base:
        done = stream(base, "def fibonacci(n):", 40)
    ids = qwen2.tokenizer("def fibonacci(n):")["input_ids"]
    assert done.text == loop.generate(qwen2, ids, 40).text  # lossless
    totals = [int(t or 0) for t in done.chunk_tokens]
    counts = [b - a for a, b in zip([0, *totals[:-1]], totals, strict=True)]
    assert totals[-1] == 40 and counts[0] == 1 and max(counts) >= 4
