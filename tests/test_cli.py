"""The `lab` command: bad arguments fail with clear errors before any model loads."""

from __future__ import annotations

import json

import pandas as pd
import pytest

from lab import cli, models


@pytest.fixture
def no_weights(monkeypatch):
    """Fail the test if any model weights are loaded."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    monkeypatch.setattr(models, "load", refuse)


GEN = ["generate", "--target", "tiny-random-llama", "--dtype", "float32", "--prompt", "hi"]


@pytest.mark.parametrize(
    "extra, message",
    [
        (["--draft", "tiny-random-llama-draft", "--k", "0"], "k must be a positive integer"),
        (["--draft", "tiny-random-llama-draft", "--policy", "magic"], "unknown policy 'magic'"),
        (["--draft", "tiny-random-llama-draft", "--controller", "pid"], "unknown controller 'pid'"),
        (["--draft", "no-such-model"], "unknown model 'no-such-model'"),
        (["--controller", "adaptive", "--controller-opt", "min_k=12"], "min_k"),
        (["--controller-opt", "window"], "KEY=VALUE"),
        (["--temperature", "-1"], "temperature"),
    ],
)
def test_bad_arguments(no_weights, capsys, extra, message):
    assert cli.main(GEN + extra) == 2
    assert message in capsys.readouterr().err


def test_unknown_target(no_weights, capsys):
    assert cli.main(["generate", "--target", "gpt-17", "--prompt", "hi"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'gpt-17'" in err and "tiny-random-llama" in err


def test_empty_prompt(no_weights, capsys):
    assert cli.main(["generate", "--target", "tiny-random-llama", "--prompt", "  "]) == 2
    assert "prompt is empty" in capsys.readouterr().err


def test_mismatched_vocabularies(no_weights, capsys, tmp_path):
    # A local model folder whose tokenizer has one extra token: same shape, different vocabulary.
    tokenizer = models.byte_tokenizer()
    tokenizer.add_tokens(["<extra>"])
    tokenizer.save_pretrained(tmp_path)
    config = models.load_config("tiny-random-llama")
    config.vocab_size = len(tokenizer)
    config.save_pretrained(tmp_path)
    args = GEN + ["--draft", str(tmp_path)]
    assert cli.main(args) == 2
    assert "does not share the target 'tiny-random-llama''s vocabulary" in capsys.readouterr().err


def test_generate_json(capsys):
    args = GEN + ["--draft", "tiny-random-llama", "--k", "3", "--max-new-tokens", "12", "--json"]
    assert cli.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    for key in (
        "text",
        "token_ids",
        "new_tokens",
        "tokens_per_s",
        "acceptance_rate",
        "mean_accepted_length",
        "steps",
    ):
        assert key in out
    assert out["new_tokens"] == len(out["token_ids"]) == 12
    assert out["acceptance_rate"] == 1.0
    assert {
        "step",
        "k",
        "proposed",
        "accepted",
        "emitted",
        "draft_ms",
        "verify_ms",
        "step_ms",
        "rss_mb",
    } <= set(out["steps"][0])


def test_generate_baseline_matches_speculative(capsys):
    assert cli.main(GEN + ["--max-new-tokens", "16", "--json"]) == 0
    base = json.loads(capsys.readouterr().out)
    assert base["acceptance_rate"] is None and base["mean_accepted_length"] == 1.0
    args = GEN + ["--draft", "tiny-random-llama-draft", "--max-new-tokens", "16", "--json"]
    assert cli.main(args) == 0
    assert json.loads(capsys.readouterr().out)["token_ids"] == base["token_ids"]


def test_models_list(capsys):
    assert cli.main(["models", "list"]) == 0
    out = capsys.readouterr().out
    assert "qwen2.5-coder-1.5b-instruct" in out and "tiny-random-qwen2" in out


def test_bench_on_tiny_models(capsys):
    args = [
        "bench",
        "--target",
        "tiny-random-qwen2",
        "--draft",
        "tiny-random-qwen2",
        "--k",
        "3",
        "--max-new-tokens",
        "12",
        "--categories",
        "code",
        "qa",
        "--json",
    ]
    assert cli.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["identical"] is True
    assert out["baseline_vs_hf_generate"] > 0 and out["speculative_vs_hf_assisted"] > 0
    assert out["prompts"] == 2 and out["speculative_steps"]["mean_accepted_length"] > 1


def test_generate_profile_writes_trace_top_ops_and_breakdown(capsys, tmp_path):
    args = GEN + ["--draft", "tiny-random-llama-draft", "--max-new-tokens", "10",
                  "--profile", str(tmp_path)]  # fmt: skip
    assert cli.main(args) == 0
    assert json.loads((tmp_path / "trace.json").read_text())["traceEvents"]
    top = (tmp_path / "top_ops.csv").read_text().splitlines()
    assert top[0].startswith("op,calls,self_cpu_ms") and len(top) > 5
    breakdown = json.loads((tmp_path / "breakdown.json").read_text())
    phases = ("draft_ms", "verify_ms", "accept_ms", "bookkeeping_ms")
    assert all(breakdown[p] >= 0 for p in phases) and breakdown["verify_ms"] > 0
    # The summary is the per-step mean, and bookkeeping what the timed phases leave of a step.
    rows = pd.read_csv(tmp_path / "step_breakdown.csv")
    assert len(rows) > 1 and breakdown["draft_ms"] > 0  # a draft model drafted every step
    for phase in ("draft_ms", "verify_ms", "step_ms"):
        assert breakdown[phase] == pytest.approx(rows[phase].mean())
    rest = rows["step_ms"] - rows["draft_ms"] - rows["verify_ms"] - rows["accept_ms"]
    assert rows["bookkeeping_ms"].to_numpy() == pytest.approx(rest.to_numpy())
