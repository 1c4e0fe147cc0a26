"""Fault tests (issue 6): killed stages, reruns, bad inputs, determinism, parallel experiments."""

from __future__ import annotations

import hashlib
import json
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

from lab import models
from lab.experiment import Method
from lab.experiment import run as run_method
from lab.prompts import load_suite
from lab.sampling import SamplingParams
from tests.smoke import make_repo, run


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    path = tmp_path_factory.mktemp("faults")
    env = make_repo(path, "faults")
    run(["dvc", "repro"], path, env)
    return path, env


def _digest(path: Path) -> str:
    files = sorted(p for p in (path / "experiments").rglob("*") if p.is_file())
    sha = hashlib.sha256()
    for f in files:
        sha.update(str(f.relative_to(path)).encode() + f.read_bytes())
    return sha.hexdigest()


def _runs(path: Path, stage: str) -> list:
    client = MlflowClient(f"sqlite:///{path / 'mlflow.db'}")
    exp = client.get_experiment_by_name("faults")
    assert exp is not None, "no MLflow experiment 'faults' was created"
    return client.search_runs([exp.experiment_id], f"tags.stage = '{stage}'", max_results=500)


def _kill_mid_run(path: Path, env: dict[str, str], sig: signal.Signals) -> None:
    """Start the baseline stage and kill it once it is generating (its progress bar shows)."""
    log = path / f"kill-{sig.name}.log"
    with open(log, "w") as err:
        proc = subprocess.Popen(["python", "stages/baseline.py"], cwd=path, env=env, stderr=err,
                                stdout=subprocess.DEVNULL)  # fmt: skip
        deadline = time.time() + 120
        while "baseline/target:" not in log.read_text() and time.time() < deadline:
            assert proc.poll() is None, log.read_text()
            time.sleep(0.05)
        proc.send_signal(sig)
        proc.wait(timeout=60)


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_killed_stage_leaves_no_valid_output_and_rerun_recovers(repo, sig):
    path, env = repo
    # Change the baseline's params so its old outputs are stale and it must really re-run.
    params = yaml.safe_load((path / "params.yaml").read_text())
    params["generation"]["max_new_tokens"] += 1
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    before = (path / "experiments/baseline/target/metrics.json").read_text()
    _kill_mid_run(path, env, sig)
    target = path / "experiments/baseline/target"
    # Either the old complete item (write-then-rename never started) or nothing: never a new
    # half-written one, and no temporary folder DVC or the report would take as an item.
    assert not target.exists() or (target / "metrics.json").read_text() == before
    assert not list((path / "experiments/baseline").glob("*/metrics.json.tmp"))
    status = run(["dvc", "status", "baseline"], path, env).stdout
    assert "changed" in status or "modified" in status
    killed = max(_runs(path, "baseline"), key=lambda r: r.info.start_time)
    if sig == signal.SIGTERM:
        assert killed.info.status == "KILLED"
    else:
        assert killed.info.status == "RUNNING"  # SIGKILL: nothing can run; the next repro cleans up
    run(["dvc", "repro"], path, env)
    assert run(["dvc", "status"], path, env).stdout.strip().endswith("up to date.")
    assert json.loads((target / "metrics.json").read_text())["new_tokens"] > 0
    assert all(r.info.status != "RUNNING" for r in _runs(path, "baseline"))


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda p: p.write_text("k: [unclosed\n"), "not valid YAML"),
        (lambda p: p.write_text(p.read_text().replace("source: builtin", "source: nope.jsonl")),
         "nope.jsonl"),
        (lambda p: p.write_text(re.sub(r"max_new_tokens: \d+", "max_new_tokens: 5000",
                                       p.read_text())), "context"),
        (lambda p: p.write_text(p.read_text().replace("target: tiny-random-qwen2",
                                                      "target: gpt-17")), "models.target"),
        (lambda p: p.write_text(p.read_text().replace("- writing", "- poetry")), "poetry"),
    ],
    ids=["malformed-yaml", "missing-prompt-file", "prompt-beyond-context", "unknown-model",
         "unknown-category"],
)  # fmt: skip
def test_bad_input_fails_clearly_and_keeps_results(repo, edit, message):
    path, env = repo
    params = path / "params.yaml"
    good = params.read_text()
    digest = _digest(path)
    try:
        edit(params)
        result = run(["python", "stages/baseline.py"], path, env, check=False)
    finally:
        params.write_text(good)
    assert result.returncode != 0
    assert message in result.stderr.splitlines()[-1], result.stderr[-2000:]
    assert _digest(path) == digest


def test_empty_prompt_file_entry_is_refused(repo, tmp_path):
    path, env = repo
    bad = tmp_path / "question.jsonl"
    bad.write_text(json.dumps({"question_id": 1, "category": "code", "turns": ["  "]}) + "\n")
    params = path / "params.yaml"
    good = params.read_text()
    digest = _digest(path)
    edited = yaml.safe_load(good)
    edited["prompts"].update(source=str(bad), categories=["code"])
    try:
        params.write_text(yaml.safe_dump(edited, sort_keys=False))
        result = run(["python", "stages/baseline.py"], path, env, check=False)
    finally:
        params.write_text(good)
    assert result.returncode != 0 and "empty" in result.stderr.splitlines()[-1]
    assert _digest(path) == digest


@pytest.mark.parametrize("sampling", [SamplingParams(), SamplingParams(0.9, 40, 0.95)],
                         ids=["greedy", "sampling"])  # fmt: skip
def test_same_params_and_seed_give_identical_results(sampling):
    target = models.load("tiny-random-qwen2")
    draft = models.load("tiny-random-qwen2-draft")
    prompts = load_suite(per_category=1, categories=["code", "qa"])
    method = Method("draft_model", "rejection" if sampling.temperature else "exact", 3)
    timing = {"prefill_ms", "total_ms", "tokens_per_s", "ttft_ms", "peak_rss_mb",
              "draft_prefill_ms", "steps"}  # fmt: skip
    runs = [run_method(method, target, draft, prompts, 16, sampling, seed=5, warmup=0)
            for _ in range(2)]  # fmt: skip
    for a, b in zip(*runs, strict=True):
        assert {k: v for k, v in a.items() if k not in timing} == {
            k: v for k, v in b.items() if k not in timing
        }
        counts = ("k", "proposed", "accepted", "emitted")
        assert [[s[c] for c in counts] for s in a["steps"]] == [
            [s[c] for c in counts] for s in b["steps"]
        ]


def test_queued_experiments_in_parallel_keep_their_runs_apart(repo):
    path, env = repo
    run(["dvc", "exp", "run", "--queue", "-S", "k=2", "-n", "qk2"], path, env)
    run(["dvc", "exp", "run", "--queue", "-S", "k=1", "-n", "qk1"], path, env)
    run(["dvc", "queue", "start", "-j", "2"], path, env)
    deadline = time.time() + 900
    while time.time() < deadline:
        status = run(["dvc", "queue", "status"], path, env).stdout
        if "Queued" not in status and "Running" not in status:
            break
        time.sleep(5)
    assert "Failed" not in status, run(["dvc", "queue", "logs", "qk2"], path, env, False).stdout
    shown = json.loads(run(["dvc", "exp", "show", "--json"], path, env).stdout)
    names = json.dumps(shown)
    assert "qk1" in names and "qk2" in names
    for name, k in (("qk1", 1), ("qk2", 2)):
        runs = [r for r in _runs(path, "policies") if r.data.tags.get("dvc.exp_name") == name]
        assert runs, f"no MLflow run for experiment {name}"
        # Every run of the experiment used its own k, never the other's.
        assert {r.data.params["run.method.k"] for r in runs} == {str(k)}
        assert all(r.info.status == "FINISHED" for r in runs)
