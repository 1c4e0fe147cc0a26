"""The whole `dvc repro` on tiny random models: every output, MLflow run and report table exists.

`smoke` (tests/conftest.py) is the one reproduced pipeline, shared with the fault and layout tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml

from tests.smoke import Repo, run


def _declared_outputs(repo: Path) -> list[Path]:
    lock = yaml.safe_load((repo / "dvc.lock").read_text())
    return [
        repo / out["path"] for stage in lock["stages"].values() for out in stage.get("outs", [])
    ]


def test_every_declared_output_exists(smoke: Repo) -> None:
    path = smoke.path
    outs = _declared_outputs(path)
    assert len(outs) > 30
    for out in outs:
        assert out.exists(), out
        if out.is_file() and out.name != "lossless.csv":
            assert out.stat().st_size > 0, out


def test_report_tables_and_figures(smoke: Repo) -> None:
    path = smoke.path
    report = (path / "reports" / "report.md").read_text()
    assert "mean accepted length" in report.lower()
    tables = list((path / "reports" / "tables").glob("*.csv"))
    assert len(tables) >= 6
    for table in tables:
        for ext in (".csv", ".md", ".tex"):
            assert table.with_suffix(ext).stat().st_size > 0
    figures = list((path / "reports" / "figures").glob("*.png"))
    assert len(figures) >= 5 and all(f.stat().st_size > 1000 for f in figures)


def test_metrics_for_dvc_exp_show(smoke: Repo) -> None:
    path = smoke.path
    metrics = json.loads((path / "experiments/ksweep/k2/metrics.json").read_text())
    for key in ("speedup", "tokens_per_s", "acceptance_rate", "mean_accepted_length"):
        assert metrics[key] is not None
    reused = json.loads((path / "experiments/policies/exact/config.json").read_text())
    assert reused["reused_from"].endswith("ksweep/k4")  # run once, reused, never run twice
    lossless = (path / "experiments/ksweep/k2/lossless.csv").read_text().splitlines()
    assert len(lossless) == 7 and all(",True," in line for line in lossless[1:])


def test_mlflow_runs_with_step_histories(smoke: Repo) -> None:
    from mlflow.tracking import MlflowClient

    path = smoke.path
    client = MlflowClient(f"sqlite:///{path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("smoke")
    assert experiment is not None
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
    # A timing varies every step, so it is charted whole (constant series are only tagged).
    history = client.get_metric_history(k2.info.run_id, "step.verify_ms")
    assert len(history) == steps > 0
    assert k2.data.params["run.method.k"] == "2"


def test_second_repro_does_nothing(smoke: Repo) -> None:
    out = run(["dvc", "repro"], smoke.path, smoke.env).stdout
    assert "Running stage" not in out


def _exp_show(path: Path, env: dict[str, str]) -> tuple[dict, list[dict]]:
    """`dvc exp show --json`: the baseline commit's data and its experiments' (name, data)."""
    rows = json.loads(run(["dvc", "exp", "show", "--json"], path, env).stdout)
    commit = next(r for r in rows if r["rev"] != "workspace")
    experiments = [rev for exp in commit.get("experiments") or [] for rev in exp["revs"]]
    return commit["data"], experiments


def _metrics(data: dict, name: str) -> str:
    """An item's metrics.json is a DVC out (only the report's headline is a metric): its hash."""
    return data["outs"][name]["hash"]


def test_param_experiment_differs_and_is_tagged(smoke_copy: Repo) -> None:
    """`dvc exp run -S k=3` on a copy of the repo (the workspace keeps main's results)."""
    from mlflow.tracking import MlflowClient

    path, env = smoke_copy
    run(["git", "add", "-A"], path, env)  # main's results committed: the experiment's baseline
    run(["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "main"], path, env)
    # Two of the items that use k, not all nine: each is a process that loads torch (time).
    targets = ["policies@exact", "adaptive@adaptive"]
    run(["dvc", "exp", "run", "-S", "k=3", *targets], path, env)
    main, experiments = _exp_show(path, env)
    assert len(experiments) == 1, experiments
    name, data = experiments[0]["name"], experiments[0]["data"]
    assert data["params"]["params.yaml"]["data"]["k"] == 3
    for changed in ("policies/exact", "adaptive/adaptive"):
        metrics = f"experiments/{changed}/metrics.json"
        assert _metrics(data, metrics) != _metrics(main, metrics), changed
    unchanged = "experiments/ksweep/k2/metrics.json"  # the sweep does not use k
    assert _metrics(data, unchanged) == _metrics(main, unchanged)

    client = MlflowClient(f"sqlite:///{path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("smoke")
    assert experiment is not None
    query = f"tags.`dvc.exp_name` = '{name}'"
    runs = client.search_runs([experiment.experiment_id], query, max_results=1000)
    children = {
        f"{r.data.tags['stage']}/{r.data.tags['item']}": r for r in runs if "item" in r.data.tags
    }
    assert sorted(children) == sorted(changed.replace("@", "/") for changed in targets)
    assert children["policies/exact"].data.params["run.method.k"] == "3"
    parents = {r.data.tags["mlflow.parentRunId"] for r in children.values()}
    assert len(parents) == 1  # both stages under one parent run for the experiment
    assert client.get_run(parents.pop()).data.tags["dvc.exp_name"] == name
