"""The pipelines/http stage: load-test `lab serve` (started here) or a given server."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Callable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lab import models
from lab.pipeline import params as P
from lab.pipeline import stage, store, tracking
from lab.serve import server
from lab.serve.client import ClientConfig, Request, ServerError
from lab.serve.load import LoadRun, LoadSpec, benchmark, format_summary, summarize_load

log = logging.getLogger("lab.pipeline.loadtest")

ERRORS = "errors.jsonl"  # one line per failed request (the rows in prompts.jsonl all succeeded)


def write_run(out: Path, config: dict[str, Any], run: LoadRun, metrics: dict[str, Any]) -> None:
    """experiments/<stage>/<item>/ in the local stages' layout, plus errors.jsonl."""
    store.write_item(out, config, run.rows, metrics)
    with open(out / ERRORS, "w") as f:
        for error in run.errors:
            f.write(json.dumps(error) + "\n")


@dataclass(frozen=True)
class LoadtestSettings:
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
    if key not in section:
        raise P.ParamsError(f"params.yaml: missing key 'loadtest.{key}'")
    value = section[key]
    if not check(value):
        raise P.ParamsError(f"params.yaml: loadtest.{key} must be {want}, got {value!r}")
    return value


def _positive_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v > 0


def _positive_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool) and v > 0


def _lab_or_url(v: Any) -> bool:
    return v == "lab" or (isinstance(v, str) and v.startswith(("http://", "https://")))


def _check_root(root: dict[str, Any]) -> None:
    """The root params.yaml keys the stage reads (and no others, so it runs beside any)."""
    P.model_name(root, "target")
    P.sampling(root)
    P.prompts(root)
    tokens = root.get("generation", {}).get("max_new_tokens")
    if not _positive_int(tokens):
        raise P.ParamsError(f"params.yaml: generation.max_new_tokens must be a positive integer, "
                            f"got {tokens!r}")  # fmt: skip
    if not isinstance(root.get("seed"), int):
        raise P.ParamsError(f"params.yaml: seed must be an integer, got {root.get('seed')!r}")


def _serve_command(serve: Mapping[str, Any], root: dict[str, Any]) -> tuple[list[str], str]:
    """The `lab serve` arguments for loadtest.serve and the root models, and the report's label."""
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
    return args, label


def settings(section: Mapping[str, Any], root: dict[str, Any]) -> LoadtestSettings:
    """Validate the `loadtest` section and the root params it borrows, before any server starts."""
    _check_root(root)
    where = _setting(section, "server", _lab_or_url, "'lab' or an http(s):// URL")
    serve = _setting(section, "serve", lambda v: isinstance(v, dict), "a mapping")
    args, label = _serve_command(serve, root)
    return LoadtestSettings(
        server=where,
        label=label if where == "lab" else where,
        serve_args=args,
        model=section.get("model"),
        tokenizer=str(section.get("tokenizer") or root["models"]["target"]),
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
def server_url(chosen: LoadtestSettings) -> Iterator[str]:
    """The URL to benchmark: `lab serve` started (and stopped) here, or the given one."""
    if chosen.server != "lab":
        yield chosen.server
        return
    with server.launched(chosen.serve_args) as launched:
        log.info("lab serve %s at %s", " ".join(chosen.serve_args), launched.url)
        yield launched.url


def run_stage(
    concurrency: int, out: Path, section: Mapping[str, Any], root: dict[str, Any]
) -> None:
    """One stage item: benchmark the server at this concurrency, write out/, log to MLflow."""
    if not _positive_int(concurrency):
        raise P.ParamsError(f"params.yaml: loadtest.concurrency values must be positive integers, "
                            f"got {concurrency!r}")  # fmt: skip
    chosen = settings(section, root)
    prompts, sampling = P.prompts(root), P.sampling(root)
    tokenizer = models.load_tokenizer(chosen.tokenizer)
    spec = LoadSpec(chosen.requests, concurrency, chosen.rate, chosen.warmup, root["seed"])
    template = Request("", chosen.endpoint == "chat", chosen.stream,
                       root["generation"]["max_new_tokens"], sampling.temperature,
                       root["seed"])  # fmt: skip
    config = {"stage": "loadtest", "item": out.name, "server": chosen.label,
              "endpoint": chosen.endpoint, "loadtest": dict(section), "concurrency": concurrency,
              "request": template.body(chosen.model), "prompts": root["prompts"]}  # fmt: skip
    with tracking.stage_run("loadtest", out.name, config) as mlrun:
        with server_url(chosen) as url:
            client = ClientConfig(url, chosen.model, chosen.timeout_s)
            run = asyncio.run(benchmark(client, prompts, template, spec, tokenizer))
        if not run.rows:  # nothing was measured: fail the stage rather than write empty numbers
            raise ServerError(f"every request failed; the first: {run.errors[0]['message']}")
        metrics = summarize_load(run, root["seed"])
        write_run(out, config, run, metrics)
        stage.log_item(mlrun, store.read_item(out), out)
    print(format_summary(metrics))
