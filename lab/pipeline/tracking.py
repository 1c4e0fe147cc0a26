"""MLflow mirror of DVC stages: one parent run per pipeline run, one nested run per stage item."""

from __future__ import annotations

import os

# MLflow decides on telemetry when it is imported, so the default must be set before that.
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import atexit  # noqa: E402
import importlib.metadata  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
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

# Fields that number rows rather than measure anything: charted as metrics they are straight
# lines. They stay as the `step` axis and in the item's files (steps.csv, prompts.jsonl).
INDEX_FIELDS = frozenset({"step", "global_step", "prompt_index", "repetition", "question_id"})
CONSTANT_TAG = "lab.constant_series"  # series left out because every value was the same

# The numbers a reader scans: each configuration's are copied to the parent run as
# `<stage>.<item>.<name>`, and the runs list view shows the top-level ones first.
HEADLINE = ("speedup", "speedup_ci_low", "speedup_ci_high", "acceptance_rate",
            "mean_accepted_length", "tokens_per_s", "output_ppl")  # fmt: skip
BASELINE_STAGE = "baseline"  # its "speed-up" is the A/A noise floor, not a method's
BEST_TAG = "best_config"  # on the parent: the configuration its top-level metrics are from

# MLflow 3.x opens an experiment by its kind; "custom_model_development" is the classic
# (training) view. The UI of 3.17 also keys the view on its own workflow switch, which the
# `workflowType` URL parameter sets: see ui_url().
KIND_TAG = "mlflow.experimentKind"
KIND = "custom_model_development"
# A view the UI applies when the URL names it (?viewStateShareKey=lab): headline columns first.
VIEW_TAG_PREFIX = "mlflow.sharedViewState."
VIEW_KEY = "lab"
VIEW_METRICS = ("speedup", "speedup_ci_low", "speedup_ci_high", "acceptance_rate",
                "mean_accepted_length", "tokens_per_s", "noise_floor")  # fmt: skip


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
    parent_id: str | None = None  # the session's run, which gets this item's headline numbers
    stage: str = ""
    item: str = ""
    _buffer: list[Metric] = field(default_factory=list)
    _constant: dict[str, float] = field(default_factory=dict)

    def log_steps(self, rows: Iterable[Mapping[str, Any]], step_key: str = "step") -> None:
        """Each varying numeric field as `step.<name>` at step=row[step_key] (see _log_series)."""
        self._log_series("step", [(int(row[step_key]), row) for row in rows], {step_key})

    def log_prompt_metrics(self, rows: Sequence[Mapping[str, Any]]) -> None:
        """Each varying numeric field of the prompts' summaries as `prompt.<name>` at step=index."""
        self._log_series("prompt", list(enumerate(rows)), set())

    def log_metrics(self, metrics: Mapping[str, Any]) -> None:
        """Summary metrics at step 0, headline ones also on the parent; non-numbers, NaN skipped."""
        now = _now_ms()
        for name, value in metrics.items():
            if (number := _number(value)) is not None:
                self._add(Metric(name, number, now, 0))
        if self.parent_id is not None:
            log_headline(self.client, self.parent_id, self.stage, self.item, metrics)

    def _log_series(
        self, prefix: str, rows: list[tuple[int, Mapping[str, Any]]], skip: set[str]
    ) -> None:
        """Buffer the series of these rows but index fields, NaNs and constants (tagged instead).

        Constancy is judged within one call: a series logged one point per call always goes.
        """
        now = _now_ms()
        for name, points in _series(rows, INDEX_FIELDS | skip).items():
            key = f"{prefix}.{name}"
            if len(points) > 1 and all(value == points[0][1] for _, value in points):
                self._constant[key] = points[0][1]
                continue
            for step, value in points:
                self._add(Metric(key, value, now, step))
        if self._constant:
            listed = ", ".join(f"{key}={value:g}" for key, value in sorted(self._constant.items()))
            self.client.set_tag(self.run_id, CONSTANT_TAG, param_value(listed))

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
        **context_tags(),
        **_process_tags(psutil.Process()),
        SESSION_TAG: session.key,
        ROLE_TAG: "stage",
        PARENT_TAG: parent_id,
        "stage": stage,
        "item": item,
        "device": device,
    }
    run_id = client.create_run(experiment_id, tags=tags, run_name=f"{stage}/{item}").info.run_id
    run = StageRun(client, run_id, parent_id, stage, item)
    status = "FAILED"
    previous = _install_sigterm()
    try:
        log_params(client, run_id, params)
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
        final = _outcome(child_runs(client, run)) if status == "FINISHED" else status
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
    for run in search(client, experiment_id, "attributes.status = 'RUNNING'"):
        reason = _stale_reason(run, cutoff_ms)
        if reason:
            _end_stale(client, run, reason)
            marked += 1
    return marked


def log_headline(
    client: MlflowClient, parent_id: str, stage: str, item: str, metrics: Mapping[str, Any]
) -> None:
    """Copy a configuration's headline numbers to the parent as `<stage>.<item>.<name>`.

    Only a decoding configuration's (it has a tau: not distill's tokens/s); names that already
    carry their configuration (the perplexity stage's `ksweep.k4.output_ppl`) go as they are.
    Then the parent's top-level metrics are set again (_set_top_level).
    """
    now = _now_ms()
    decoding = "mean_accepted_length" in metrics
    logged: list[Metric] = []
    for name, value in metrics.items():
        number = _number(value)
        if number is None or name.rsplit(".", 1)[-1] not in HEADLINE:
            continue
        if not decoding and "." not in name:
            continue
        logged.append(Metric(name if "." in name else f"{stage}.{item}.{name}", number, now, 0))
        if stage == BASELINE_STAGE and name.startswith("speedup"):
            logged.append(Metric(name.replace("speedup", "noise_floor", 1), number, now, 0))
    if logged:
        client.log_batch(parent_id, metrics=logged, synchronous=True)
        _set_top_level(client, parent_id)


def _set_top_level(client: MlflowClient, parent_id: str) -> None:
    """The parent's `speedup`, `acceptance_rate`, ...: those of its fastest configuration so far.

    The runs list shows top-level names as columns, so a parent row reads like its best child;
    the `best_config` tag says which configuration that is. The baseline (A/A) is no candidate.
    """
    metrics = client.get_run(parent_id).data.metrics
    speedups = {
        key.removesuffix(".speedup"): value
        for key, value in metrics.items()
        if key.endswith(".speedup") and not key.startswith(f"{BASELINE_STAGE}.")
    }
    if not speedups:
        return
    best = max(speedups, key=lambda config: speedups[config])
    now = _now_ms()
    top = [Metric(name, metrics[f"{best}.{name}"], now, 0) for name in HEADLINE
           if f"{best}.{name}" in metrics]  # fmt: skip
    client.log_batch(parent_id, metrics=top, synchronous=True)
    client.set_tag(parent_id, BEST_TAG, best.replace(".", "/", 1))


def ui_url(experiment_id: str, port: int = 5000) -> str:
    """The experiment's page in the classic runs view, with the headline columns first."""
    query = f"viewStateShareKey={VIEW_KEY}&workflowType=machine_learning"
    return f"http://127.0.0.1:{port}/#/experiments/{experiment_id}/runs?{query}"


def repo_experiment_id() -> str:
    """This repo's experiment (created, and tagged for the UI, if need be)."""
    return _experiment_id(MlflowClient(tracking_uri()))


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
    tags = {**context_tags(), SESSION_TAG: session.key, ROLE_TAG: "session"}
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
    return search(client, experiment_id, query, order_by=["attributes.start_time ASC"])


def _outcome(children: Sequence[Run]) -> str:
    """FINISHED if there are stage runs and all finished; FAILED if any failed, was killed or
    still runs (its session is over, so a running child was cut off)."""
    finished = bool(children) and all(child.info.status == "FINISHED" for child in children)
    return "FINISHED" if finished else "FAILED"


def child_runs(client: MlflowClient, parent: Run) -> list[Run]:
    """The runs nested under a parent."""
    query = f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'"
    return search(client, parent.info.experiment_id, query)


def _end_stale(client: MlflowClient, run: Run, reason: str) -> None:
    """A stale stage item ends FAILED; a stale parent by its children, when the last one ended."""
    client.set_tag(run.info.run_id, "lab.stale_reason", reason)
    if run.data.tags.get(ROLE_TAG) != "session":
        client.set_terminated(run.info.run_id, "FAILED")
        return
    children = child_runs(client, run)
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
        children = child_runs(client, client.get_run(run_id))
        client.set_terminated(run_id, _outcome(children))
    _owned_parents.clear()


# --- helpers ---


def _experiment_id(client: MlflowClient) -> str:
    """Get or create the experiment, with artifacts under the repo root for local stores."""
    name = experiment_name()
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            location = _artifact_location(name)
            return client.create_experiment(name, location, tags=_experiment_tags())
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
    # Also for experiments made before these tags existed; set only when they differ.
    for key, value in _experiment_tags().items():
        if experiment.tags.get(key) != value:
            client.set_experiment_tag(experiment.experiment_id, key, value)
    return str(experiment.experiment_id)


def _experiment_tags() -> dict[str, str]:
    """The experiment's kind (the classic view) and the runs-list view that ui_url() opens."""
    columns = [f"metrics.`{name}`" for name in VIEW_METRICS] + [f"tags.`{BEST_TAG}`"]
    # The UI reads a shared view as JSON: runs-list state fields and search facets.
    view = {"selectedColumns": columns, "orderByKey": "attributes.start_time", "orderByAsc": False}
    return {KIND_TAG: KIND, f"{VIEW_TAG_PREFIX}{VIEW_KEY}": json.dumps(view)}


def _artifact_location(name: str) -> str | None:
    """`<root>/mlartifacts/<name>` for a local store; a server chooses its own."""
    uri = tracking_uri()
    if uri.startswith(("sqlite:", "file:")) or "://" not in uri:
        return (repo_root() / "mlartifacts" / name).as_uri()
    return None


def log_params(client: MlflowClient, run_id: str, params: Mapping[str, Any]) -> None:
    """Flattened params, at most 100 per log_batch call."""
    flat = [Param(key, param_value(value)) for key, value in flatten(params).items()]
    for start in range(0, len(flat), PARAMS_PER_BATCH):
        client.log_batch(run_id, params=flat[start : start + PARAMS_PER_BATCH], synchronous=True)


def context_tags() -> dict[str, str]:
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


def search(
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
    """A finite float for ints, floats, bools and numpy scalars; None for anything else."""
    if not isinstance(value, numbers.Real):
        return None
    number = float(value)
    return number if math.isfinite(number) else None  # NaN: e.g. peak_cuda_mb on a CPU


def _series(
    rows: Iterable[tuple[int, Mapping[str, Any]]], skip: Iterable[str]
) -> dict[str, list[tuple[int, float]]]:
    """Per field not in skip: its (step, number) points, numbers only, in row order."""
    skipped = set(skip)
    series: dict[str, list[tuple[int, float]]] = {}
    for step, row in rows:
        for name, value in row.items():
            if name not in skipped and (number := _number(value)) is not None:
                series.setdefault(name, []).append((step, number))
    return series


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
