"""The profile param of generating stages, and the profiling-off overhead benchmark."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pandas as pd
import pytest
import yaml
from mlflow.tracking import MlflowClient

from lab import stats
from lab.bench import overhead
from lab.method import Method
from lab.pipeline import params as P
from lab.pipeline import profiling, stage, store, tracking
from tests.smoke import ROOT, smoke_params


@pytest.fixture
def workdir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A folder with smoke params (two prompts) as a stage's working directory and MLflow root."""
    params = smoke_params(yaml.safe_load((ROOT / "params.yaml").read_text()))
    params["prompts"]["categories"] = ["code", "qa"]
    (tmp_path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    for name in ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("LAB_MLFLOW_EXPERIMENT", "profile")
    monkeypatch.setenv("LAB_SESSION", "test-profile")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _set_profile(path: Path, on: bool) -> None:
    params = yaml.safe_load((path / "params.yaml").read_text())
    params["profile"] = on
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))


def test_profile_param_writes_trace_tables_and_artifacts(workdir: Path) -> None:
    _set_profile(workdir, True)
    out = stage.run(P.load(), "baseline", "target", Method())
    folder = out / store.PROFILE
    assert json.loads((folder / profiling.TRACE).read_text())["traceEvents"]
    assert len(pd.read_csv(folder / profiling.TOP_OPS)) > 5
    phases = pd.read_csv(folder / profiling.BREAKDOWN)
    assert len(phases) == len(store.read_item(out).steps)
    assert set(stats.PHASES) <= set(phases.columns)
    assert json.loads((out / store.CONFIG).read_text())["run"]["profile"] is True
    assert not list(workdir.glob("experiments/baseline/.*"))  # no temporary folder left
    client = MlflowClient(tracking.tracking_uri())
    found = client.get_experiment_by_name("profile")
    assert found is not None
    run = client.search_runs([found.experiment_id])[0]
    logged = {a.path for a in client.list_artifacts(run.info.run_id, store.PROFILE)}
    names = (profiling.TRACE, profiling.TOP_OPS, profiling.BREAKDOWN)
    assert {f"{store.PROFILE}/{n}" for n in names} <= logged


def test_profile_off_writes_nothing_and_keeps_the_config(workdir: Path) -> None:
    _set_profile(workdir, False)
    out = stage.run(P.load(), "baseline", "target", Method())
    assert not (out / store.PROFILE).exists()
    # Off leaves the run config as it was before the param existed, so old runs stay reusable.
    assert "profile" not in json.loads((out / store.CONFIG).read_text())["run"]


def test_profile_must_be_a_bool(workdir: Path) -> None:
    params = yaml.safe_load((workdir / "params.yaml").read_text())
    params["profile"] = "yes"
    (workdir / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    with pytest.raises(P.ParamsError, match="profile must be true or false, got 'yes'"):
        P.load()


def test_overhead_benchmark_prints_a_ratio(capsys: pytest.CaptureFixture[str]) -> None:
    overhead.main(["--repetitions", "2", "--max-new-tokens", "4"])
    out = capsys.readouterr().out
    assert re.search(r"ratio median \d+\.\d+, IQR \[\d+\.\d+, \d+\.\d+\]", out), out
