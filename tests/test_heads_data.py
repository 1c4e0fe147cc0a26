"""The heads' training data at scale: the stdlib corpus, teacher forcing, its labels, the data-size
params, held-out accuracy against tokens seen, the report's heads section, pipelines/heads."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from lab.drafting import corpus, distill, heads, training
from lab.drafting.heads import IGNORE
from lab.engine.model import LoadedModel
from lab.pipeline import heads_stages
from lab.pipeline import params as P
from lab.pipeline.params import EagleTraining, MedusaTraining
from lab.prompts import load_suite
from lab.report.heads import head_records
from lab.report.load import Results
from lab.report.sections_heads import heads_section
from tests.smoke import ROOT, make_repo, run

RAW = yaml.safe_load((ROOT / "params.yaml").read_text())


@pytest.fixture(scope="module")
def sequences(qwen2: LoadedModel) -> list[corpus.Sequence]:
    return corpus.sequences(qwen2.tokenizer, 1500, 100, seed=0)


@pytest.fixture(scope="module")
def forced(qwen2: LoadedModel, sequences: list[corpus.Sequence]) -> distill.Distilled:
    return distill.teacher_force(qwen2, sequences, batch_size=4)


@pytest.fixture(scope="module")
def answers(qwen2: LoadedModel) -> distill.Distilled:
    return distill.distill(qwen2, load_suite("builtin-train", per_category=1), 16, batch_size=3)


# --- the corpus --------------------------------------------------------------------------------


@pytest.mark.parametrize(("total", "size"), [(1, 64), (100, 64), (1500, 100), (2048, 256)])
def test_corpus_gives_exactly_the_tokens_asked_for(qwen2, total, size):
    found = corpus.sequences(qwen2.tokenizer, total, size, seed=0)
    assert sum(len(s.content) for s in found) == total
    assert all(0 < len(s.content) <= size for s in found)
    assert all(s.tokens == s.prefix + s.content for s in found)


def test_corpus_mixes_code_and_prose_and_follows_the_seed(qwen2, sequences):
    assert {s.kind for s in sequences} == set(corpus.KINDS)
    assert "pydoc_data" not in {s.module.split(".")[0] for s in sequences}  # perplexity's corpus
    again = corpus.sequences(qwen2.tokenizer, 1500, 100, seed=0)
    assert [s.tokens for s in again] == [s.tokens for s in sequences]
    other = corpus.sequences(qwen2.tokenizer, 1500, 100, seed=1)
    assert [s.module for s in other] != [s.module for s in sequences]


def test_corpus_slices_are_assistant_turns_of_the_chat_template(qwen2, sequences):
    text = qwen2.tokenizer.decode(sequences[0].tokens)
    assert text.startswith("<|im_start|>user\n") and "<|im_start|>assistant\n" in text
    module = sequences[0].module
    assert f"`{module}`" in qwen2.tokenizer.decode(sequences[0].prefix)


def test_a_corpus_too_small_says_so(qwen2, tmp_path, monkeypatch):
    (tmp_path / "json").mkdir()
    source = '"""A module."""\n\n' + "def f(x):\n    return x + 1\n" * 30
    (tmp_path / "json" / "decoder.py").write_text(source)
    monkeypatch.setattr(corpus, "stdlib_root", lambda: tmp_path)
    # Byte-level tokenizer: one token per character of the source (its prose is too short).
    assert sum(len(s.content) for s in corpus.sequences(qwen2.tokenizer, len(source), 64, 0))
    with pytest.raises(ValueError, match=r"corpus_tokens=100000 exceeds the \d+ tokens"):
        corpus.sequences(qwen2.tokenizer, 100_000, 64, 0)


def test_corpus_without_stdlib_source_fails_clearly(tmp_path, monkeypatch):
    monkeypatch.setattr(corpus.sysconfig, "get_paths", lambda: {"stdlib": str(tmp_path)})
    with pytest.raises(FileNotFoundError, match="set distill.corpus_tokens: 0"):
        corpus.stdlib_root()


# --- teacher forcing and its labels -------------------------------------------------------------


@pytest.mark.parametrize("name", ["qwen2", "llama"])
def test_teacher_forced_features_equal_a_per_sequence_forward(request, name):
    """Batched, right-padded prefill gives each sequence the states of its own forward (fp32)."""
    lm: LoadedModel = request.getfixturevalue(name)
    found = corpus.sequences(lm.tokenizer, 700, 90, seed=2)
    assert len({len(s.tokens) for s in found[:3]}) > 1  # the first batch pads
    data = distill.teacher_force(lm, found, batch_size=3)
    for tokens, features in zip(data.tokens, data.features, strict=True):
        assert features.shape == (len(tokens) - 1, lm.model.config.hidden_size)
        out = lm.model(input_ids=tokens[None, :-1], output_hidden_states=True)
        torch.testing.assert_close(features, out.hidden_states[-1][0], atol=1e-5, rtol=1e-5)


def test_labels_are_the_targets_argmax_not_the_texts_next_token(qwen2, forced):
    """The documented choice: a head learns what the target would emit at each position."""
    disagree = 0
    for tokens, labels, start in zip(forced.tokens, forced.labels, forced.prompt_lens,
                                     strict=True):  # fmt: skip
        logits = qwen2.model(input_ids=tokens[None, :-1]).logits[0]  # (L-1, V)
        assert torch.equal(labels[start - 1 :], logits[start - 1 :].argmax(-1))
        assert (labels[: start - 1] == IGNORE).all()  # prompts: no head trains there
        disagree += int((labels[start - 1 :] != tokens[start:]).sum())
    assert disagree > 0  # a random model rarely agrees with the stdlib: labels are not the text
    assert forced.sources == [s.kind for s in corpus.sequences(qwen2.tokenizer, 1500, 100, 0)]


def test_on_its_own_answers_the_label_is_the_next_token(answers):
    """Self-distilled text: the target's argmax at each position is the token it generated."""
    for tokens, labels, start in zip(answers.tokens, answers.labels, answers.prompt_lens,
                                     strict=True):  # fmt: skip
        assert torch.equal(labels[start - 1 :], tokens[start:])
    assert set(answers.sources) == {"answer"}


def test_medusa_and_eagle_learn_the_targets_argmax(qwen2, forced):
    """Medusa head i at t learns the argmax at t+1+i; EAGLE at t learns the argmax at t+1."""
    settings = MedusaTraining(num_heads=3, draft_vocab=64).settings()
    _, medusa = training._build(qwen2, forced, settings, seed=0)
    x, y = medusa.examples(forced)
    labels, features, start = forced.labels[0], forced.features[0], forced.prompt_lens[0]
    first = len(labels) - start  # rows of sequence 0: positions start-1 .. L-3
    for row, t in enumerate(range(start - 1, start - 1 + first)):
        torch.testing.assert_close(x[row], features[t])
        for i in range(3):
            wanted = labels[t + 1 + i] if t + 1 + i < len(labels) else IGNORE
            assert y[row, i] == wanted
    _, eagle = training._build(qwen2, forced, EagleTraining(intermediate_size=16).settings(), 0)
    batch = eagle._batch(forced, [0])
    after_next = batch[4][0]
    assert torch.equal(after_next[start - 1 :], labels[start:])
    assert (after_next[: start - 1] == IGNORE).all()


def test_mixed_data_round_trips_and_holds_out_every_source(tmp_path, answers, forced):
    data = answers + forced
    distill.save_data(tmp_path, data, {"target": "t"})
    loaded, _ = distill.load_data(tmp_path)
    assert loaded.sources == data.sources and loaded.prompt_lens == data.prompt_lens
    assert all(torch.equal(a, b) for a, b in zip(loaded.labels, data.labels, strict=True))
    train, heldout = data.split(0.25)
    assert set(heldout.sources) == set(data.sources)
    assert len(train) + len(heldout) == len(data)
    assert data.text_tokens() == answers.text_tokens() + forced.text_tokens()
    assert forced.text_tokens() == 1500  # distill.corpus_tokens, honoured


# --- accuracy against tokens seen ---------------------------------------------------------------


@pytest.mark.parametrize("kind", ["medusa", "eagle"])
def test_accuracy_curve_is_monotone_in_tokens_with_every_key(qwen2, forced, kind):
    train, heldout = forced.split(0.25)
    settings: training.TrainingSettings = (
        MedusaTraining(num_heads=2, epochs=2, batch_size=16).settings() if kind == "medusa"
        else EagleTraining(intermediate_size=32, epochs=2, batch_size=1).settings()
    )  # fmt: skip
    result = training.train(qwen2, train, heldout, settings, checkpoints=(0.125, 0.25, 0.5))
    curve = result.curve
    tokens = [row["tokens"] for row in curve]
    assert tokens[0] == 0 and all(a < b for a, b in zip(tokens, tokens[1:], strict=False))
    per_epoch = train.positions()
    assert tokens[-1] == 2 * per_epoch and per_epoch in tokens  # after every epoch
    first_epoch = [t for t in tokens if 0 < t < per_epoch]
    assert len(first_epoch) == 3  # after 1/8, 1/4 and 1/2 of it (enough steps for each)
    heads = 2 if kind == "medusa" else 1
    wanted = {"step", "epoch", "tokens", "heldout_loss"} | {
        f"top{k}_head{i}" for k in training.TOP_K for i in range(1, heads + 1)
    }
    assert all(set(row) == wanted for row in curve)
    assert all(row[f"top1_head{i}"] <= row[f"top5_head{i}"] for row in curve
               for i in range(1, heads + 1))  # fmt: skip
    assert result.metrics["top1_head1"] == curve[-1]["top1_head1"]
    assert result.metrics["train_tokens"] == per_epoch
    assert {"code_top1_head1", "prose_top1_head1"} <= result.metrics.keys()  # per source


# --- params -----------------------------------------------------------------------------------


def _load(tmp_path: Path, section: str, **values: object) -> P.Params:
    data = copy.deepcopy(RAW)
    data[section].update(values)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(data, sort_keys=False))
    return P.load(path)


def test_data_size_params_load(tmp_path):
    params = _load(tmp_path, "distill", corpus_tokens=4096, per_category=0)
    assert params.distill.corpus_tokens == 4096 and params.distill.suite() == []
    assert P.load(ROOT / "params.yaml").heads.checkpoints == list(training.CHECKPOINTS)


@pytest.mark.parametrize(
    ("section", "values", "message"),
    [
        ("distill", {"corpus_tokens": -1}, "distill.corpus_tokens must be an integer >= 0, got -1"),
        ("distill", {"corpus_tokens": 1.5}, "distill.corpus_tokens must be an integer >= 0"),
        ("distill", {"corpus_tokens": 0, "per_category": 0},
         "distill.corpus_tokens: per_category and corpus_tokens are both 0"),
        ("distill", {"sequence_tokens": 8}, "distill.sequence_tokens must be an integer >= 16"),
        ("distill", {"per_category": -2}, 'distill.per_category must be an integer >= 0 or "full"'),
        ("heads", {"checkpoints": [0.5, 1.0]}, "heads.checkpoints[1] must be a share in (0, 1)"),
    ],
)  # fmt: skip
def test_bad_data_size_params_name_key_and_value(tmp_path, section, values, message):
    with pytest.raises(P.ParamsError) as err:
        _load(tmp_path, section, **values)
    assert message in str(err.value)


# --- the report ---------------------------------------------------------------------------------


def _heads_folder(folder: Path, kind: str, heads: int, scale: float) -> None:
    """A trained head's files as run_heads writes them (numbers made up)."""
    folder.mkdir(parents=True)
    rows = [{"step": s, "epoch": e, "tokens": t, "heldout_loss": 5.0 - s,
             **{f"top{k}_head{i}": min(1.0, scale * (s + 1) * k / (10 * i))
                for k in training.TOP_K for i in range(1, heads + 1)}}
            for s, e, t in [(0, 0, 0), (2, 0, 125), (8, 1, 1000)]]  # fmt: skip
    pd.DataFrame(rows).to_csv(folder / heads_stages.CURVE, index=False)
    metrics = {**{k: v for k, v in rows[-1].items() if k.startswith("top")},
               "train_tokens": 1000.0, "train_seconds": 3.0, "steps": 8.0,
               "heldout_loss": 1.0, "answer_top1_head1": 0.4}  # fmt: skip
    (folder / "metrics.json").write_text(json.dumps(metrics))
    data = {"generated_tokens": 100, "corpus_tokens": 1000, "corpus_label_agreement": 0.5}
    (folder / "config.json").write_text(json.dumps({"kind": kind, "data": data}))


def test_heads_section_shows_accuracy_against_tokens(tmp_path):
    experiments = tmp_path / "experiments"
    _heads_folder(experiments / "heads" / "medusa", "medusa", 3, 0.1)
    _heads_folder(experiments / "heads" / "eagle", "eagle", 1, 0.2)
    _heads_folder(experiments / "heads_scale" / "eagle", "eagle", 1, 0.3)
    (experiments / "heads_scale" / "distill").mkdir()  # the data folder is no head
    records = head_records(experiments)
    assert set(zip(records.summary["run"], records.summary["kind"], strict=True)) == {
        ("default", "medusa"), ("default", "eagle"), ("scale", "eagle")}  # fmt: skip
    section = heads_section(Results({}, None, None, None, None, None, pd.DataFrame(), records))
    summary, curve = section.tables
    assert "label agreement" in summary.shown.columns and "top-1 h3" in summary.shown.columns
    assert "answers top-1 h1" in summary.shown.columns
    # a row per run, kind and checkpoint; a column per k and head
    assert len(curve.data) == 9 and {"top-1 h1", "top-5 h3"} <= set(curve.data.columns)
    medusa = curve.data[curve.data["kind"] == "medusa"]
    assert medusa["tokens"].tolist() == [0, 125, 1000]
    assert curve.data[curve.data["kind"] == "eagle"]["top-1 h2"].isna().all()
    assert [name for name, _, _ in section.figures] == ["heads_curve"]


# --- pipelines/heads ----------------------------------------------------------------------------


SCALE_SMALL = {
    "distill": {"per_category": 1, "max_new_tokens": 12, "batch_size": 4, "corpus_tokens": 600,
                "sequence_tokens": 100},
    "heads": {"heldout": 0.25, "medusa": {"epochs": 1, "batch_size": 32},
              "eagle": {"intermediate_size": 32, "epochs": 1, "batch_size": 2}},
}  # fmt: skip


def test_scale_pipeline_params_load():
    scale = P.load_heads_pipeline(ROOT / "pipelines" / "heads" / "params.yaml")
    assert scale.distill.corpus_tokens > P.load(ROOT / "params.yaml").distill.corpus_tokens
    stages = yaml.safe_load((ROOT / "pipelines" / "heads" / "dvc.yaml").read_text())["stages"]
    assert set(stages) == {"distill", "heads", "drafters"}


def test_scale_pipeline_runs_on_tiny_models_and_stays_optional(tmp_path, qwen2):
    repo = make_repo(tmp_path / "repo", "heads-scale")
    path, env = repo
    params = path / "pipelines" / "heads" / "params.yaml"
    data = yaml.safe_load(params.read_text())
    for section, values in SCALE_SMALL.items():
        for key, value in values.items():
            if isinstance(value, dict):
                data[section][key].update(value)
            else:
                data[section][key] = value
    params.write_text(yaml.safe_dump(data, sort_keys=False))
    # The default pipeline never runs this one: no default stage has its stages upstream
    # (whatever drafters.params point at), while its heads stage has its distill upstream.
    for stage in ("drafters@eagle", "report"):
        assert "pipelines/heads" not in run(["dvc", "dag", stage], path, env).stdout, stage
    upstream = run(["dvc", "dag", "pipelines/heads/dvc.yaml:heads@eagle"], path, env).stdout
    assert "pipelines/heads/dvc.yaml:distill" in upstream
    run(["dvc", "repro", "pipelines/heads/dvc.yaml"], path, env, timeout=600)
    scale = path / heads_stages.SCALE
    assert (scale / "distill" / distill.DATA).is_file()
    for kind in ("medusa", "eagle"):
        for name in ("head.safetensors", "config.json", "metrics.json", "curve.csv", "loss.csv"):
            assert (scale / kind / name).is_file(), (kind, name)
        config = json.loads((scale / kind / "config.json").read_text())
        assert config["data"]["corpus_tokens"] == 600
        # What drafters.params.<kind>.heads may point at: a head folder the drafters load.
        loaded = heads.load(scale / kind, qwen2, kind)
        assert isinstance(loaded, heads.MedusaHeads if kind == "medusa" else heads.EagleHead)
    assert (path / "pipelines" / "heads" / "dvc.lock").is_file()  # DVC-tracked
    status = run(["dvc", "status", "pipelines/heads/dvc.yaml"], path, env).stdout
    assert "up to date" in status
    assert set(head_records(path / "experiments").summary["run"]) == {"scale"}
    shutil.rmtree(path)
