"""MLflow mirror: store location, nesting by session, tags, params, batched metrics, statuses."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import psutil
import pytest
from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from lab.pipeline import tracking

ENV = ("MLFLOW_TRACKING_URI", "DVC_EXP_NAME", "DVC_EXP_BASELINE_REV", "DVC_STAGE", "LAB_SESSION")


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # One store for the module: creating an MLflow sqlite schema takes seconds.
    return tmp_path_factory.mktemp("repo")


@pytest.fixture
def client(
    root: Path, monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest
) -> Iterator[MlflowClient]:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("DVC_ROOT", str(root))
    # A fresh experiment and session per test, so searches see only this test's runs.
    monkeypatch.setenv("LAB_MLFLOW_EXPERIMENT", request.node.name)
    monkeypatch.setenv("LAB_SESSION", f"test-{uuid.uuid4().hex}")
    yield MlflowClient(tracking.tracking_uri())


@pytest.fixture
def dvc(client: MlflowClient, monkeypatch: pytest.MonkeyPatch) -> Iterator[subprocess.Popen[bytes]]:
    """A stand-in for the `dvc repro` process whose stages this test's stage runs are."""
    monkeypatch.delenv("LAB_SESSION")
    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"])
    monkeypatch.setattr(tracking, "_dvc_process", lambda: psutil.Process(proc.pid))
    yield proc
    proc.kill()
    proc.wait()


def next_session(dvc: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch) -> str:
    """End the dvc process, then run a stage of a new session, as the next `dvc repro` would."""
    dvc.kill()
    dvc.wait()
    time.sleep(0.05)  # so that "ended when its last child did" differs from "ended now"
    monkeypatch.setenv("LAB_SESSION", f"next-{uuid.uuid4().hex}")
    with tracking.stage_run("baseline", "target", {}) as run:
        pass
    return run.run_id


def dead_pid() -> str:
    done = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          check=True, capture_output=True, text=True)  # fmt: skip
    return done.stdout.strip()


def parent_of(client: MlflowClient, run_id: str) -> Run:
    return client.get_run(client.get_run(run_id).data.tags["mlflow.parentRunId"])


def test_uri_built_from_dvc_root(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    assert tracking.repo_root() == tmp_path.resolve()
    assert tracking.tracking_uri() == f"sqlite:///{tmp_path.resolve()}/mlflow.db"


def test_tracking_uri_env_overrides(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DVC_ROOT", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.team:5000")
    assert tracking.tracking_uri() == "http://mlflow.team:5000"


def test_flatten_and_truncate() -> None:
    assert tracking.flatten({"a": {"b": {"c": 1}, "d": []}, "e": {}}) == {
        "a.b.c": 1,
        "a.d": [],
        "e": {},
    }
    long = tracking.param_value("x" * 7000)
    assert len(long) == tracking.PARAM_VALUE_MAX and long.endswith("[truncated, 7000 chars]")


def test_stages_of_one_session_nest_under_one_parent(client: MlflowClient, root: Path) -> None:
    params = {"sampling": {"temperature": 0.7, "top_p": None}, "k": 3, "long": "y" * 7000}
    params |= {f"many.p{i}": i for i in range(150)}  # more than one 100-param batch
    with tracking.stage_run("spec_k", "k3", params, device="cuda") as first:
        pass
    with tracking.stage_run("baseline", "greedy", {"k": 0}) as second:
        pass
    parent = parent_of(client, first.run_id)
    assert parent.info.run_id == parent_of(client, second.run_id).info.run_id
    assert parent.info.status == "RUNNING"
    assert parent.data.tags["lab.role"] == "session"

    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.info.run_name == "spec_k/k3"
    tags = run.data.tags
    assert (tags["stage"], tags["item"], tags["device"]) == ("spec_k", "k3", "cuda")
    assert tags["pid"] == str(os.getpid()) and tags["host"] == socket.gethostname()
    assert tags["lab.session"] == os.environ["LAB_SESSION"]
    for key in ("dvc.exp_name", "dvc.baseline_rev", "git.commit", "version.torch"):
        assert tags[key]
    assert tags["version.mlflow"][0].isdigit()

    logged = run.data.params
    assert logged["sampling.temperature"] == "0.7" and logged["sampling.top_p"] == "None"
    assert logged["many.p149"] == "149" and len(logged) == 154
    assert logged["long"].endswith("[truncated, 7000 chars]")
    expected = (root / "mlartifacts" / os.environ["LAB_MLFLOW_EXPERIMENT"]).as_uri()
    assert client.get_experiment(run.info.experiment_id).artifact_location == expected


def test_dvc_experiment_env_defines_the_session(
    client: MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("LAB_SESSION")
    monkeypatch.setenv("DVC_EXP_NAME", "quick-fox")
    monkeypatch.setenv("DVC_EXP_BASELINE_REV", "abc123")
    with tracking.stage_run("a", "1", {}) as first:
        pass
    with tracking.stage_run("b", "1", {}) as second:
        pass
    parent = parent_of(client, first.run_id)
    assert parent.info.run_id == parent_of(client, second.run_id).info.run_id
    assert parent.data.tags["lab.session"] == "exp:quick-fox:abc123"
    assert client.get_run(first.run_id).data.tags["dvc.exp_name"] == "quick-fox"


def test_step_prompt_and_summary_metrics(client: MlflowClient, tmp_path: Path) -> None:
    # 5 prompts x 500 steps, numbered across prompts as the stage numbers them.
    rows = [
        {"global_step": i, "prompt_index": i // 500, "step": i % 500, "draft_ms": 1.5 + i % 3,
         "accepted": i % 4, "k": 0, "peak_cuda_mb": float("nan")}
        for i in range(2500)
    ]  # fmt: skip
    figure = tmp_path / "figure.png"
    figure.write_bytes(b"png")
    (tmp_path / "tables").mkdir()
    (tmp_path / "tables" / "t.md").write_text("| a |\n")
    start = time.perf_counter()
    with tracking.stage_run("spec_k", "k4", {}) as run:
        run.log_steps(rows, step_key="global_step")
        run.log_prompt_metrics(
            [{"tokens_per_s": 10.0 + i, "stop_reason": "eos", "x": None, "repetition": 0,
              "question_id": i, "peak_cuda_mb": float("nan"), "new_tokens": 32} for i in range(3)]
        )  # fmt: skip
        run.log_metrics({"speedup": 1.8, "lossless": True, "note": "text", "missing": None})
        run.log_artifacts([figure, tmp_path / "tables"], artifact_path="report")
    elapsed = time.perf_counter() - start
    assert elapsed < 20, f"logging 12500 step metrics took {elapsed:.1f} s"

    history = client.get_metric_history(run.run_id, "step.draft_ms")
    assert len(history) == 2500
    assert sorted(m.step for m in history) == list(range(2500))
    assert {m.step: m.value for m in history}[2] == 3.5
    tokens_per_s = client.get_metric_history(run.run_id, "prompt.tokens_per_s")
    assert [(m.step, m.value) for m in tokens_per_s] == [(0, 10.0), (1, 11.0), (2, 12.0)]
    metrics = client.get_run(run.run_id).data.metrics
    assert metrics["speedup"] == 1.8 and metrics["lossless"] == 1.0
    assert (
        "note" not in metrics and "missing" not in metrics and "prompt.stop_reason" not in metrics
    )
    # Only series that say something: no index, no constant, no NaN (all three are in the rows).
    assert set(metrics) == {
        "step.draft_ms", "step.accepted", "prompt.tokens_per_s", "speedup", "lossless"
    }  # fmt: skip
    tags = client.get_run(run.run_id).data.tags
    assert tags["lab.constant_series"] == "prompt.new_tokens=32, step.k=0"
    listed = {a.path for a in client.list_artifacts(run.run_id, "report")}
    assert listed == {"report/figure.png", "report/tables"}


def test_exception_ends_failed_and_reraises(client: MlflowClient) -> None:
    with pytest.raises(ValueError, match="boom"), tracking.stage_run("s", "i", {}) as run:
        run.log_steps([{"step": 0, "draft_ms": 1.0}])
        raise ValueError("boom")
    assert client.get_run(run.run_id).info.status == "FAILED"
    # The partial history of the failed run is kept.
    assert len(client.get_metric_history(run.run_id, "step.draft_ms")) == 1


def test_interrupt_and_sigterm_end_killed(client: MlflowClient) -> None:
    with pytest.raises(KeyboardInterrupt), tracking.stage_run("s", "ctrl-c", {}) as interrupted:
        raise KeyboardInterrupt
    previous = signal.getsignal(signal.SIGTERM)
    with (
        pytest.raises(tracking.StageTerminated),
        tracking.stage_run("s", "sigterm", {}) as terminated,
    ):
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises long before this ends
    assert signal.getsignal(signal.SIGTERM) == previous
    assert client.get_run(interrupted.run_id).info.status == "KILLED"
    assert client.get_run(terminated.run_id).info.status == "KILLED"


def test_finish_session_ends_the_parent(client: MlflowClient) -> None:
    with tracking.stage_run("s", "i", {}) as run:
        pass
    tracking.finish_session()
    assert parent_of(client, run.run_id).info.status == "FINISHED"
    # The next stage of the same session key starts a new parent rather than reopening one.
    with tracking.stage_run("s", "j", {}) as later:
        pass
    assert parent_of(client, later.run_id).info.run_id != parent_of(client, run.run_id).info.run_id


def test_mark_stale_runs_fails_runs_of_dead_processes(client: MlflowClient) -> None:
    with tracking.stage_run("s", "alive", {}) as alive:  # also creates the experiment
        pass
    experiment_id = client.get_run(alive.run_id).info.experiment_id
    host = socket.gethostname()
    gone = client.create_run(experiment_id, tags={"host": host, "pid": dead_pid()})
    running = client.create_run(experiment_id, tags={"host": host, "pid": str(os.getpid())})
    assert tracking.mark_stale_runs() == 1
    assert client.get_run(gone.info.run_id).info.status == "FAILED"
    assert "is gone" in client.get_run(gone.info.run_id).data.tags["lab.stale_reason"]
    assert client.get_run(running.info.run_id).info.status == "RUNNING"
    # Old runs with no process to check go by age; the session parent has no pid. Its one stage
    # run finished, so it ends FINISHED.
    assert tracking.mark_stale_runs(max_age_hours=0) >= 1
    assert parent_of(client, alive.run_id).info.status == "FINISHED"
    assert client.get_run(running.info.run_id).info.status == "RUNNING"


def test_partial_run_parent_ends_finished_when_dvc_is_gone(
    client: MlflowClient, dvc: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    # `dvc repro ksweep`: two stages, no report stage to call finish_session.
    with tracking.stage_run("baseline", "target", {}) as first:
        pass
    with tracking.stage_run("ksweep", "k2", {}) as second:
        pass
    parent = parent_of(client, second.run_id)
    assert parent.info.run_id == parent_of(client, first.run_id).info.run_id
    assert parent.data.tags["pid"] == str(dvc.pid)
    assert parent.info.status == "RUNNING"  # dvc still runs: another stage may come
    assert tracking.mark_stale_runs() == 0
    later = next_session(dvc, monkeypatch)
    ended = client.get_run(parent.info.run_id)
    assert ended.info.status == "FINISHED"
    assert ended.info.end_time == client.get_run(second.run_id).info.end_time
    assert f"process {dvc.pid}" in ended.data.tags["lab.stale_reason"]
    assert parent_of(client, later).info.run_id != parent.info.run_id


def test_parent_of_a_failed_stage_ends_failed_when_dvc_is_gone(
    client: MlflowClient, dvc: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    with tracking.stage_run("baseline", "target", {}) as first:
        pass
    with pytest.raises(ValueError), tracking.stage_run("ksweep", "k2", {}) as failed:
        raise ValueError("boom")
    next_session(dvc, monkeypatch)
    ended = parent_of(client, first.run_id)
    assert ended.info.status == "FAILED"
    assert ended.info.end_time == client.get_run(failed.run_id).info.end_time


def test_parent_of_a_sigkilled_stage_ends_failed_when_dvc_is_gone(
    client: MlflowClient, dvc: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    with tracking.stage_run("baseline", "target", {}) as first:
        pass
    parent = parent_of(client, first.run_id)
    # A stage killed by SIGKILL leaves its run RUNNING, tagged with its dead pid.
    tags = {
        "host": socket.gethostname(),
        "pid": dead_pid(),
        "mlflow.parentRunId": parent.info.run_id,
    }
    killed = client.create_run(parent.info.experiment_id, tags=tags).info.run_id
    next_session(dvc, monkeypatch)
    assert client.get_run(killed).info.status == "FAILED"
    assert client.get_run(parent.info.run_id).info.status == "FAILED"


def test_full_session_ends_by_its_final_stage(
    client: MlflowClient, dvc: subprocess.Popen[bytes], monkeypatch: pytest.MonkeyPatch
) -> None:
    with tracking.stage_run("baseline", "target", {}) as run:
        pass
    with tracking.final_stage():
        pass
    parent = parent_of(client, run.run_id)
    assert parent.info.status == "FINISHED"
    assert parent.info.end_time >= client.get_run(run.run_id).info.end_time
    assert "lab.stale_reason" not in parent.data.tags
    next_session(dvc, monkeypatch)
    assert client.get_run(parent.info.run_id).data.tags.get("lab.stale_reason") is None


def test_final_stage_that_raises_or_follows_a_failed_stage_ends_failed(
    client: MlflowClient,
) -> None:
    with tracking.stage_run("baseline", "target", {}) as run:
        pass
    with pytest.raises(RuntimeError), tracking.final_stage():
        raise RuntimeError("report broke")
    assert parent_of(client, run.run_id).info.status == "FAILED"
    # A new parent under the same key: a failed stage item fails it although the report ran.
    with pytest.raises(ValueError), tracking.stage_run("ksweep", "k2", {}) as failed:
        raise ValueError("boom")
    assert parent_of(client, failed.run_id).info.run_id != parent_of(client, run.run_id).info.run_id
    tracking.finish_session()
    assert parent_of(client, failed.run_id).info.status == "FAILED"
    with pytest.raises(ValueError, match="'RUNNING'.*FINISHED, FAILED, KILLED"):
        tracking.finish_session("RUNNING")


def test_stage_run_by_hand_ends_its_parent_at_exit(
    client: MlflowClient, monkeypatch: pytest.MonkeyPatch
) -> None:
    # No dvc and no LAB_SESSION: this process owns the parent; atexit ends it.
    monkeypatch.delenv("LAB_SESSION")
    monkeypatch.setattr(tracking, "_dvc_process", lambda: None)
    monkeypatch.setattr(tracking, "_owned_parents", [])
    at_exit: list[tuple[object, ...]] = []
    monkeypatch.setattr(tracking.atexit, "register", lambda *call: at_exit.append(call))
    with tracking.stage_run("baseline", "target", {}) as first:
        pass
    with pytest.raises(ValueError), tracking.stage_run("ksweep", "k2", {}) as second:
        raise ValueError("boom")
    parent = parent_of(client, first.run_id)
    assert parent.info.run_id == parent_of(client, second.run_id).info.run_id
    assert parent.info.status == "RUNNING" and len(at_exit) == 1
    end_owned_parents, *args = at_exit[0]
    end_owned_parents(*args)  # type: ignore[operator]
    assert client.get_run(parent.info.run_id).info.status == "FAILED"


def test_parent_carries_each_configurations_headline_numbers(client: MlflowClient) -> None:
    with tracking.stage_run("baseline", "target", {}) as base:
        base.log_metrics({"speedup": 1.01, "speedup_ci_low": 0.97, "mean_accepted_length": 1.0,
                          "acceptance_rate": None, "peak_cuda_mb": float("nan")})  # fmt: skip
    parent = parent_of(client, base.run_id)
    metrics = parent.data.metrics
    # The A/A "speed-up" is the noise floor, never the parent's best configuration.
    assert metrics["baseline.target.speedup"] == 1.01 and metrics["noise_floor"] == 1.01
    assert metrics["noise_floor_ci_low"] == 0.97 and "speedup" not in metrics
    assert not any("peak_cuda_mb" in key or "acceptance_rate" in key for key in metrics)
    for item, speedup in (("k2", 0.9), ("k4", 1.3), ("k6", 1.1)):
        with tracking.stage_run("ksweep", item, {}) as run:
            run.log_metrics({"speedup": speedup, "acceptance_rate": speedup / 2,
                             "mean_accepted_length": 2 * speedup, "ttft_ms": 5.0})  # fmt: skip
    with tracking.stage_run("distill", "target", {}) as distill:
        distill.log_metrics({"tokens_per_s": 99.0})  # no tau: not a decoding configuration
    with tracking.stage_run("perplexity", "all", {}) as ppl:
        ppl.log_metrics({"ksweep.k4.output_ppl": 1.2, "corpus_ppl.target": 5.0})
    parent = client.get_run(parent.info.run_id)
    metrics = parent.data.metrics
    assert metrics["ksweep.k2.speedup"] == 0.9 and metrics["ksweep.k6.acceptance_rate"] == 0.55
    assert metrics["ksweep.k4.output_ppl"] == 1.2
    assert "ksweep.k4.ttft_ms" not in metrics and "distill.target.tokens_per_s" not in metrics
    assert "corpus_ppl.target" not in metrics
    # Top level: the fastest configuration so far, under the names the children use.
    assert (metrics["speedup"], metrics["acceptance_rate"], metrics["mean_accepted_length"]) == (
        1.3, 0.65, 2.6
    )  # fmt: skip
    assert parent.data.tags["best_config"] == "ksweep/k4"


def test_experiment_opens_in_the_training_view_with_headline_columns(
    client: MlflowClient,
) -> None:
    experiment = client.get_experiment(tracking.repo_experiment_id())
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
    view = json.loads(experiment.tags["mlflow.sharedViewState.lab"])
    assert view["selectedColumns"][:3] == [
        "metrics.`speedup`", "metrics.`speedup_ci_low`", "metrics.`speedup_ci_high`"
    ]  # fmt: skip
    assert "metrics.`acceptance_rate`" in view["selectedColumns"]
    assert "metrics.`mean_accepted_length`" in view["selectedColumns"]
    url = tracking.ui_url(experiment.experiment_id, 5001)
    assert url.startswith(f"http://127.0.0.1:5001/#/experiments/{experiment.experiment_id}/runs?")
    assert "viewStateShareKey=lab" in url and "workflowType=machine_learning" in url
    # An experiment made before these tags existed gets them on its next use.
    client.delete_experiment_tag(experiment.experiment_id, "mlflow.experimentKind")
    tracking.repo_experiment_id()
    experiment = client.get_experiment(experiment.experiment_id)
    assert experiment.tags["mlflow.experimentKind"] == "custom_model_development"
