"""lab bench-engine: the measurements' arithmetic, its files, the CLI and the report section."""

from __future__ import annotations

import json
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from lab import cli, machine, models
from lab.bench import engine as bench
from lab.engine import prepack
from lab.engine.caches import DynamicEngine
from lab.report.load import ReportError, load_results
from lab.report.sections_engine import engine_section

CPU = torch.device("cpu")
# Small enough that a whole run on a tiny model takes a second or two.
SMALL = bench.Settings(prompt_tokens=8, prefill_tokens=16, repeats=2, decode_steps=3,
                       prefill_repeats=2, bandwidth_bytes=8 * 2**20)  # fmt: skip
SMALL_ARGS = ["--device", "cpu", "--prompt-tokens", "8", "--prefill-tokens", "16", "--repeats",
              "2", "--decode-steps", "3", "--bandwidth-mib", "8"]  # fmt: skip


def _load(name: str, dtype: str | None) -> models.LoadedModel:
    return models.load(name, "cpu", dtype)


# --- the machine ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "slug"),
    [
        ("NVIDIA H200", "nvidia-h200"),
        ("Intel(R) Xeon(R) Platinum 8481C CPU @ 2.70GHz", "intel-xeon-platinum-8481c"),
        ("AMD EPYC 7B13 64-Core Processor", "amd-epyc-7b13-64-core-processor"),
        ("Intel(R) Xeon(R) Processor @ 2.80GHz (AVX-512)", "intel-xeon-processor-avx-512"),
        ("AMD EPYC (AVX512-BF16)", "amd-epyc-avx512-bf16"),
        ("NVIDIA H100 80GB HBM3", "nvidia-h100-80gb-hbm3"),
    ],
)
def test_machine_slug(name: str, slug: str) -> None:
    assert bench.machine_slug(name) == slug


@pytest.mark.parametrize(
    ("flags", "label"),
    [
        ({"avx2"}, "AMD EPYC (AVX2)"),
        ({"avx2", "avx512f"}, "AMD EPYC (AVX-512)"),
        ({"avx2", "avx512f", "avx512_bf16"}, "AMD EPYC (AVX512-BF16)"),
        ({"avx512f", "avx512_bf16", "amx_bf16"}, "AMD EPYC (AMX)"),
        (set(), "AMD EPYC"),
    ],
)
def test_cpu_label_names_the_widest_unit(flags: set[str], label: str) -> None:
    # Two CPUs both called "AMD EPYC" (AVX2 only / AVX512-BF16) must not share a results folder.
    assert machine.cpu_label("AMD EPYC", frozenset(flags)) == label


def test_machine_slug_refuses_a_name_without_letters() -> None:
    with pytest.raises(ValueError, match="no folder name"):
        bench.machine_slug("(R) @ 3GHz")


def test_read_bandwidth_is_a_plausible_rate() -> None:
    rate = bench.read_bandwidth(CPU, 8 * 2**20, repeats=2)
    assert 1e8 < rate < 1e13  # 0.1 GB/s .. 10 TB/s: bytes per second, not per ms or per byte


def test_cpu_flags_are_the_relevant_subset() -> None:
    flags = bench.cpu_flags()
    assert set(flags) <= set(bench.CPU_FLAGS) and set(flags) <= machine.cpu_flags()


def test_bad_settings_fail_with_the_key() -> None:
    with pytest.raises(ValueError, match="repeats"):
        bench.Settings(repeats=0)
    with pytest.raises(ValueError, match="unknown engine"):
        bench.check_engines(["dynamic", "fast"])


# --- the measurements ----------------------------------------------------------------------------


def test_forward_cost_ratios_from_times_worked_by_hand(
    qwen2: models.LoadedModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A forward of n tokens 'takes' (1 + 0.25 (n - 1)) ms times the round's load factor."""
    calls: list[int] = []
    load = [1.0, 2.0, 3.0, 4.0]  # round 0 (warm-up, dropped), then 2, 3, 4: median 3

    def fake(call: partial, device: torch.device) -> float:
        call()
        n = call.args[1]
        calls.append(n)
        return load[(len(calls) - 1) // len(bench.SIZES)] * (1 + 0.25 * (n - 1)) / 1000.0

    monkeypatch.setattr(bench, "_seconds", fake)
    engine = DynamicEngine(qwen2)
    prompt = bench.token_ids(qwen2, 8, seed=0)
    costs = bench.forward_costs(engine, prompt, repeats=3)
    assert sorted(calls[:9]) == list(bench.SIZES) and len(calls) == 4 * 9
    assert calls[9:18] != calls[18:27] or calls[18:27] != calls[27:]  # orders shuffled
    for n in bench.SIZES:
        assert costs[n]["ratio"] == pytest.approx(1 + 0.25 * (n - 1))
        assert costs[n]["ms"] == pytest.approx(3.0 * (1 + 0.25 * (n - 1)))
    assert costs[1]["ratio"] == 1.0 and costs[5]["ratio"] == pytest.approx(2.0)
    assert engine.cache.get_seq_length() == len(prompt)  # every forward rolled back


@pytest.fixture(scope="module")
def entries(qwen2: models.LoadedModel, qwen2_draft: models.LoadedModel) -> list[dict[str, Any]]:
    return bench.bench_engine(qwen2, qwen2_draft, "static", 1e10, SMALL)


def test_entries_hold_every_measurement(entries: list[dict[str, Any]]) -> None:
    target, draft = entries
    assert (target["role"], target["model"], target["draft"]) == (
        "target", "tiny-random-qwen2", "tiny-random-qwen2-draft",
    )  # fmt: skip
    assert (draft["role"], draft["draft"], draft["c"]) == ("draft", None, None)
    for entry in entries:
        assert (entry["dtype"], entry["engine"]) == ("float32", "static")
        forward = entry["forward"]
        assert [f["tokens"] for f in forward] == list(bench.SIZES)
        assert forward[0]["ratio"] == 1.0  # exactly: t(1) / t(1) in every round
        assert all(f["ratio"] > 0 and f["ms"] > 0 for f in forward)
        assert entry["verify_over_decode_k4"] == forward[4]["ratio"]  # n = 5 = K + 1
        # The limit is bandwidth / bytes; a tiny model is all per-step overhead, far below it.
        limit = 1e10 / entry["weight_bytes_per_token"]
        assert entry["bandwidth_limit_tokens_per_s"] == pytest.approx(limit)
        assert entry["decode_tokens_per_s"] == pytest.approx(1000.0 / entry["decode_step_ms"])
        fraction = entry["decode_tokens_per_s"] / limit
        assert entry["fraction_of_bandwidth_limit"] == pytest.approx(fraction)
        assert 0 < entry["fraction_of_bandwidth_limit"] < 1
        assert entry["prefill_tokens_per_s"] == pytest.approx(16_000.0 / entry["prefill_ms"])
    assert target["c"] == pytest.approx(draft["decode_step_ms"] / target["decode_step_ms"])


def test_run_writes_one_file_per_model_dtype_engine(tmp_path: Path) -> None:
    found = bench.run(_load, "tiny-random-qwen2", None, ["float32"], ["dynamic"], CPU, SMALL)
    written = bench.write(found, tmp_path)
    slug = bench.machine_slug(machine.cpu_label())
    # CPU float32: measured without, then with prepacked linears (lab.engine.prepack), whose
    # packed copy is lab's kernel's off Intel (prepack.use_kernel).
    kernel = prepack.plan().kernel
    names = [
        "tiny-random-qwen2-float32-dynamic.json",
        f"tiny-random-qwen2-float32-dynamic-{'kernel' if kernel else 'prepacked'}.json",
    ]
    assert written == [tmp_path / slug / name for name in names]
    assert [json.loads(p.read_text())["prepacked"] for p in written] == [False, True]
    assert [json.loads(p.read_text())["prepack_kernel"] for p in written] == [False, kernel]
    data = json.loads(written[0].read_text())
    assert data["device"] == machine.cpu_label() and data["machine"] == slug
    assert data["read_bandwidth_bytes_per_s"] > 0 and isinstance(data["cpu_flags"], list)
    assert data["environment"]["torch"] == torch.__version__
    assert data["environment"]["threads"] == torch.get_num_threads()
    assert data["settings"]["prompt_tokens"] == 8 and data["c"] is None
    for key in ("fraction_of_bandwidth_limit", "verify_over_decode_k4", "prefill_tokens_per_s"):
        assert data[key] > 0, key


@pytest.mark.slow
def test_compiled_engine_entries(qwen2: models.LoadedModel) -> None:
    (entry,) = bench.bench_engine(qwen2, None, "compiled", 1e10, SMALL)
    assert entry["engine"] == "compiled" and entry["compile_s"] > 0
    assert entry["forward"][0]["ratio"] == 1.0 and entry["verify_over_decode_k4"] > 0


# --- the command ---------------------------------------------------------------------------------


def test_cli_bench_engine(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    args = ["bench-engine", "--target", "tiny-random-qwen2", "--engines", "dynamic", "static",
            "--out", str(tmp_path), "--json", "--prepack", "off", *SMALL_ARGS]  # fmt: skip
    assert cli.main(args) == 0
    found = json.loads(capsys.readouterr().out)
    assert [(e["model"], e["engine"], e["prepacked"]) for e in found] == [
        ("tiny-random-qwen2", "dynamic", False), ("tiny-random-qwen2", "static", False),
    ]  # fmt: skip
    files = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.json"))
    slug = bench.machine_slug(machine.cpu_label())
    dtype = str(models.cpu_dtype()[0]).removeprefix("torch.")  # bf16 on AMX / AVX512-BF16 CPUs
    assert files == [f"{slug}/tiny-random-qwen2-{dtype}-{e}.json" for e in ("dynamic", "static")]
    on = [*args[: -len(SMALL_ARGS) - 2], "--prepack", "on", "--dtypes", "float32", *SMALL_ARGS]
    assert cli.main(on) == 0  # prepacking is fp32-only: pinned, as the CPU may default to bf16
    found = json.loads(capsys.readouterr().out)
    assert [(e["engine"], e["prepacked"]) for e in found] == [("dynamic", True), ("static", True)]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--engines", "turbo"], "unknown engine"),
        (["--dtypes", "float8"], "unknown dtype"),
        (["--target", "no-such-model"], "unknown model"),
        (["--repeats", "0"], "repeats must be a positive integer"),
    ],
)
def test_cli_bench_engine_rejects_bad_arguments(
    extra: list[str], message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    args = ["bench-engine", "--target", "tiny-random-qwen2", "--out", str(tmp_path), *SMALL_ARGS]
    assert cli.main([*args, *extra]) == 2
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())  # refused before anything ran


# --- the report section --------------------------------------------------------------------------


def hand_entry(device: str, dtype: str, engine: str, ratios: list[float], c: float | None) -> dict:
    """A result as lab bench-engine writes it, with round numbers."""
    return {
        "device": device, "machine": bench.machine_slug(device), "model": "qwen2.5-coder-1.5b",
        "dtype": dtype, "engine": engine, "read_bandwidth_bytes_per_s": 26e9,
        "decode_tokens_per_s": 4.0, "fraction_of_bandwidth_limit": 0.5,
        "verify_over_decode_k4": ratios[4], "c": c,
        "prefill_tokens_per_s": 100.0,
        "forward": [{"tokens": n, "ms": 250.0 * r, "ratio": r} for n, r in enumerate(ratios, 1)],
    }  # fmt: skip


def write_hand_results(experiments: Path) -> None:
    """Two dtypes on one engine of one CPU: the figure gets two lines."""
    cpu = "Intel(R) Xeon(R) CPU"
    fp32 = hand_entry(cpu, "float32", "compiled", [1 + 0.2 * i for i in range(9)], 0.4)
    bf16 = hand_entry(cpu, "bfloat16", "compiled", [1 + 0.01 * i for i in range(9)], 0.33)
    for entry in (fp32, bf16):
        folder = experiments / "engine" / entry["machine"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / bench.file_name(entry)).write_text(json.dumps(entry))


def test_section_renders_table_and_figure_from_hand_results(tmp_path: Path) -> None:
    write_hand_results(tmp_path)
    section = engine_section(load_results(tmp_path))
    table, costs = section.tables
    rows = table.data.set_index("dtype")
    assert rows.loc["float32", "verify_over_decode_k4"] == pytest.approx(1.8)
    assert rows.loc["bfloat16", "verify_over_decode_k4"] == pytest.approx(1.04)
    assert list(table.shown["c"]) == ["0.33", "0.40"]  # files sort: bfloat16 first
    assert list(table.shown["verify(K=4) / decode"]) == ["1.04", "1.80"]
    assert list(table.shown["read GB/s"]) == ["26.0", "26.0"]
    # The cost table: long in the CSV, one row per configuration when shown.
    assert len(costs.data) == 18 and list(costs.shown.columns)[:3] == ["line", "n=1", "n=2"]
    assert list(costs.shown["n=9"]) == ["1.08", "2.60"]
    ((name, fig, caption),) = section.figures
    ax = fig.axes[0]
    lines = {str(line.get_label()): line for line in ax.get_lines()}
    named = sorted(label for label in lines if not label.startswith("_"))  # not the y = 1 rule
    assert named == ["bfloat16 / compiled", "float32 / compiled"]
    ratios = np.asarray(lines["float32 / compiled"].get_ydata(), dtype=float)
    assert ratios == pytest.approx([1 + 0.2 * i for i in range(9)])
    assert list(ax.get_xticks()) == list(range(1, 10))
    assert "tokens" in ax.get_xlabel() and "one-token" in ax.get_ylabel()
    assert name == "engine_forward_cost" and caption


def test_section_without_results_says_no_data(tmp_path: Path) -> None:
    section = engine_section(load_results(tmp_path))
    assert section.text == ["_No data: experiments/engine/ has no results (run lab bench-engine)._"]
    assert not section.tables and not section.figures


def test_a_result_missing_a_key_names_its_file(tmp_path: Path) -> None:
    write_hand_results(tmp_path)
    path = next((tmp_path / "engine").rglob("*.json"))
    data = json.loads(path.read_text())
    del data["verify_over_decode_k4"]
    path.write_text(json.dumps(data))
    with pytest.raises(ReportError, match=f"{path.name}: missing keys verify_over_decode_k4"):
        load_results(tmp_path)
