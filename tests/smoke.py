"""A fresh copy of the project on tiny random models, for tests that run DVC end to end."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

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


def smoke_params(params: dict, overrides: dict | None = None) -> dict:
    """params.yaml of the repo with the smoke profile (then overrides, by section) laid over it."""
    for layer in (SMOKE, overrides or {}):
        for section, values in layer.items():
            params[section].update(values)
    return params


def run(
    cmd: list[str], cwd: Path, env: dict[str, str], check: bool = True
) -> subprocess.CompletedProcess[str]:
    """Run a command; on failure (when checked) fail with the end of its output."""
    result = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True)
    if check:
        assert result.returncode == 0, (
            f"{cmd} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
        )
    return result


def make_repo(path: Path, experiment: str, overrides: dict | None = None) -> dict[str, str]:
    """Copy the project's files (not results) into path with smoke params; git + DVC ready."""
    listed = subprocess.run(["git", "ls-files", "-co", "--exclude-standard"], cwd=ROOT,
                            check=True, capture_output=True, text=True).stdout  # fmt: skip
    for name in listed.splitlines():
        if (ROOT / name).is_file() and not name.startswith(
            ("experiments/", "reports/", "dvc.lock")
        ):
            (path / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy(ROOT / name, path / name)
    params = smoke_params(yaml.safe_load((path / "params.yaml").read_text()), overrides)
    (path / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}",
           "LAB_MLFLOW_EXPERIMENT": experiment}  # fmt: skip
    env.pop("MLFLOW_TRACKING_URI", None)
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "smoke"],
    ):
        run(cmd, path, env)  # fmt: skip
    return env
