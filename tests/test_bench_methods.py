"""`lab bench --methods`: only the chosen methods run (plus the baselines some settle on)."""

from __future__ import annotations

import json

import pytest

from lab import cli, models
from lab.bench import hf as bench
from lab.bench import results
from lab.bench.interleave import interleaved
from lab.engine.records import PromptResult
from lab.models import random as random_models

TINY = ["bench", "--target", "tiny-random-qwen2", "--draft", "tiny-random-qwen2-draft"]


def _table(**flags) -> dict[str, bench.BenchMethod]:
    return bench.methods("tiny-random-qwen2-draft", **flags)


def test_select_keeps_the_table_order_and_the_baselines_oracles_settle_on():
    table = _table(oracle=True, static_cache=True, acceptance=(0.5, 0.8))
    assert bench.select(table, None) is table
    chosen = bench.select(table, ["*controlled*_static", "lab_speculative_oracle"])
    assert list(chosen) == [
        "lab_baseline", "lab_speculative_oracle", "lab_baseline_static",
        "lab_speculative_controlled_a0.5_static", "lab_speculative_controlled_a0.8_static",
    ]  # fmt: skip
    assert list(bench.select(table, ["lab_speculative"])) == ["lab_speculative"]


def test_select_names_this_runs_methods_for_a_bad_pattern():
    with pytest.raises(ValueError, match=r"'lab_baseline_static' matches no method") as err:
        bench.select(_table(), ["lab_baseline_static"])  # needs --static-cache
    assert "use some of hf_generate, lab_baseline, hf_assisted, lab_speculative (" in str(err.value)


def test_check_selection_refuses_what_cannot_be_measured():
    table = _table(static_cache=True)
    with pytest.raises(ValueError, match="--ks measures the oracle against a lab baseline"):
        bench.check_selection(bench.select(table, ["lab_speculative*"]), [2], 10, 10)
    bench.check_selection(bench.select(table, ["lab_baseline_static"]), [2], 10, 10)
    with pytest.raises(ValueError, match=r"hf_assisted: .* \(8 vs 10\)"):
        bench.check_selection(table, None, 10, 8)
    bench.check_selection(bench.select(table, ["lab_*"]), None, 10, 8)


def _refused(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    return err


@pytest.fixture
def no_weights(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("a model was loaded before the arguments were checked")

    for module in (models, random_models):
        monkeypatch.setattr(module, "load", refuse)
    monkeypatch.setattr(random_models, "load_random", refuse)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--methods", "nope"], "--methods 'nope' matches no method of this run: use some of"),
        (["--methods", "*_static"], "'*_static' matches no method"),  # no --static-cache
        (["--methods", "lab_speculative", "--static-cache", "--ks", "2"], "--ks measures"),
    ],
)
def test_cli_refuses_bad_methods_before_loading(no_weights, capsys, extra, message):
    assert message in _refused(TINY + extra, capsys)


def test_cli_refuses_hf_assisted_for_a_narrower_draft(no_weights, capsys):
    pair = ["bench", "--target", "random-qwen2.5-7b", "--draft", "random-qwen2.5-0.5b"]
    assert "hf_assisted: HF's assisted generation refuses" in _refused(pair, capsys)
    # Without it the checks pass and loading starts (refused here by the no_weights fixture).
    with pytest.raises(AssertionError, match="a model was loaded"):
        cli.main([*pair, "--methods", "lab_*"])


def test_cli_runs_only_the_chosen_methods(capsys):
    argv = TINY + ["--k", "2", "--max-new-tokens", "8", "--categories", "code", "--static-cache",
                   "--acceptance", "0.6", "--methods", "*controlled*_static", "--json"]  # fmt: skip
    assert cli.main(argv) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["methods"]) == ["lab_baseline_static", "lab_speculative_controlled_a0.6_static"]
    assert out["identity_reference"] == "lab_baseline_static" and out["identical"] is True
    assert out["baseline_vs_hf_generate"] is None and out["speculative_steps"] is None
    controlled = out["methods"]["lab_speculative_controlled_a0.6_static"]
    assert controlled["speedup_over"] == "lab_baseline_static" and controlled["speedup"] > 0
    assert controlled["predicted_speedup"] > 0
    assert out["methods"]["lab_baseline_static"]["speedup"] is None  # lab_baseline did not run
    n = len(controlled["verdicts"])
    assert n > 0 and controlled["lossless"] == {"identical": n, "numerics": 0, "violation": 0}
    assert out["violations"] == 0
    assert out["fused"] == {"target": False, "draft": False}  # the CPU's default


def test_run_without_hf_generate_holds_tokens_against_the_lab_baseline(qwen2, prompt_ids):
    result = bench.run(qwen2, qwen2, [prompt_ids], 2, 8, only=["lab_speculative", "lab_baseline"])
    assert list(result["methods"]) == ["lab_baseline", "lab_speculative"]
    assert result["identity_reference"] == "lab_baseline" and result["identical"] is True
    assert (
        result["speculative_vs_lab_baseline"] > 0 and result["speculative_vs_hf_assisted"] is None
    )


def test_verdicts_classify_each_fork_as_the_pipeline_does(qwen2, prompt_ids):
    """Per prompt, in order: identical; a changed token far below the top (a violation); an
    output one token short (a violation: equal-length greedy outputs never allow a prefix)."""
    result = bench.run(qwen2, qwen2, [prompt_ids], 2, 12, only=["lab_baseline"])
    ref = result["methods"]["lab_baseline"]
    assert ref["verdicts"] == ["identical"] and ref["lossless"]["identical"] == 1
    base = bench._hf(qwen2, prompt_ids, 12)  # HF's greedy generate: the same tokens
    vocab = len(qwen2.tokenizer)
    changed = base[:5] + [(base[5] + 7) % vocab] + base[6:]
    got = bench.verdicts(qwen2, [prompt_ids] * 3, [base, changed, base[:-1]], [base] * 3)
    assert got == ["identical", "violation", "violation"]


def test_rows_carry_the_verdict_counts():
    env = {"device": "cpu", "driver": None, "torch": "2"}
    info = {"cache": "dynamic", "drafter": "draft", "tokens_per_s": 5.0,
            "decode_tokens_per_s": None, "speedup": 1.1, "speedup_over": "lab_baseline",
            "acceptance_rate": 0.5, "identical": False,
            "lossless": {"identical": 4, "numerics": 2, "violation": 1}}  # fmt: skip
    result = {"environment": env, "target": "m", "dtype": "bfloat16", "k": 4,
              "bandwidth_limit_tokens_per_s": None,
              "methods": {"lab_speculative": info}}  # fmt: skip
    row = results.rows(result)["lab_speculative"]
    assert (row["identical"], row["numerics"], row["violation"]) == (False, 2, 1)


def test_interleaved_warms_each_variant_then_runs_every_prompt_once_per_variant(capsys):
    calls: list[tuple[str, int]] = []

    def run(variant: str, ids: list[int]) -> PromptResult:
        calls.append((variant, ids[0]))
        return PromptResult(ids, [ids[0]], variant, 1.0, 1000.0 * ids[0], 0.0, None)

    prompts = [[p] for p in range(1, 21)]
    results = interleaved(run, ("a", "b"), prompts, seed=0)
    assert calls[:2] == [("a", 1), ("b", 1)]  # one untimed warm-up each, on the first prompt
    timed = calls[2:]
    for i, ids in enumerate(prompts):  # each prompt: both variants, before the next prompt
        assert sorted(timed[2 * i : 2 * i + 2]) == [("a", ids[0]), ("b", ids[0])]
    firsts = [timed[2 * i][0] for i in range(len(prompts))]
    assert set(firsts) == {"a", "b"}  # the order changes from prompt to prompt
    again: list[tuple[str, int]] = calls[:]
    calls.clear()
    interleaved(run, ("a", "b"), prompts, seed=0)
    assert calls == again  # the same seed, the same order
    assert {v: [r.token_ids[0] for r in rs] for v, rs in results.items()} == {
        "a": list(range(1, 21)), "b": list(range(1, 21)),
    }  # fmt: skip
    assert "prompt 2 (1 tokens): a 3.0 s, b 3.0 s" in capsys.readouterr().out
