"""`lab mlflow import` loads results on disk once; `lab ui` serves them or says why it cannot."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from lab.cli import main
from lab.engine.records import StepRecord
from lab.pipeline import mlflow_import, mlflow_ui, store, tracking


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("repo")  # one sqlite store: building its schema takes seconds


@pytest.fixture
def client(
    root: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[MlflowClient]:
    for name in ("MLFLOW_TRACKING_URI", "LAB_SESSION", "DVC_EXP_NAME"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DVC_ROOT", str(root))
    monkeypatch.setenv("LAB_MLFLOW_EXPERIMENT", request.node.name)
    yield MlflowClient(tracking.tracking_uri())


def _steps(k: int) -> list[dict[str, float]]:
    """Four steps of one generation; `k` is constant, as on the baseline."""
    return [asdict(StepRecord(step=i, k=k, proposed=k, depth=k, accepted=i % 2,
                              emitted=1 + i % 2, draft_ms=0.5 * i, verify_ms=2.0 + i,
                              step_ms=3.0 + i, rss_mb=100.0))
            for i in range(4)]  # fmt: skip


def _item(out: Path, k: int, metrics: dict[str, float]) -> None:
    rows = [{"question_id": q, "repetition": 0, "new_tokens": 6, "tokens_per_s": 2.0 + j,
             "peak_cuda_mb": None, "token_ids": [1, 2], "prompt_ids": [3], "text": "ab",
             "steps": _steps(k)} for j, q in enumerate(("q1", "q2"))]  # fmt: skip
    store.write_item(
        out, {"run": {"method": {"k": k}}, "machine": {"device": "cpu"}}, rows, metrics
    )


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """experiments/ as a full run leaves it: two stage items, heads, stage-level perplexity."""
    exp = tmp_path / "experiments"
    _item(exp / "baseline" / "target", 0, {"mean_accepted_length": 1.0, "speedup": 1.0})
    k4 = {"mean_accepted_length": 2.5, "speedup": 1.2, "acceptance_rate": 0.4,
          "peak_cuda_mb": float("nan")}  # fmt: skip
    _item(exp / "ksweep" / "k4", 4, k4)
    (exp / "heads" / "medusa").mkdir(parents=True)
    (exp / "heads" / "medusa" / "metrics.json").write_text('{"heldout_loss": 6.0}')
    (exp / "heads" / "medusa" / "loss.csv").write_text("step,loss,lr\n1,9.0,0.1\n2,8.0,0.1\n")
    (exp / "perplexity").mkdir()
    (exp / "perplexity" / "metrics.json").write_text('{"ksweep.k4.output_ppl": 1.5}')
    (exp / "ksweep" / ".k6.tmp").mkdir()  # a half-written item: never imported
    (exp / "ksweep" / ".k6.tmp" / "metrics.json").write_text('{"speedup": 9.0}')
    return exp


def _runs(client: MlflowClient) -> list[Run]:
    return tracking.search(client, tracking.repo_experiment_id(), "")


def test_import_loads_items_under_one_parent_once(client: MlflowClient, tree: Path) -> None:
    assert main(["mlflow", "import", str(tree)]) == 0
    runs = _runs(client)
    children = {r.info.run_name: r for r in runs if "item" in r.data.tags}
    assert sorted(children) == ["baseline/target", "heads/medusa", "ksweep/k4", "perplexity/all"]
    (parent,) = [r for r in runs if r.data.tags["lab.role"] == "session"]
    assert parent.info.status == "FINISHED"
    assert {r.data.tags["mlflow.parentRunId"] for r in children.values()} == {parent.info.run_id}

    k4 = children["ksweep/k4"]
    assert k4.data.params["run.method.k"] == "4" and k4.data.tags["device"] == "cpu"
    steps = client.get_metric_history(k4.info.run_id, "step.verify_ms")
    assert sorted((m.step, m.value) for m in steps)[-1] == (7, 5.0)  # 2 prompts x 4 steps
    assert k4.data.tags["lab.constant_series"] == (
        "prompt.new_tokens=6, step.accept_ms=0, step.depth=4, step.k=4, step.proposed=4, "
        "step.rss_mb=100"
    )  # fmt: skip
    for absent in ("step.step", "step.prompt_index", "step.k", "prompt.repetition",
                   "prompt.peak_cuda_mb", "peak_cuda_mb"):  # fmt: skip
        assert absent not in k4.data.metrics
    loss = client.get_metric_history(children["heads/medusa"].info.run_id, "step.loss")
    assert [(m.step, m.value) for m in loss] == [(1, 9.0), (2, 8.0)]
    assert {a.path for a in client.list_artifacts(k4.info.run_id)} >= {"metrics.json", "steps.csv"}

    assert parent.data.metrics["ksweep.k4.speedup"] == 1.2 and parent.data.metrics["speedup"] == 1.2
    assert parent.data.metrics["noise_floor"] == 1.0
    assert parent.data.metrics["ksweep.k4.output_ppl"] == 1.5

    again = mlflow_import.import_experiments(tree)
    assert again.already and again.parent_id == parent.info.run_id
    assert len(_runs(client)) == len(runs) == 5  # no duplicates

    # Changed results are a new tree: a new parent with all its items.
    (tree / "ksweep" / "k4" / "metrics.json").write_text('{"speedup": 1.4}')
    assert not mlflow_import.import_experiments(tree).already
    assert len(_runs(client)) == 10


def test_an_interrupted_import_is_redone(
    client: MlflowClient, tree: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    real = mlflow_import._import_item
    calls = []

    def fail_on_second(*args: object) -> None:
        calls.append(args)
        if len(calls) == 2:
            raise RuntimeError("killed")
        real(*args)  # type: ignore[arg-type]

    monkeypatch.setattr(mlflow_import, "_import_item", fail_on_second)
    with pytest.raises(RuntimeError, match="killed"):
        mlflow_import.import_experiments(tree)
    assert [r.info.status for r in _runs(client) if "item" not in r.data.tags] == ["FAILED"]
    monkeypatch.setattr(mlflow_import, "_import_item", real)
    assert not mlflow_import.import_experiments(tree).already
    runs = _runs(client)
    assert len(runs) == 5 and all(r.info.status == "FINISHED" for r in runs)


def test_import_of_a_folder_without_items_says_so(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match="no stage items"):
        mlflow_import.import_experiments(tmp_path)


def test_ui_exits_nonzero_when_its_port_is_taken(root: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run([sys.executable, "-m", "lab.cli", "ui", "--port", str(port)],
                              capture_output=True, text=True, timeout=120,
                              env={"DVC_ROOT": str(root), "PATH": "/usr/bin:/bin"})  # fmt: skip
    assert done.returncode != 0
    assert done.stderr.strip().splitlines()[-1] == (
        f"lab ui: error: port {port} on 127.0.0.1 is in use (another `lab ui`?): pick --port"
    )


def test_ui_fails_when_mlflow_exits_before_serving() -> None:
    # mlflow ui can end with status 0 without ever serving: that is a failure too.
    quits = subprocess.Popen([sys.executable, "-c", "pass"])
    with pytest.raises(mlflow_ui.UIError, match=r"exited \(status 0\) before serving") as err:
        mlflow_ui._wait_until_serving(quits, 9)
    assert err.value.code != 0


def test_ui_on_an_empty_store_says_how_to_get_runs(
    client: MlflowClient, capsys: pytest.CaptureFixture[str]
) -> None:
    mlflow_ui.prepare(None)
    line = capsys.readouterr().err.strip()
    assert "no runs yet" in line and "lab mlflow import experiments/" in line
    assert "\n" not in line


def test_ui_import_loads_runs_first(
    client: MlflowClient, tree: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    experiment_id = mlflow_ui.prepare(tree)
    assert "4 items imported" in capsys.readouterr().err
    assert json.loads(client.get_experiment(experiment_id).tags["mlflow.sharedViewState.lab"])
    assert len(_runs(client)) == 5
