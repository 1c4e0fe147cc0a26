"""A fresh copy of the project on tiny random models, for tests that run DVC end to end."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import Any, NamedTuple

import yaml

ROOT = Path(__file__).resolve().parents[1]
# Every stage item of the real pipeline runs, on less data: the tests need each configuration's
# code path, not its numbers, and every item is a process that loads torch.
SMOKE = {
    "models": {"target": "tiny-random-qwen2", "draft": "tiny-random-qwen2-draft",
               "scorer": "tiny-random-qwen2", "device": "cpu", "dtype": "float32"},
    "prompts": {"per_category": 1},
    "generation": {"max_new_tokens": 12},
    "ksweep": {"ks": [1, 2, 4]},
    # a lossy policy beside exact: the report's perplexity column for lossy methods needs one
    "policies": {"names": ["exact", "typical"]},
    "distill": {"per_category": 2, "max_new_tokens": 24, "corpus_tokens": 1024,
                "sequence_tokens": 128},
    "heads": {"eagle": {"intermediate_size": 64, "epochs": 4}},
    "perplexity": {"window": 128, "stride": 64, "corpus_chars": 2000},
}  # fmt: skip
# Committed inputs the pipeline reads but never writes (the report shows the GPU results).
INPUTS = ("experiments/gpu/", "experiments/engine/")


class Repo(NamedTuple):
    """A project copy and the environment its commands run in."""

    path: Path
    env: dict[str, str]


def smoke_params(params: dict, overrides: dict | None = None) -> dict:
    """params.yaml of the repo with the smoke profile (then overrides) merged into it."""
    for layer in (SMOKE, overrides or {}):
        _merge(params, layer)
    return params


def _merge(base: dict[str, Any], layer: dict[str, Any]) -> None:
    """Lay layer over base, key by key at every depth: a nested override keeps its siblings."""
    for key, value in layer.items():
        if isinstance(value, dict) and isinstance(base.get(key), dict):
            _merge(base[key], value)
        else:
            base[key] = value


def run(
    cmd: list[str], cwd: Path, env: dict[str, str], check: bool = True, timeout: float = 900
) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure (when checked) fail with the end of its output."""
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    if check:
        assert result.returncode == 0, (
            f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


def make_repo(path: Path, experiment: str, overrides: dict | None = None) -> Repo:
    """Copy the project's files (not results) into path with smoke params; git + DVC ready."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout  # fmt: skip
    for name in listed.splitlines():
        results = name.startswith(("experiments/", "reports/", "dvc.lock", "metrics.json"))
        if (ROOT / name).is_file() and (not results or name.startswith(INPUTS)):
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, path / name)
    params = smoke_params(yaml.safe_load((path / "params.yaml").read_text()), overrides)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    # One torch thread per stage, as in the test process (conftest): tiny models gain nothing from
    # a second, and the other core stays free for the linters `make test` runs alongside.
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "LAB_MLFLOW_EXPERIMENT": experiment, "OMP_NUM_THREADS": "1"}  # fmt: skip
    env.pop("MLFLOW_TRACKING_URI", None)
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "smoke"],
    ):
        run(cmd, path, env)  # fmt: skip
    return Repo(path, env)


def copy_repo(repo: Repo, path: Path) -> Repo:
    """A copy of a reproduced repo (git, results, DVC cache, MLflow) that shares nothing with it."""
    # .dvc/tmp holds the original's locks, queue and path-keyed state: the copy starts without.
    shutil.copytree(repo.path, path, symlinks=True, ignore=_dvc_tmp)
    # MLflow stores absolute artifact locations: point the copy's runs at its own mlartifacts/.
    old, new = repo.path.as_uri() + "/", path.as_uri() + "/"
    with sqlite3.connect(path / "mlflow.db") as db:
        db.execute("UPDATE experiments SET artifact_location = replace(artifact_location, ?, ?)",
                   (old, new))  # fmt: skip
        db.execute("UPDATE runs SET artifact_uri = replace(artifact_uri, ?, ?)", (old, new))
    db.close()
    return Repo(path, repo.env)


def _dvc_tmp(folder: str, names: list[str]) -> list[str]:
    """copytree's ignore: .dvc/tmp, and nothing else."""
    return ["tmp"] if Path(folder).name == ".dvc" else []


def copy_project(path: Path) -> None:
    """The project's tracked (and new, unignored) files, committed results included, into path."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout  # fmt: skip
    for name in listed.splitlines():
        if (ROOT / name).is_file():
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, path / name)
