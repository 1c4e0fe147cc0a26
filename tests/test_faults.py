"""Fault tests (issue 6): killed stages, reruns, bad inputs, determinism, parallel experiments.

Each test that runs DVC gets its own copy of the one reproduced smoke pipeline (`smoke_copy`).
"""

from __future__ import annotations

import hashlib
import json
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from lab import models
from lab.engine.sampling import SamplingParams
from lab.method import Method
from lab.pipeline.suite import run as run_method
from lab.prompts import load_suite
from lab.report.load import load_results
from lab.stats import summarize
from tests.smoke import Repo, run

# Measurements differ run to run; they are known by their unit (ms, tokens/s, MB).
MEASURED = ("_ms", "_per_s", "_mb")


def _unmeasured(row: dict) -> dict:
    """A result row without timings, memory and the step records (those are compared apart)."""
    return {k: v for k, v in row.items() if k != "steps" and not k.endswith(MEASURED)}


def _digest(path: Path) -> str:
    files = sorted(p for p in (path / "experiments").rglob("*") if p.is_file())
    sha = hashlib.sha256()
    for f in files:
        sha.update(str(f.relative_to(path)).encode() + f.read_bytes())
    return sha.hexdigest()


def _runs(path: Path, stage: str) -> list:
    client = MlflowClient(f"sqlite:///{path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("smoke")
    assert exp is not None, "no MLflow experiment 'smoke' was created"
    return client.search_runs([exp.experiment_id], f"tags.stage = '{stage}'", max_results=500)


def _edit_params(path: Path, edit: Callable[[dict], None]) -> None:
    params = yaml.safe_load((path / "params.yaml").read_text())
    edit(params)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(0.9, 40, 0.95)],
                         ids=["greedy", "sampling"])  # fmt: skip
def test_same_params_and_seed_give_identical_results(sampling):
    target = models.load("tiny-random-qwen2", dtype="float32")
    draft = models.load("tiny-random-qwen2-draft", dtype="float32")
    prompts = load_suite(per_category=1, categories=["code", "qa"])
    method = Method("draft_model", "rejection" if sampling.temperature else "exact", 3)
    runs = [run_method(method, target, draft, prompts, 16, sampling, seed=5, warmup=0)
            for _ in range(2)]  # fmt: skip
    for a, b in zip(*runs, strict=True):
        assert _unmeasured(a) == _unmeasured(b)
        counts = ("k", "proposed", "accepted", "emitted")
        assert [[s[c] for c in counts] for s in a["steps"]] == [
            [s[c] for c in counts] for s in b["steps"]
        ]
    # The summary metrics too, all but the timings.
    metrics = [_metrics(rows) for rows in runs]
    untimed = ("prompts", "new_tokens", "acceptance_rate", "mean_accepted_length", "mean_k")
    assert {k: metrics[0][k] for k in untimed} == {k: metrics[1][k] for k in untimed}
    assert metrics[0]["acceptance_rate"] is not None


def _metrics(rows: list[dict]) -> dict:
    frame = pd.DataFrame(rows)
    steps = pd.DataFrame([{"question_id": r["question_id"], "repetition": r["repetition"], **s}
                          for r in rows for s in r["steps"]])  # fmt: skip
    return summarize(frame, steps, seed=0)


def _long_prompt(path: Path) -> None:
    """A prompt file whose only prompt is longer than the tiny model's 2048-token context."""
    prompt = path.parent / "long.jsonl"
    turn = "def f(x):\n    return x + 1\n" * 400
    prompt.write_text(json.dumps({"question_id": 1, "category": "code", "turns": [turn]}) + "\n")
    _edit_params(
        path.parent, lambda p: p["prompts"].update(source=str(prompt), categories=["code"])
    )


def _empty_prompt(path: Path) -> None:
    prompt = path.parent / "empty.jsonl"
    prompt.write_text(json.dumps({"question_id": 1, "category": "code", "turns": ["  "]}) + "\n")
    _edit_params(
        path.parent, lambda p: p["prompts"].update(source=str(prompt), categories=["code"])
    )


# The faults the issue names. Unknown names (models, categories) fail in the same params check as
# the first two; test_models, test_prompts and test_cli cover their messages without a process.
@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda p: p.write_text("k: [unclosed\n"), "not valid YAML: expected ',' or ']'"),
        (lambda p: p.write_text(p.read_text().replace("source: builtin", "source: nope.jsonl")),
         "prompt file not found: nope.jsonl"),
        (_long_prompt, "exceeds tiny-random-qwen2's context of 2048 tokens"),
        (_empty_prompt, "turn 0 is empty"),
    ],
    ids=["malformed-yaml", "missing-prompt-file", "prompt-beyond-context", "empty-prompt"],
)  # fmt: skip
def test_bad_input_fails_clearly_and_keeps_results(smoke_copy: Repo, edit, message) -> None:
    path, env = smoke_copy
    params = path / "params.yaml"
    good = params.read_text()
    digest = _digest(path)
    try:
        edit(params)
        result = run(["python", "stages/baseline.py"], path, env, check=False)
    finally:
        params.write_text(good)
    assert result.returncode != 0
    # The last line (the exception) names the cause, and the outputs are untouched.
    assert message in result.stderr.splitlines()[-1], result.stderr[-2000:]
    assert _digest(path) == digest
    # dvc.yaml: a bare `dvc status` also covers pipelines/http, which never runs here.
    assert run(["dvc", "status", "dvc.yaml"], path, env).stdout.strip().endswith("up to date.")


def test_queued_experiments_in_parallel_keep_their_runs_apart(smoke_copy: Repo) -> None:
    path, env = smoke_copy
    # A setting of one stage item (the fewest stage processes to wait for): each experiment
    # re-runs drafters@prompt_lookup, perplexity and report.
    ngrams = {"ng1": 1, "ng2": 2}
    # Results committed first, as a clone has them: a queued experiment starts from the commit
    # plus changes to tracked files, so untracked item files (each item's metrics.json is an
    # out, not a DVC metric, which DVC would stage itself) would look deleted and re-run items.
    run(["git", "add", "-A"], path, env)
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "main"], path, env)
    for name, ngram in ngrams.items():
        run(["dvc", "exp", "run", "--queue", "-n", name,
             "-S", f"drafters.params.prompt_lookup.max_ngram={ngram}"], path, env)  # fmt: skip
    # Two queue workers, as `dvc queue start -j 2` starts them; this returns once both are done
    # (polling `dvc queue status` instead costs a dvc process every few seconds on 2 cores).
    run(["dvc", "exp", "run", "--run-all", "-j", "2"], path, env, check=False)
    status = run(["dvc", "queue", "status"], path, env).stdout
    if "Failed" in status or status.count("Success") != len(ngrams):
        logs = [run(["dvc", "queue", "logs", n], path, env, False).stdout[-3000:] for n in ngrams]
        pytest.fail("\n".join([status, *logs]))
    shown = _exp_metrics(run(["dvc", "exp", "show", "--json"], path, env).stdout)
    for name, ngram in ngrams.items():
        for stage, item in (("drafters", "prompt_lookup"), ("perplexity", "all")):
            runs = [r for r in _runs(path, stage) if r.data.tags.get("dvc.exp_name") == name]
            # Exactly one run per re-run stage item: none lost, none doubled.
            assert [r.data.tags["item"] for r in runs] == [item], (name, stage)
            assert runs[0].info.status == "FINISHED", (name, stage)
        (drafter,) = [r for r in _runs(path, "drafters") if r.data.tags.get("dvc.exp_name") == name]
        # The experiment's run used its own setting, and its DVC metrics are that run's.
        assert drafter.data.params["run.method.drafter_params.max_ngram"] == str(ngram)
        # The headline file (the one DVC metric) carries the item's speed-up under its name.
        metrics = shown[name]["metrics.json"]["data"]["prompt_lookup"]
        assert metrics["speedup"] == pytest.approx(drafter.data.metrics["speedup"])


def _exp_metrics(text: str) -> dict[str, dict]:
    """Experiment name -> its metrics files, from `dvc exp show --json`."""
    out = {}
    for commit in json.loads(text):
        for exp in commit.get("experiments") or []:
            for rev in exp.get("revs") or []:
                if rev.get("name"):
                    out[rev["name"]] = rev["data"]["metrics"]
    return out


def _kill_mid_run(path: Path, env: dict[str, str], sig: signal.Signals) -> None:
    """Start the baseline stage and kill it once it is generating (its progress bar shows)."""
    log = path / f"kill-{sig.name}.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(["python", "stages/baseline.py"], cwd=path, env=env, stderr=err,
                                stdout=subprocess.DEVNULL)  # fmt: skip
        deadline = time.time() + 300
        while "baseline/target:" not in log.read_text() and time.time() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.05)
        proc.send_signal(sig)
        proc.wait(timeout=60)
    # It was still generating when the signal came: it never got to write anything.
    assert "1/6" not in log.read_text() and proc.returncode != 0, log.read_text()[-2000:]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_stage_leaves_no_valid_output_and_rerun_recovers(
    smoke_copy: Repo, sig: signal.Signals
) -> None:
    path, env = smoke_copy
    # New params make the old outputs stale, so the stage really runs; four repetitions keep it
    # generating for long enough that the signal lands mid-generation.
    repetitions = yaml.safe_load((path / "params.yaml").read_text())["run"]["repetitions"] + 3
    _edit_params(path, lambda p: p["run"].update(repetitions=repetitions))
    target = path / "experiments/baseline/target"
    before = _digest(path)
    _kill_mid_run(path, env, sig)
    # The old complete outputs, untouched: DVC sees only the params change, the report the old item.
    assert _digest(path) == before
    status = run(["dvc", "status", "baseline"], path, env).stdout
    assert "params.yaml" in status and "changed outs" not in status, status
    baseline = load_results(path / "experiments").baseline
    assert baseline is not None
    assert baseline.metrics == json.loads((target / "metrics.json").read_text())
    killed = max(_runs(path, "baseline"), key=lambda r: r.info.start_time)
    # SIGTERM ends the run KILLED; after SIGKILL nothing can run, so the next stage marks it.
    assert killed.info.status == ("KILLED" if sig == signal.SIGTERM else "RUNNING")
    run(["dvc", "repro", "baseline"], path, env)
    assert run(["dvc", "status", "baseline"], path, env).stdout.strip().endswith("up to date.")
    config = json.loads((target / "config.json").read_text())
    assert config["run"]["repetitions"] == repetitions
    prompts = (target / "prompts.jsonl").read_text().splitlines()
    assert len(prompts) == 6 * repetitions  # one line per prompt and repetition, all four ran
    assert all(r.info.status != "RUNNING" for r in _runs(path, "baseline"))
    if sig == signal.SIGKILL:
        marked = MlflowClient(f"sqlite:///{path / 'mlflow.db'}").get_run(killed.info.run_id)
        assert marked.info.status == "FAILED" and "is gone" in marked.data.tags["lab.stale_reason"]
