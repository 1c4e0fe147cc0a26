"""The whole `dvc repro` on tiny random models: every output, MLflow run and report table exists."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
SMOKE = {
    "models": {"target": "tiny-random-qwen2", "draft": "tiny-random-qwen2-draft",
               "scorer": "tiny-random-qwen2", "device": "cpu", "dtype": None},
    "prompts": {"per_category": 1},
    "generation": {"max_new_tokens": 12},
    "ksweep": {"ks": [1, 2, 4]},
    "perplexity": {"window": 128, "stride": 64, "corpus_chars": 2000},
}  # fmt: skip


def _tracked_files() -> list[str]:
    out = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT, check=True,
                         capture_output=True, text=True).stdout  # fmt: skip
    return [line for line in out.splitlines() if (ROOT / line).is_file()]


def smoke_params(params: dict) -> dict:
    """params.yaml of the repo with the smoke profile laid over it."""
    for section, values in SMOKE.items():
        params[section].update(values)
    return params


def run(cmd: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    assert result.returncode == 0, (
        f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    )
    return result


@pytest.fixture(scope="module")
def repo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    """A fresh copy of the project with the smoke params, after one full `dvc repro`."""
    repo = tmp_path_factory.mktemp("smoke")
    for name in _tracked_files():
        if not name.startswith(("experiments/", "reports/", "dvc.lock")):
            (repo / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, repo / name)
    params = smoke_params(yaml.safe_load((repo / "params.yaml").read_text()))
    (repo / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "LAB_MLFLOW_EXPERIMENT": "smoke"}  # fmt: skip
    env.pop("MLFLOW_TRACKING_URI", None)
    for cmd in (["git", "init", "-q"], ["git", "add", "-A"],
                ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "smoke"],
                ["dvc", "repro"]):  # fmt: skip
        run(cmd, repo, env)
    return repo, env


def _declared_outputs(repo: Path) -> list[Path]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return [
        repo / out["path"] for stage in lock["stages"].values() for out in stage.get("outs", [])
    ]


def test_every_declared_output_exists(repo):
    path, _ = repo
    outs = _declared_outputs(path)
    assert len(outs) > 30
    for out in outs:
        assert out.exists(), out
        if out.is_file() and out.name != "lossless.csv":
            assert out.stat().st_size > 0, out


def test_report_tables_and_figures(repo):
    path, _ = repo
    report = (path / "reports" / "report.md").read_text()
    assert "mean accepted length" in report.lower()
    tables = list((path / "reports" / "tables").glob("*.csv"))
    assert len(tables) >= 6
    for table in tables:
        for ext in (".csv", ".md", ".tex"):
            assert table.with_suffix(ext).stat().st_size > 0
    figures = list((path / "reports" / "figures").glob("*.png"))
    assert len(figures) >= 5 and all(f.stat().st_size > 1000 for f in figures)


def test_metrics_for_dvc_exp_show(repo):
    path, _ = repo
    metrics = json.loads((path / "experiments/ksweep/k2/metrics.json").read_text())
    for key in ("speedup", "tokens_per_s", "acceptance_rate", "mean_accepted_length"):
        assert metrics[key] is not None
    reused = json.loads((path / "experiments/policies/exact/config.json").read_text())
    assert reused["reused_from"].endswith("ksweep/k4")  # run once, reused, never run twice
    lossless = (path / "experiments/ksweep/k2/lossless.csv").read_text().splitlines()
    assert len(lossless) == 7 and all(",True," in line for line in lossless[1:])


def test_mlflow_runs_with_step_histories(repo):
    from mlflow.tracking import MlflowClient

    path, _ = repo
    client = MlflowClient(f"sqlite:///{path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("smoke")
    runs = client.search_runs([experiment.experiment_id], max_results=1000)
    children = [r for r in runs if "mlflow.parentRunId" in r.data.tags]
    stages = {r.data.tags["stage"] for r in children}
    assert {"baseline", "ksweep", "policies", "drafters", "adaptive", "perplexity"} <= stages
    parents = {r.data.tags["mlflow.parentRunId"] for r in children}
    assert len(parents) == 1  # one parent for the whole dvc repro
    parent = client.get_run(parents.pop())
    assert parent.info.status == "FINISHED"
    k2 = next(r for r in children if r.data.tags.get("item") == "k2")
    steps = len((path / "experiments/ksweep/k2/steps.csv").read_text().splitlines()) - 1
    history = client.get_metric_history(k2.info.run_id, "step.accepted")
    assert len(history) == steps > 0
    assert k2.data.params["run.method.k"] == "2"


def test_second_repro_does_nothing(repo):
    path, env = repo
    out = run(["dvc", "repro"], path, env).stdout
    assert "Running stage" not in out
