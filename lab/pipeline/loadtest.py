"""The pipelines/http stage: load-test `lab serve` (started here) or a given server."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Iterator
from contextlib import contextmanager
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


def serve_command(section: P.Loadtest, root: P.Params) -> tuple[list[str], str]:
    """The `lab serve` arguments for loadtest.serve on the root models, and the report's label."""
    target, serve = root.models.target, section.serve
    args = ["--target", target, "--max-new-tokens", str(root.generation.max_new_tokens),
            "--max-queue", str(serve.max_queue)]  # fmt: skip
    for key, value in (("device", root.models.device), ("dtype", root.models.dtype)):
        if value:
            args += [f"--{key}", value]
    label = f"lab serve {target}"
    if serve.draft:
        args += ["--draft", serve.draft, "--k", str(serve.k), "--policy", serve.policy]
        label += f" + {serve.draft} (K={serve.k}, {serve.policy})"
    if serve.threads:
        args += ["--threads", str(serve.threads)]
    return args, label


@contextmanager
def server_url(section: P.Loadtest, root: P.Params) -> Iterator[str]:
    """The URL to benchmark: `lab serve` started (and stopped) here, or the given one."""
    if section.server != "lab":
        yield section.server
        return
    args, _ = serve_command(section, root)
    with server.launched(args) as launched:
        log.info("lab serve %s at %s", " ".join(args), launched.url)
        yield launched.url


def run_stage(concurrency: int, out: Path, section: P.Loadtest, root: P.Params) -> None:
    """One stage item: benchmark the server at this concurrency, write out/, log to MLflow."""
    if concurrency not in section.concurrency:
        raise P.ParamsError(f"loadtest.concurrency lists {section.concurrency}, not {concurrency}")
    label = serve_command(section, root)[1] if section.server == "lab" else section.server
    tokenizer = models.load_tokenizer(section.tokenizer or root.models.target)
    spec = LoadSpec(section.requests, concurrency, section.rate, section.warmup, root.seed)
    template = Request("", section.endpoint == "chat", section.stream,
                       root.generation.max_new_tokens, root.generation.temperature,
                       root.seed)  # fmt: skip
    config = {"stage": "loadtest", "item": out.name, "server": label,
              "endpoint": section.endpoint, "loadtest": section.model_dump(),
              "concurrency": concurrency, "request": template.body(section.model),
              "prompts": root.prompts.model_dump()}  # fmt: skip
    with tracking.stage_run("loadtest", out.name, config) as mlrun:
        with server_url(section, root) as url:
            client = ClientConfig(url, section.model, section.timeout_s)
            run = asyncio.run(benchmark(client, root.prompts.suite(), template, spec, tokenizer))
        if not run.rows:  # nothing was measured: fail the stage rather than write empty numbers
            raise ServerError(f"every request failed; the first: {run.errors[0]['message']}")
        metrics = summarize_load(run, root.seed)
        write_run(out, config, run, metrics)
        stage.log_item(mlrun, store.read_item(out), out)
    print(format_summary(metrics))
