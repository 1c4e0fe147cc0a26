"""Shared fixtures: tiny random models of real architectures, built once per session."""

from __future__ import annotations

import pytest
import torch

from lab import models

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
