"""GPU measurement pieces, checked on the CPU: oracle drafter, bound, bandwidth, rows, bench."""

from __future__ import annotations

import json
import random
from dataclasses import replace
from pathlib import Path

import pandas as pd
import pytest
import torch
from transformers import AutoModelForCausalLM

from lab import cli
from lab.bench import hf as bench
from lab.bench import results, roofline
from lab.drafting.oracle import oracle_for, settle
from lab.engine import caches, loop
from lab.engine.controllers import FixedK
from lab.engine.loop import Speculation
from lab.engine.policies import get_policy
from lab.engine.records import PromptResult, StepRecord
from lab.engine.sampling import SamplingParams
from lab.models import LoadedModel, ModelError, cpu_dtype
from lab.models import random as random_models
from lab.report.load import load_results
from lab.report.sections import gpu_section

N = 32


@pytest.mark.parametrize("k", [1, 4, 8])
@pytest.mark.parametrize("policy", ["exact", "rejection"])
def test_oracle_is_accepted_in_full(qwen2, prompt_ids, k, policy):
    base = loop.generate(qwen2, prompt_ids, N)
    oracle = oracle_for({tuple(prompt_ids): base}, qwen2)
    out = loop.generate(
        qwen2, prompt_ids, N, speculation=Speculation(oracle, get_policy(policy), FixedK(k))
    )
    assert out.token_ids == base.token_ids
    assert out.acceptance_rate == 1.0
    # Every full step emits K + 1 tokens; only the last step may be cut by max_new_tokens.
    assert all(s.emitted == k + 1 for s in out.steps[:-1])


def test_oracle_on_the_static_engine(qwen2, prompt_ids):
    base = loop.generate(qwen2, prompt_ids, N)
    static = caches.StaticEngine(qwen2, caches.cache_length([prompt_ids], N, 4), sizes=(1, 5))
    oracle = oracle_for({tuple(prompt_ids): base}, qwen2)
    out = loop.generate(
        static, prompt_ids, N, speculation=Speculation(oracle, get_policy("exact"), FixedK(4))
    )
    assert out.token_ids == base.token_ids and out.acceptance_rate == 1.0


def test_oracle_needs_the_prompts_continuation(qwen2, prompt_ids):
    oracle = oracle_for({}, qwen2)
    with pytest.raises(KeyError, match="no continuation"):
        loop.generate(
            qwen2, prompt_ids, N, speculation=Speculation(oracle, get_policy("exact"), FixedK(2))
        )


def test_oracle_leaving_the_continuation_shows_in_acceptance(qwen2, prompt_ids):
    # Sampling leaves the greedy continuation: the oracle is then rejected, never silently right.
    base = loop.generate(qwen2, prompt_ids, N)
    oracle = oracle_for({tuple(prompt_ids): base}, qwen2)
    params = SamplingParams(temperature=1.0)
    out = loop.generate(
        qwen2,
        prompt_ids,
        N,
        params,
        seed=1,
        speculation=Speculation(oracle, get_policy("exact"), FixedK(4)),
    )
    assert out.acceptance_rate is not None and out.acceptance_rate < 1.0


@pytest.mark.parametrize("wrong_at", [0, 10, 30])
def test_settle_adopts_the_paths_own_output(qwen2, prompt_ids, wrong_at):
    # A reference that disagrees with the target at one position, as bf16 rounding can make it:
    # the first pass is rejected there, the second replays the target's own output in full.
    base = loop.generate(qwen2, prompt_ids, N)
    reference = list(base.token_ids)
    reference[wrong_at] = (reference[wrong_at] + 1) % 256

    def run(oracle, ids, n):
        return loop.generate(
            qwen2, ids, n, speculation=Speculation(oracle, get_policy("exact"), FixedK(4))
        )

    result, passes = settle(run, qwen2, prompt_ids, reference, N)
    assert passes == 2
    assert result.token_ids == base.token_ids and result.acceptance_rate == 1.0
    _, passes = settle(run, qwen2, prompt_ids, reference, N, max_passes=1)
    assert passes == 1


def _result(verify_ms: list[float], emitted: int, total_ms: float) -> PromptResult:
    steps = [
        StepRecord(step=i, k=emitted - 1, proposed=emitted - 1, depth=emitted - 1,
                   accepted=emitted - 1,
                   emitted=emitted, draft_ms=0.0, verify_ms=v, step_ms=v, rss_mb=0.0)
        for i, v in enumerate(verify_ms)
    ]  # fmt: skip
    tokens = list(range(len(steps) * emitted))
    return PromptResult([1], tokens, "", 0.0, total_ms, 0.0, None, steps)


def test_ceiling_row_is_the_bound_formula():
    baseline = [_result([10.0] * 12, 1, 120.0)]
    oracle = [_result([15.0] * 3, 4, 45.0)]
    row = roofline.ceiling_row(3, baseline, oracle)
    assert row["t_decode_ms"] == 10.0 and row["t_verify_ms"] == 15.0
    assert row["bound"] == pytest.approx(4 * 10.0 / 15.0)
    assert row["speedup"] == pytest.approx(120.0 / 45.0)
    # Steps that are all verification: the decode-phase speed-up meets the bound exactly,
    # (12 tokens / 45 ms) / (12 tokens / 120 ms) = 8/3.
    assert row["decode_speedup"] == pytest.approx(8 / 3)
    assert roofline.decode_tokens_per_s(baseline) == pytest.approx(100.0)
    assert row["acceptance_rate"] == 1.0 and row["identical"] is True


def test_hbm_bandwidth_by_device_name():
    assert roofline.hbm_bandwidth("NVIDIA H100 80GB HBM3") == 3.35e12
    assert roofline.hbm_bandwidth("NVIDIA H200") == 4.8e12
    assert roofline.hbm_bandwidth("NVIDIA H100 PCIe") == 2.0e12
    assert roofline.hbm_bandwidth("Some CPU") is None


def test_weight_bytes_read_one_row_of_an_untied_embedding(qwen2):
    # tiny-random-qwen2, fp32: hidden 64, MLP 128, 4 query / 2 KV heads of 16, vocab 259.
    attention = (64 * 64 + 64) + 2 * (64 * 32 + 32) + 64 * 64  # q, k, v with biases; o
    layer = attention + 3 * 64 * 128 + 2 * 64  # gate, up, down; two norms
    read = 2 * layer + 64 + 259 * 64 + 64  # layers, final norm, LM head, one embedding row
    assert roofline.weight_bytes_per_token(qwen2.model) == 4 * read == 363_776
    assert roofline.bandwidth_limit(qwen2) is None  # on the CPU: no HBM figure


@pytest.mark.parametrize(
    ("name", "params", "read"),
    [
        ("random-qwen2.5-1.5b", 1_543_714_304, 1_543_714_304),
        ("random-qwen2.5-0.5b", 494_032_768, 494_032_768),
        # 7B unties its embeddings: a token reads one row of the input table, not all 152064.
        ("random-qwen2.5-7b", 7_615_616_512, 7_615_616_512 - 152_063 * 3584),
    ],
)
def test_random_shapes_match_the_released_models(name, params, read):
    # Parameter counts of the released Qwen2.5 1.5B / 0.5B (tied) and 7B (untied), on meta.
    config = random_models.random_config(random_models.RANDOM[name], eos=258, pad=256)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == params
    assert roofline.weight_bytes_per_token(model.to(torch.bfloat16)) == 2 * read


def test_load_random_is_seeded(monkeypatch):
    small = random_models.RandomSpec(64, 128, layers=2, heads=4, kv_heads=2, seed=5, vocab=300)
    monkeypatch.setitem(random_models.RANDOM, "random-small", small)
    a, b = (random_models.load("random-small", device="cpu") for _ in range(2))
    assert a.dtype == cpu_dtype()[0] and a.eos_token_ids == (258,)
    pairs = zip(a.model.parameters(), b.model.parameters(), strict=True)
    assert all(torch.equal(p, q) for p, q in pairs)
    ids = a.tokenizer.encode("hello")
    assert loop.generate(a, ids, 8).token_ids == loop.generate(b, ids, 8).token_ids


def test_random_models_pair_only_with_random_models():
    random_models.check_pair("random-qwen2.5-1.5b", "random-qwen2.5-0.5b")
    with pytest.raises(ModelError, match="do not share a tokenizer"):
        random_models.check_pair("random-qwen2.5-1.5b", "tiny-random-qwen2")
    with pytest.raises(ModelError, match="random real-shape model"):
        random_models.check_name("no-such-model")


@pytest.fixture(scope="module")
def bench_result(qwen2: LoadedModel, prompt_ids: list[int]) -> dict:
    prompts = [prompt_ids, prompt_ids[:20]]
    return bench.run(qwen2, qwen2, prompts, 3, 16, oracle=True, static_cache=True, ks=[1, 2])


def test_bench_with_oracle_and_static_cache(bench_result):
    methods = bench_result["methods"]
    assert list(methods) == [
        "hf_generate", "lab_baseline", "hf_assisted", "lab_speculative", "lab_speculative_oracle",
        "lab_baseline_static", "lab_speculative_static", "lab_speculative_oracle_static",
    ]  # fmt: skip
    assert bench_result["identical"] is True
    for name in ("lab_speculative_oracle", "lab_speculative_oracle_static"):
        assert methods[name]["acceptance_rate"] == 1.0
        assert methods[name]["drafter"] == "oracle"
    assert methods["lab_baseline_static"]["cache"] == "static"
    assert methods["lab_baseline_static"]["speedup_over"] == "lab_baseline"
    assert bench_result["static"]["compiled"] is False
    assert (
        bench_result["environment"]["device"]
        and bench_result["bandwidth_limit_tokens_per_s"] is None
    )
    for path in ("dynamic", "static"):
        sweep = bench_result["ceiling"][path]
        assert [row["k"] for row in sweep] == [1, 2]
        assert all(row["acceptance_rate"] == 1.0 and row["identical"] for row in sweep)
        assert all(row["settle_passes"] == 1 for row in sweep)
    assert methods["lab_speculative_oracle"]["settle_passes"] == 1


def test_rows_are_flat_and_render_in_the_report(bench_result, tmp_path: Path):
    folder = tmp_path / "experiments" / "gpu"
    written = results.write(bench_result, folder, "cpu-tiny")
    rows = results.rows(bench_result)
    assert len(rows) == 8 + 4  # 8 methods (eager: no compiled-step row) + 2 K x 2 cache paths
    assert len(written) == 1 + 12  # raw/cpu-tiny.json and one file per row
    for path in written[1:]:
        row = json.loads(path.read_text())
        assert set(row) == set(results.ROW_KEYS)
        assert all(not isinstance(v, dict | list) for v in row.values())
    assert json.loads((folder / "raw" / "cpu-tiny.json").read_text())["k"] == 3
    # The report's GPU section: the CSV has one row per flat file (raw/ is not globbed) and every
    # column; the shown table has the curated columns, one row per method and cache (a K sweep's
    # rows of one method collapse to the default K's).
    section = gpu_section(load_results(tmp_path / "experiments"))
    (table,) = section.tables
    assert len(table.data) == 12 and "driver" in table.data
    unique = len(table.data.drop_duplicates(["device", "model", "method", "cache"]))
    assert len(table.shown) == unique < 12 and "driver" not in table.shown.columns
    twice = pd.concat([table.data, table.data])
    rerun = gpu_section(replace(load_results(tmp_path / "experiments"), gpu=twice)).tables[0]
    assert len(rerun.shown) == unique and len(rerun.data) == 24


def test_cli_bench_writes_rows(tmp_path: Path, capsys):
    args = ["bench", "--target", "tiny-random-qwen2", "--draft", "tiny-random-qwen2", "--k", "2",
            "--max-new-tokens", "8", "--categories", "code", "--oracle", "--static-cache",
            "--ks", "1", "--out", str(tmp_path), "--tag", "t", "--json"]  # fmt: skip
    assert cli.main(args) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["methods"]["lab_speculative_oracle"]["acceptance_rate"] == 1.0
    assert (tmp_path / "t-lab_baseline_static.json").exists()
    assert (tmp_path / "t-oracle-static-k1.json").exists()


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--ks", "0"], "k must be a positive integer"),
        (["--target", "random-qwen2.5-1.5b"], "do not share a tokenizer"),
        (["--warmup-tokens", "0"], "--warmup-tokens"),
    ],
)
def test_cli_bench_rejects_bad_arguments_before_loading(extra, message, capsys):
    args = ["bench", "--target", "tiny-random-qwen2", "--draft", "tiny-random-qwen2", *extra]
    assert cli.main(args) == 2
    assert message in capsys.readouterr().err


def test_bench_order_is_random_per_prompt_with_oracles_after_their_baseline() -> None:
    table = bench.methods("tiny-random-qwen2-draft", oracle=True, static_cache=True)
    runners: dict[str, object] = dict.fromkeys(table)
    runners[bench.ORACLE] = bench.OracleRunner(None, None, "lab_baseline", {})  # type: ignore[arg-type]
    rng = random.Random(0)
    orders = [bench._shuffled(table, runners, rng) for _ in range(40)]
    assert all(sorted(o) == sorted(table) for o in orders)
    assert len({o[0] for o in orders}) > 2  # no method always runs first
    assert all(o.index(bench.ORACLE) > o.index("lab_baseline") for o in orders)
