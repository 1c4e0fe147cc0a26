"""MLflow mirror of DVC stages: one parent run per pipeline run, one nested run per stage item."""

from __future__ import annotations

import os

# MLflow decides on telemetry when it is imported, so the default must be set before that.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import atexit  # noqa: E402
import importlib.metadata  # noqa: E402
import numbers  # noqa: E402
import re  # noqa: E402
import signal  # noqa: E402
import socket  # noqa: E402
import subprocess  # noqa: E402
import threading  # noqa: E402
import time  # noqa: E402
from collections.abc import Iterable, Iterator, Mapping, Sequence  # noqa: E402
from contextlib import contextmanager  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from pathlib import Path  # noqa: E402
from types import FrameType  # noqa: E402
from typing import Any  # noqa: E402

import psutil  # noqa: E402
from mlflow.entities import Metric, Param, Run, ViewType  # noqa: E402
from mlflow.exceptions import MlflowException  # noqa: E402
from mlflow.protos.databricks_pb2 import RESOURCE_ALREADY_EXISTS, ErrorCode  # noqa: E402
from mlflow.tracking import MlflowClient  # noqa: E402

# MLflow's per-request limits (mlflow.utils.validation); exceeding them raises.
METRICS_PER_BATCH = 1000
PARAMS_PER_BATCH = 100
PARAM_VALUE_MAX = 6000

SESSION_TAG = "lab.session"
ROLE_TAG = "lab.role"  # "session" for the parent run, "stage" for a stage item
PARENT_TAG = "mlflow.parentRunId"  # the tag MLflow's UI nests runs by
LIBRARIES = ("torch", "transformers", "mlflow", "dvc")
STALE_AFTER_HOURS = 48.0
ENDED = ("FINISHED", "FAILED", "KILLED")  # the statuses a run can end with

_SESSION_KEY = re.compile(r"^[\w.:/@+-]+$")


class StageTerminated(BaseException):
    """SIGTERM turned into an exception, so `finally` blocks run and the run ends KILLED."""


def repo_root() -> Path:
    """The real repo root: $DVC_ROOT (also set in `dvc exp run --temp/--queue`), git, or cwd."""
    if root := os.environ.get("DVC_ROOT"):
        return Path(root).resolve()
    top = _git("rev-parse", "--show-toplevel")
    return Path(top).resolve() if top else Path.cwd().resolve()


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI (a team server) or the sqlite file at the repo root."""
    return os.environ.get("MLFLOW_TRACKING_URI") or f"sqlite:///{repo_root() / 'mlflow.db'}"


def experiment_name() -> str:
    """$LAB_MLFLOW_EXPERIMENT or "lab"."""
    return os.environ.get("LAB_MLFLOW_EXPERIMENT") or "lab"


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings to one level with dotted keys: {"a": {"b": 1}} -> {"a.b": 1}."""
    flat: dict[str, Any] = {}
    for key, value in params.items():
        name = f"{prefix}{key}"
        if isinstance(value, Mapping) and value:
            flat.update(flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def param_value(value: Any) -> str:
    """str(value), cut to MLflow's 6000-character limit with a note saying so."""
    text = str(value)
    if len(text) <= PARAM_VALUE_MAX:
        return text
    note = f"...[truncated, {len(text)} chars]"
    return text[: PARAM_VALUE_MAX - len(note)] + note


@dataclass
class StageRun:
    """A live child run; metrics are buffered and sent with log_batch."""

    client: MlflowClient
    run_id: str
    _buffer: list[Metric] = field(default_factory=list)

    def log_steps(self, rows: Iterable[Mapping[str, float | int]], step_key: str = "step") -> None:
        """Every numeric field but step_key as `step.<name>` at step=row[step_key]."""
        now = _now_ms()
        for row in rows:
            step = int(row[step_key])
            for name, value in row.items():
                if name != step_key and (number := _number(value)) is not None:
                    self._add(Metric(f"step.{name}", number, now, step))

    def log_prompt_metrics(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Numeric fields of each prompt's summary as `prompt.<name>` at step=prompt index."""
        now = _now_ms()
        for index, row in enumerate(rows):
            for name, value in row.items():
                if (number := _number(value)) is not None:
                    self._add(Metric(f"prompt.{name}", number, now, index))

    def log_metrics(self, metrics: Mapping[str, Any]) -> None:
        """Summary metrics at step 0; None and strings are skipped, bools become 0/1."""
        now = _now_ms()
        for name, value in metrics.items():
            if (number := _number(value)) is not None:
                self._add(Metric(name, number, now, 0))

    def log_artifacts(self, paths: Iterable[Path], artifact_path: str | None = None) -> None:
        """Upload files, and directories under their own name, below artifact_path."""
        for path in map(Path, paths):
            if path.is_dir():
                sub = f"{artifact_path}/{path.name}" if artifact_path else path.name
                self.client.log_artifacts(self.run_id, str(path), sub)
            elif path.is_file():
                self.client.log_artifact(self.run_id, str(path), artifact_path)
            else:
                raise FileNotFoundError(f"artifact {path} does not exist")

    def flush(self) -> None:
        """Send buffered metrics in batches of at most 1000."""
        while self._buffer:
            batch = self._buffer[:METRICS_PER_BATCH]
            self.client.log_batch(self.run_id, metrics=batch, synchronous=True)
            del self._buffer[:METRICS_PER_BATCH]

    def _add(self, metric: Metric) -> None:
        self._buffer.append(metric)
        if len(self._buffer) >= METRICS_PER_BATCH:
            self.flush()


@contextmanager
def stage_run(
    stage: str, item: str, params: dict[str, Any], device: str = "cpu"
) -> Iterator[StageRun]:
    """A nested MLflow run for one stage item; ends FINISHED, FAILED or KILLED."""
    # A stage killed by SIGKILL could not end its run: close such leftovers before starting.
    mark_stale_runs()
    client = MlflowClient(tracking_uri())
    experiment_id = _experiment_id(client)
    session = _session()
    parent_id = _find_or_create_parent(client, experiment_id, session)
    tags = {
        **_context_tags(),
        **_process_tags(psutil.Process()),
        SESSION_TAG: session.key,
        ROLE_TAG: "stage",
        PARENT_TAG: parent_id,
        "stage": stage,
        "item": item,
        "device": device,
    }
    run_id = client.create_run(experiment_id, tags=tags, run_name=f"{stage}/{item}").info.run_id
    run = StageRun(client, run_id)
    status = "FAILED"
    previous = _install_sigterm()
    try:
        _log_params(client, run_id, params)
        yield run
        run.flush()
        status = "FINISHED"
    except (KeyboardInterrupt, StageTerminated):
        status = "KILLED"
        raise
    except SystemExit as exit_:
        status = "FINISHED" if exit_.code in (0, None) else "FAILED"
        raise
    finally:
        _restore_sigterm(previous)
        try:
            run.flush()  # a no-op after a clean exit; keeps a failed run's partial history
        finally:
            client.set_terminated(run_id, status)


def finish_session(status: str = "FINISHED") -> None:
    """End this session's parent run(s) now: `status`, or FAILED if a stage item did not finish."""
    if status not in ENDED:
        raise ValueError(f"finish_session(status={status!r}): use one of {', '.join(ENDED)}")
    client = MlflowClient(tracking_uri())
    experiment_id = _experiment_id(client)
    for run in _session_parents(client, experiment_id, _session().key):
        final = _outcome(_children(client, run)) if status == "FINISHED" else status
        client.set_terminated(run.info.run_id, final)


@contextmanager
def final_stage() -> Iterator[None]:
    """Wrap the pipeline's last stage (`report`), then end the session: FAILED if it raised."""
    status = "FAILED"
    try:
        yield
        status = "FINISHED"
    finally:
        finish_session(status)


def mark_stale_runs(max_age_hours: float = STALE_AFTER_HOURS) -> int:
    """End RUNNING runs whose process on this host is gone, or that are too old; returns how many.

    A stage item ends FAILED; a session's parent ends as its children came out (see _end_stale).
    """
    client = MlflowClient(tracking_uri())
    experiment_id = _experiment_id(client)
    cutoff_ms = _now_ms() - int(max_age_hours * 3600 * 1000)
    marked = 0
    for run in _search(client, experiment_id, "attributes.status = 'RUNNING'"):
        reason = _stale_reason(run, cutoff_ms)
        if reason:
            _end_stale(client, run, reason)
            marked += 1
    return marked


# --- sessions: how the separate processes of one `dvc repro` find their shared parent run ---
# Each DVC stage is its own process, so the parent run is found by a tag, `lab.session`, on a
# RUNNING run with `lab.role=session`. Searching only RUNNING parents means a session key that
# comes back later (the same LAB_SESSION, a rerun of an experiment name) starts a new parent
# once finish_session() or mark_stale_runs() has closed the old one.
#
# Ending the parent: no stage knows it is the last of its session (`dvc repro <stage>` and
# `dvc exp run <targets>` never reach `report`, which calls finish_session). Closing the parent
# after every stage and reopening it for the next would make it flip FINISHED/RUNNING and would
# let a recurring session key reopen a closed parent. So a session is over when its owner (the
# `dvc` process) is gone: the next stage's mark_stale_runs() ends such a parent by its children,
# FINISHED if every one finished and FAILED otherwise, at the time the last one ended.


@dataclass(frozen=True)
class _Session:
    key: str
    name: str
    owner: psutil.Process | None  # the process whose exit ends the session, if one is known


def _session() -> _Session:
    """$LAB_SESSION, else the DVC experiment, else the `dvc` process (or this one) by pid."""
    if key := os.environ.get("LAB_SESSION"):
        if not _SESSION_KEY.match(key):
            raise ValueError(f"LAB_SESSION={key!r}: use letters, digits and . : / @ + - _ only")
        return _Session(key, key, None)
    dvc = _dvc_process()
    if exp := os.environ.get("DVC_EXP_NAME"):
        baseline = os.environ.get("DVC_EXP_BASELINE_REV", "")
        return _Session(_clean(f"exp:{exp}:{baseline}"), exp, dvc)
    # Stages of one `dvc repro` are children of one dvc process; pid + start time is unique.
    owner = dvc or psutil.Process()
    kind = "dvc" if dvc else "proc"
    commit = _git_commit()
    key = f"{kind}:{commit}:{socket.gethostname()}:{owner.pid}:{owner.create_time():.3f}"
    return _Session(_clean(key), f"{kind} {commit[:8]}", owner)


def _dvc_process() -> psutil.Process | None:
    """The closest ancestor that is a `dvc` command (repro, exp run, exp exec-run)."""
    for proc in psutil.Process().parents():
        try:
            cmdline = proc.cmdline()
        except (psutil.AccessDenied, psutil.NoSuchProcess, psutil.ZombieProcess):
            continue
        if _is_dvc_command(cmdline):
            return proc
    return None


def _is_dvc_command(cmdline: list[str]) -> bool:
    """`dvc ...`, `python .../bin/dvc ...` or `python -m dvc ...`."""
    head = cmdline[:3]
    names = [Path(arg).name for arg in head]
    return any(name in ("dvc", "dvc.exe") for name in names) or head[1:3] == ["-m", "dvc"]


def _find_or_create_parent(client: MlflowClient, experiment_id: str, session: _Session) -> str:
    """The session's RUNNING parent run, created by whichever stage comes first."""
    found = _session_parents(client, experiment_id, session.key)
    if found:
        return found[0].info.run_id
    tags = {**_context_tags(), SESSION_TAG: session.key, ROLE_TAG: "session"}
    if session.owner is not None:
        tags.update(_process_tags(session.owner))
    created = client.create_run(experiment_id, tags=tags, run_name=session.name).info.run_id
    if session.owner is not None and session.owner.pid == os.getpid():
        _own_parent(client, created)
    # Two stages starting at once may both create one: the oldest wins, the other goes.
    winner = _session_parents(client, experiment_id, session.key)[0].info.run_id
    if winner != created:
        client.delete_run(created)
    return winner


def _session_parents(client: MlflowClient, experiment_id: str, key: str) -> list[Run]:
    """RUNNING parent runs tagged with this session key, oldest first."""
    query = (
        f"tags.`{SESSION_TAG}` = '{key}' and tags.`{ROLE_TAG}` = 'session'"
        " and attributes.status = 'RUNNING'"
    )
    return _search(client, experiment_id, query, order_by=["attributes.start_time ASC"])


def _outcome(children: Sequence[Run]) -> str:
    """FINISHED if there are stage runs and all finished; FAILED if any failed, was killed or
    still runs (its session is over, so a running child was cut off)."""
    finished = bool(children) and all(child.info.status == "FINISHED" for child in children)
    return "FINISHED" if finished else "FAILED"


def _children(client: MlflowClient, parent: Run) -> list[Run]:
    query = f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'"
    return _search(client, parent.info.experiment_id, query)


def _end_stale(client: MlflowClient, run: Run, reason: str) -> None:
    """A stale stage item ends FAILED; a stale parent by its children, when the last one ended."""
    client.set_tag(run.info.run_id, "lab.stale_reason", reason)
    if run.data.tags.get(ROLE_TAG) != "session":
        client.set_terminated(run.info.run_id, "FAILED")
        return
    children = _children(client, run)
    # A child still RUNNING has no end time yet: then the sweep's own time (None: now) stands.
    ends = [child.info.end_time for child in children]
    end_ms = max(ends) if ends and None not in ends else None
    client.set_terminated(run.info.run_id, _outcome(children), end_time=end_ms)


# A parent owned by this very process (a stage script run by hand) ends when the process does.
_owned_parents: list[str] = []


def _own_parent(client: MlflowClient, run_id: str) -> None:
    if not _owned_parents:
        atexit.register(_end_owned_parents, client)
    _owned_parents.append(run_id)


def _end_owned_parents(client: MlflowClient) -> None:
    for run_id in _owned_parents:
        children = _children(client, client.get_run(run_id))
        client.set_terminated(run_id, _outcome(children))
    _owned_parents.clear()


# --- helpers ---


def _experiment_id(client: MlflowClient) -> str:
    """Get or create the experiment, with artifacts under the repo root for local stores."""
    name = experiment_name()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=_artifact_location(name))
        except MlflowException as error:
            # Another stage process created it between our lookup and our create.
            if error.error_code != ErrorCode.Name(RESOURCE_ALREADY_EXISTS):
                raise
            experiment = client.get_experiment_by_name(name)
            assert experiment is not None
    if experiment.lifecycle_stage == "deleted":
        raise RuntimeError(
            f"MLflow experiment {name!r} is deleted: restore it (`mlflow experiments restore`)"
            " or set LAB_MLFLOW_EXPERIMENT to another name"
        )
    return str(experiment.experiment_id)


def _artifact_location(name: str) -> str | None:
    """`<root>/mlartifacts/<name>` for a local store; a server chooses its own."""
    uri = tracking_uri()
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        return (repo_root() / "mlartifacts" / name).as_uri()
    return None


def _log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    """Flattened params, at most 100 per log_batch call."""
    flat = [Param(key, param_value(value)) for key, value in flatten(params).items()]
    for start in range(0, len(flat), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=flat[start : start + PARAMS_PER_BATCH], synchronous=True)


def _context_tags() -> dict[str, str]:
    """Where and with what this ran: DVC experiment, commit, library versions."""
    tags = {
        "dvc.exp_name": os.environ.get("DVC_EXP_NAME", "none"),
        "dvc.baseline_rev": os.environ.get("DVC_EXP_BASELINE_REV", "none"),
        "dvc.stage": os.environ.get("DVC_STAGE", "none"),
        "git.commit": _git_commit(),
    }
    tags.update({f"version.{lib}": _version(lib) for lib in LIBRARIES})
    return tags


def _process_tags(proc: psutil.Process) -> dict[str, str]:
    """host, pid and the pid's start time, so a dead or reused pid can be told apart."""
    return {
        "host": socket.gethostname(),
        "pid": str(proc.pid),
        "pid.create_time": f"{proc.create_time():.3f}",
    }


def _stale_reason(run: Run, cutoff_ms: int) -> str | None:
    """Why a RUNNING run is stale, or None if it may still be alive."""
    tags = run.data.tags
    if tags.get("host") == socket.gethostname() and "pid" in tags:
        if not _alive(int(tags["pid"]), float(tags.get("pid.create_time", "0"))):
            return f"process {tags['pid']} on {tags['host']} is gone"
        return None  # alive on this host: however old, it is still running
    if run.info.start_time < cutoff_ms:
        return "RUNNING longer than the stale cutoff, process unknown"
    return None


def _alive(pid: int, create_time: float) -> bool:
    """Whether the pid still runs and is the same process (not a reused pid)."""
    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and (
            not create_time or abs(proc.create_time() - create_time) < 1.0
        )
    except psutil.NoSuchProcess:
        return False


def _search(
    client: MlflowClient, experiment_id: str, query: str, order_by: list[str] | None = None
) -> list[Run]:
    """All pages of a run search."""
    runs: list[Run] = []
    token: str | None = None
    while True:
        page = client.search_runs(
            [experiment_id], query, ViewType.ACTIVE_ONLY, 1000, order_by, token
        )
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _install_sigterm() -> Any:
    """Raise StageTerminated on SIGTERM (main thread only); returns the previous handler."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def _raise(signum: int, frame: FrameType | None) -> None:
        raise StageTerminated(f"signal {signum}")

    return signal.signal(signal.SIGTERM, _raise)


def _restore_sigterm(previous: Any) -> None:
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, signal.SIG_DFL if previous is None else previous)


def _number(value: Any) -> float | None:
    """A float for ints, floats, bools and numpy scalars; None for anything else."""
    return float(value) if isinstance(value, numbers.Real) else None


def _clean(key: str) -> str:
    """A session key safe inside an MLflow filter string."""
    return re.sub(r"[^\w.:/@+-]", "_", key)


def _git_commit() -> str:
    return _git("rev-parse", "HEAD") or "unknown"


def _git(*args: str) -> str | None:
    """Output of a git command in cwd, or None outside a repo or without git."""
    try:
        out = subprocess.run(["git", *args], capture_output=True, text=True, check=True)
    except (OSError, subprocess.CalledProcessError):
        return None
    return out.stdout.strip() or None


def _version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _now_ms() -> int:
    return int(time.time() * 1000)
