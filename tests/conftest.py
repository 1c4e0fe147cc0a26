"""Shared fixtures: tiny random models of real architectures and the smoke pipeline, built once."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lab import models
from tests.smoke import Repo, copy_repo, make_repo, run

# Tiny models gain nothing from a second thread, and OpenMP hand-offs cost more than they save.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def llama() -> models.LoadedModel:
    return models.load("tiny-random-llama", device="cpu")


@pytest.fixture(scope="session")
def llama_draft() -> models.LoadedModel:
    return models.load("tiny-random-llama-draft", device="cpu")


@pytest.fixture(scope="session")
def qwen2() -> models.LoadedModel:
    return models.load("tiny-random-qwen2", device="cpu")


@pytest.fixture(scope="session")
def qwen2_draft() -> models.LoadedModel:
    return models.load("tiny-random-qwen2-draft", device="cpu")


@pytest.fixture(scope="session")
def prompt_ids(llama: models.LoadedModel) -> list[int]:
    return llama.tokenizer.encode("def fibonacci(n):\n    if n < 2:\n        return n\n")


@pytest.fixture(scope="session")
def smoke(tmp_path_factory: pytest.TempPathFactory) -> Repo:
    """The project with the smoke params after one full `dvc repro`: shared, so never changed."""
    repo = make_repo(tmp_path_factory.mktemp("smoke"), "smoke")
    run(["dvc", "repro"], repo.path, repo.env)
    return repo


@pytest.fixture
def smoke_copy(smoke: Repo, tmp_path: Path) -> Repo:
    """A private copy of the reproduced smoke repo, for a test that edits, re-runs or kills."""
    return copy_repo(smoke, tmp_path / "repo")
