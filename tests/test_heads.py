"""Self-distillation data, head training (held-out loss falls), saving and loading."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from lab.drafting import distill, heads, training
from lab.drafting.eagle import EagleDrafter
from lab.drafting.medusa import MedusaDrafter
from lab.engine import loop
from lab.engine.controllers import FixedK
from lab.engine.loop import Speculation
from lab.engine.model import LoadedModel
from lab.engine.policies import get_policy
from lab.pipeline.params import EagleTraining, MedusaTraining
from lab.prompts import load_suite


@pytest.fixture(scope="module")
def data(qwen2: LoadedModel) -> distill.Distilled:
    return distill.distill(qwen2, load_suite("builtin-train", per_category=2), 24, batch_size=5)


@pytest.fixture(scope="module")
def trained(qwen2: LoadedModel, data: distill.Distilled) -> dict[str, training.Trained]:
    train, heldout = data.split(0.25)
    settings: dict[str, training.TrainingSettings] = {
        "medusa": MedusaTraining(num_heads=3, epochs=4, batch_size=32, lr=3e-3).settings(),
        "eagle": EagleTraining(intermediate_size=64, epochs=4, batch_size=2).settings(),
    }
    return {kind: training.train(qwen2, train, heldout, s, seed=0) for kind, s in settings.items()}


def test_distilled_text_is_the_targets_greedy_output(qwen2, data):
    prompts = load_suite("builtin-train", per_category=2)
    assert len(data) == len(prompts) == 12
    for i in (0, 7):
        prompt_len = data.prompt_lens[i]
        ids = data.tokens[i][:prompt_len].tolist()
        base = loop.generate(qwen2, ids, 24)
        assert data.tokens[i][prompt_len:].tolist() == base.token_ids
    pairs = zip(data.tokens, data.prompt_lens, strict=True)
    assert data.generated_tokens() == sum(len(tokens) - n for tokens, n in pairs)


def test_features_are_the_targets_last_hidden_states(qwen2, data):
    for i in range(3):  # left padding within a batch must not shift or change them
        tokens, features = data.tokens[i], data.features[i]
        assert features.shape == (len(tokens) - 1, qwen2.model.config.hidden_size)
        out = qwen2.model(input_ids=tokens[None, :-1], output_hidden_states=True)
        torch.testing.assert_close(features, out.hidden_states[-1][0], atol=1e-4, rtol=1e-4)


def test_data_round_trip_and_split(tmp_path, data):
    distill.save_data(tmp_path, data, {"target": "t"})
    loaded, info = distill.load_data(tmp_path)
    assert info == {"target": "t"} and loaded.prompt_lens == data.prompt_lens
    assert all(torch.equal(a, b) for a, b in zip(loaded.features, data.features, strict=True))
    train, heldout = data.split(0.25)
    assert (len(train), len(heldout)) == (9, 3)
    assert heldout.tokens[0] is data.tokens[3]  # every 4th sequence
    with pytest.raises(ValueError, match="heldout must be a share"):
        data.split(1.0)
    with pytest.raises(FileNotFoundError, match="run the distill stage"):
        distill.load_data(tmp_path / "none")


@pytest.mark.parametrize("kind", ["medusa", "eagle"])
def test_training_lowers_heldout_loss(trained, kind):
    metrics = trained[kind].metrics
    assert metrics["heldout_loss"] < metrics["heldout_loss_before"]
    assert metrics["train_seconds"] > 0 and metrics["steps"] > 0
    heads_count = 3 if kind == "medusa" else 1
    for i in range(1, heads_count + 1):
        assert 0.0 <= metrics[f"top1_head{i}"] <= 1.0


def test_training_logs_every_step(qwen2, data):
    rows: list[dict[str, float]] = []
    train, heldout = data.split(0.25)
    settings = MedusaTraining(num_heads=2, epochs=2, batch_size=64).settings()
    result = training.train(qwen2, train, heldout, settings, log=rows.append)
    losses = [r for r in rows if "loss" in r]
    assert [r["step"] for r in losses] == list(range(1, int(result.metrics["steps"]) + 1))
    # The held-out checkpoints go to the log too: before training, within the first epoch, and
    # after each of the two epochs.
    assert [r for r in rows if "heldout_loss" in r] == result.curve
    assert [r["epoch"] for r in result.curve if r["step"] in (0, result.metrics["steps"])] == [0, 2]


@pytest.mark.parametrize("kind", ["medusa", "eagle"])
def test_save_load_and_draft(tmp_path, qwen2, prompt_ids, trained, kind):
    head = trained[kind].head
    heads.save(tmp_path, head, heads.describe(head, qwen2.name))
    loaded = heads.load(tmp_path, qwen2, kind)
    assert type(loaded) is type(head) and torch.equal(loaded.vocab, head.vocab)
    for name, tensor in head.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[name], tensor)
    drafter = MedusaDrafter(qwen2, loaded) if kind == "medusa" else EagleDrafter(qwen2, loaded)
    base = loop.generate(qwen2, prompt_ids, 24)
    out = loop.generate(
        qwen2, prompt_ids, 24, speculation=Speculation(drafter, get_policy("exact"), FixedK(3))
    )
    assert out.token_ids == base.token_ids


def test_load_errors(tmp_path, qwen2, llama, trained):
    head = trained["medusa"].head
    heads.save(tmp_path, head, heads.describe(head, qwen2.name))
    with pytest.raises(ValueError, match="holds medusa heads, not eagle"):
        heads.load(tmp_path, qwen2, "eagle")
    with pytest.raises(ValueError, match="trained for target 'tiny-random-qwen2', not 'other'"):
        heads.load(tmp_path, dataclasses.replace(qwen2, name="other"))
    with pytest.raises(ValueError, match="config.json missing"):
        heads.load(tmp_path / "none", qwen2)


def test_choose_vocab():
    sequences = [torch.tensor([5, 5, 5, 9, 9, 2]), torch.tensor([9, 7])]
    # 9 (3x), 5 (3x: tie broken by the lower id), 2 and 7 once (lower id first), then unseen 0.
    assert heads.choose_vocab(sequences, 3, 12).tolist() == [2, 5, 9]
    assert heads.choose_vocab(sequences, 5, 12).tolist() == [0, 2, 5, 7, 9]
    assert heads.choose_vocab(sequences, 50, 12).tolist() == list(range(12))
