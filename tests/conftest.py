"""Shared fixtures: tiny random models of real architectures and the smoke pipeline, built once.

The smoke `dvc repro` (a few minutes of stage processes) starts in the background at the session's
first test whenever a selected test needs it, and the tests that need it run last: the others run
meanwhile on the second core.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from lab import models
from tests.smoke import Repo, copy_repo, make_repo

# Tiny models gain nothing from a second thread, and OpenMP hand-offs cost more than they save.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def llama() -> models.LoadedModel:
    return models.load("tiny-random-llama", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def llama_draft() -> models.LoadedModel:
    return models.load("tiny-random-llama-draft", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def qwen2() -> models.LoadedModel:
    return models.load("tiny-random-qwen2", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def qwen2_draft() -> models.LoadedModel:
    return models.load("tiny-random-qwen2-draft", device="cpu", dtype="float32")


@pytest.fixture(scope="session")
def prompt_ids(llama: models.LoadedModel) -> list[int]:
    return llama.tokenizer.encode("def fibonacci(n):\n    if n < 2:\n        return n\n")


def _uses_smoke(item: pytest.Item) -> bool:
    return "smoke" in getattr(item, "fixturenames", ())


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Tests on the smoke pipeline last (otherwise in file order), so the rest overlap its build."""
    items.sort(key=_uses_smoke)


@dataclass
class _Build:
    repo: Repo
    process: subprocess.Popen[bytes]
    log: Path


@pytest.fixture(scope="session", autouse=True)
def _smoke_build(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[_Build | None]:
    """Start the smoke `dvc repro` now if a selected test needs it; stop it if the session ends."""
    if not any(_uses_smoke(item) for item in request.session.items):
        yield None
        return
    repo = make_repo(tmp_path_factory.mktemp("smoke"), "smoke")
    log = tmp_path_factory.mktemp("smoke-log") / "dvc-repro.log"
    with log.open("wb") as out:  # a file, not a pipe: nobody reads it while it runs
        process = subprocess.Popen(["dvc", "repro"], cwd=repo.path, env=repo.env, stdout=out,
                                   stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    yield _Build(repo, process, log)
    if process.poll() is None:  # e.g. -x stopped the session first: take its stage down too
        os.killpg(process.pid, signal.SIGKILL)
        process.wait()


@pytest.fixture(scope="session")
def smoke(_smoke_build: _Build | None) -> Repo:
    """The project with the smoke params after one full `dvc repro`: shared, so never changed."""
    assert _smoke_build is not None, "collection saw no test that uses the smoke fixture"
    returncode = _smoke_build.process.wait()
    tail = "\n".join(_smoke_build.log.read_text(errors="replace").splitlines()[-40:])
    assert returncode == 0, f"the smoke `dvc repro` failed; the end of its log:\n{tail}"
    return _smoke_build.repo


@pytest.fixture
def smoke_copy(smoke: Repo, tmp_path: Path) -> Repo:
    """A private copy of the reproduced smoke repo, for a test that edits, re-runs or kills."""
    return copy_repo(smoke, tmp_path / "repo")
