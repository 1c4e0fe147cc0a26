"""reports/ from an experiments/ tree written by the real lab code on tiny random models."""

from __future__ import annotations

import copy
import dataclasses
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch

from lab import stats
from lab.engine.model import LoadedModel
from lab.engine.policies import POLICIES
from lab.engine.sampling import SamplingParams
from lab.method import Method
from lab.pipeline import store, suite
from lab.pipeline.lossless import lossless_check
from lab.prompts import CATEGORIES, load_suite
from lab.report import load, tables
from lab.report.load import ReportError, ReportSettings, label, load_results
from lab.report.plots import PLOTS
from lab.report.render import main, render
from lab.report.sections import lossless_table
from lab.report.sections_speed import protocol_section
from lab.stats import summarize
from tests.test_bench_engine import write_hand_results

MAX_NEW_TOKENS = 12
PARAMS: dict[str, Any] = {
    "k": 4,
    "seed": 0,
    "models": {
        "target": "tiny-random-qwen2",
        "draft": "tiny-random-qwen2-noisy",
        "scorer": "tiny-random-qwen2",
        "device": "cpu",
        "dtype": None,
    },
    "prompts": {"source": "builtin", "categories": list(CATEGORIES), "per_category": 1},
    "generation": {"max_new_tokens": MAX_NEW_TOKENS, "temperature": 0.0, "top_k": 0, "top_p": 1.0},
    "run": {"repetitions": 1, "warmup": 1},
    "report": {"bootstrap_samples": 200},
}
TABLES = (
    "baseline",
    "ksweep",
    "policies",
    "drafters",
    "controllers",
    "predicted",
    "categories",
    "lossless",
    "perplexity_outputs",
    "perplexity_corpus",
    "step_latency",
    "step_breakdown",
    "memory",
    "gpu",
    "engine",
    "engine_forward_cost",
)
FIGURES = ("ksweep", "frontier", "accepted_length", "step_latency", "acceptance_by_position",
           "engine_forward_cost")  # fmt: skip
HEADINGS = (
    "Methods",
    "Baseline",
    "Timing protocol and machine load",
    "K sweep",
    "Acceptance policies",
    "Drafters",
    "K controllers",
    "Measured vs predicted speed-up",
    "Per-category speed-up",
    "Lossless check",
    "Perplexity",
    "Per-step latency",
    "Step time breakdown and memory",
    "Acceptance by draft position",
    "GPU",
    "Engine",
)
GREEDY = SamplingParams(0.0, 0, 1.0)


def _noisy(target: LoadedModel) -> LoadedModel:
    """The target with 5% weight noise: a draft that agrees often but not always (a ~ 0.6)."""
    model = copy.deepcopy(target.model)
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():
            if p.numel() > 1:
                p.add_(torch.randn(p.shape, generator=gen) * 0.05 * p.std())
    return dataclasses.replace(target, name="tiny-random-qwen2-noisy", model=model)


class Builder:
    """Runs methods and writes items the way lab.pipeline.stage does, minus MLflow."""

    def __init__(self, root: Path, target: LoadedModel) -> None:
        self.root, self.target, self.draft = root, target, _noisy(target)
        self.prompts = load_suite("builtin", per_category=1)
        self.base: tuple[pd.DataFrame, pd.DataFrame] | None = None

    def item(
        self,
        stage: str,
        name: str,
        method: Method,
        sampling: SamplingParams = GREEDY,
        policy_label: str | None = None,
    ) -> None:
        draft = None if method.baseline else self.draft
        rows = suite.run(
            method,
            self.target,
            draft,
            self.prompts,
            MAX_NEW_TOKENS,
            sampling,
            seed=0,
            repetitions=1,
            warmup=1,
        )
        frame = pd.DataFrame(rows)
        frame["question_id"] = frame["question_id"].astype(str)
        steps = store.step_frame(rows)
        base_rows, base_steps = self.base if self.base else (None, None)
        metrics = summarize(frame, steps, seed=0, baseline_rows=base_rows)
        lossless = None
        if base_rows is not None and policy_label is None and sampling.greedy:
            lossless = lossless_check(self.target, frame, base_rows)
        run = {
            "method": dataclasses.asdict(method),
            "target": self.target.name,
            # As lab.pipeline.stage.run_config: only the draft_model drafter runs on a draft model.
            "draft": self.draft.name if method.drafter == "draft_model" else None,
            "device": "cpu",
            "dtype": None,
            "prompts": PARAMS["prompts"],
            "generation": PARAMS["generation"],
            "seed": 0,
            "repetitions": 1,
            "warmup": 1,
        }
        if policy_label is not None:
            run["method"]["policy"] = policy_label
        config = {"stage": stage, "item": name, "run": run}
        store.write_item(self.root / stage / name, config, rows, metrics, lossless)
        if method.baseline:
            self.base = frame, steps


def _reuse(source: Path, dest: Path) -> None:
    """What lab.pipeline.stage does for an identical configuration: copy, record where from."""
    shutil.copytree(source, dest)
    config = json.loads((dest / "config.json").read_text())
    config.update(stage=dest.parent.name, item=dest.name, reused_from=str(source))
    (dest / "config.json").write_text(json.dumps(config))


def _side_files(root: Path) -> None:
    """prepare/, perplexity/ and gpu/ files as their stages write them (values plausible)."""
    (root / "prepare").mkdir()
    models = {
        "target": {"name": "tiny-random-qwen2"},
        "draft": {"name": "tiny-random-qwen2-noisy"},
        "scorer": {"name": "tiny-random-qwen2"},
    }
    (root / "prepare" / "models.json").write_text(json.dumps(models))
    rng = np.random.default_rng(0)
    rows = []
    for path in sorted(root.glob("*/*/prompts.jsonl")):
        lossy = json.loads((path.parent / "config.json").read_text())["run"]["method"]["policy"]
        for qid in pd.read_json(path, lines=True)["question_id"]:
            ppl = rng.uniform(6, 9) * (1.3 if lossy == "typical" else 1.0)
            rows.append(
                {
                    "stage": path.parent.parent.name,
                    "item": path.parent.name,
                    "question_id": qid,
                    "tokens": MAX_NEW_TOKENS,
                    "perplexity": ppl,
                }
            )
    (root / "perplexity").mkdir()
    pd.DataFrame(rows).to_csv(root / "perplexity" / "outputs.csv", index=False)
    corpus = [
        {"model": "tiny-random-qwen2", "role": "target", "tokens": 5000, "perplexity": 7.9},
        {"model": "tiny-random-qwen2-noisy", "role": "draft", "tokens": 5000, "perplexity": 9.4},
    ]
    pd.DataFrame(corpus).to_csv(root / "perplexity" / "corpus.csv", index=False)
    (root / "perplexity" / "metrics.json").write_text("{}\n")
    (root / "gpu").mkdir()
    gpu = {
        "device": {"name": "NVIDIA H100 80GB HBM3"},
        "driver": "570.86",
        "torch": "2.11.0",
        "tokens_per_s": 390.0,
        "fraction_of_bandwidth_limit": 0.25,
    }
    (root / "gpu" / "decode.json").write_text(json.dumps(gpu))
    write_hand_results(root)  # experiments/engine/<machine>/*.json as lab bench-engine writes


@pytest.fixture(scope="module")
def experiments(tmp_path_factory: pytest.TempPathFactory, qwen2: LoadedModel) -> Path:
    """A full experiments/ tree: every stage, the perplexity files, prepare and GPU results."""
    root = tmp_path_factory.mktemp("lab") / "experiments"
    build = Builder(root, qwen2)
    build.item("baseline", "target", Method())
    for k in (1, 2, 4):
        build.item("ksweep", f"k{k}", Method("draft_model", "exact", k))
    _reuse(root / "ksweep" / "k4", root / "policies" / "exact")
    build.item("policies", "rejection", Method("draft_model", "rejection", 4))
    # A lossy policy the registry does not have yet: sampled outputs under an unregistered name.
    build.item(
        "policies",
        "typical",
        Method("draft_model", "rejection", 4),
        SamplingParams(1.0, 0, 1.0),
        policy_label="typical",
    )
    _reuse(root / "ksweep" / "k4", root / "drafters" / "draft_model")
    build.item("drafters", "prompt_lookup", Method("prompt_lookup", "exact", 4))
    for name, settings in (("adaptive", {"window": 2, "max_k": 6}), ("heuristic", {})):
        build.item("adaptive", name, Method("draft_model", "exact", 4, name, settings))
    _side_files(root)
    return root


@pytest.fixture(scope="module")
def settings(tmp_path_factory: pytest.TempPathFactory) -> ReportSettings:
    planned = {"target": PARAMS["models"]["target"], "device": "cpu", "dtype": None,
               "prompts": PARAMS["prompts"], "generation": PARAMS["generation"], "seed": 0,
               **PARAMS["run"]}  # fmt: skip
    return ReportSettings(0, 200, PARAMS["models"]["draft"], PARAMS["models"]["scorer"], planned)


@pytest.fixture(scope="module")
def rendered(
    experiments: Path, settings: ReportSettings, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Path, list]:
    reports = tmp_path_factory.mktemp("out") / "reports"
    return reports, render(experiments, reports, settings)


def test_every_table_in_three_formats(rendered: tuple[Path, list[Path]]) -> None:
    reports, _ = rendered
    for name in TABLES:
        for ext in ("md", "tex", "csv"):
            path = reports / "tables" / f"{name}.{ext}"
            assert path.is_file() and path.stat().st_size > 0, path
        assert len(pd.read_csv(reports / "tables" / f"{name}.csv")) > 0, name
        assert "\\toprule" in (reports / "tables" / f"{name}.tex").read_text()


def test_every_figure_is_a_png(rendered: tuple[Path, list[Path]]) -> None:
    reports, _ = rendered
    for name in FIGURES:
        data = (reports / "figures" / f"{name}.png").read_bytes()
        assert data.startswith(b"\x89PNG") and len(data) > 1000, name


def test_report_has_every_section(rendered: tuple[Path, list[Path]]) -> None:
    reports, written = rendered
    text = (reports / "report.md").read_text()
    for heading in HEADINGS:
        assert f"\n## {heading}\n" in text, heading
    assert "No data" not in text
    assert "bonus token included" in text and "(1 - a^(K+1)) / ((1 - a)(cK + 1))" in text
    assert sorted(written) == sorted(p for p in reports.rglob("*") if p.is_file())


def test_plot_data_for_dvc(rendered: tuple[Path, list[Path]]) -> None:
    reports, _ = rendered
    for name, columns in PLOTS.items():
        frame = pd.read_csv(reports / "plots" / f"{name}.csv")
        assert list(frame.columns) == list(columns) and len(frame) > 0, name
    ksweep = pd.read_csv(reports / "plots" / "ksweep.csv")
    assert ksweep["k"].tolist() == [1, 2, 4]
    positions = pd.read_csv(reports / "plots" / "acceptance_by_position.csv")
    assert positions["acceptance"].between(0, 1).all()


def test_methods_name_the_draft_model(rendered: tuple[Path, list[Path]]) -> None:
    reports, _ = rendered
    text = (reports / "report.md").read_text()
    methods = text.split("## Methods\n", 1)[1].split("\n## ", 1)[0]
    # prompt_lookup runs without a draft model: its None must not read as a second draft.
    assert "Target tiny-random-qwen2, draft tiny-random-qwen2-noisy, perplexity" in methods
    assert "None" not in methods


def test_lossy_policy_is_labelled(rendered: tuple[Path, list[Path]]) -> None:
    reports, _ = rendered
    policies = pd.read_csv(reports / "tables" / "policies.csv").set_index("policy")
    assert policies["lossy"].to_dict() == {"exact": False, "rejection": False, "typical": True}
    assert "policies/typical (lossy)" in (reports / "tables" / "predicted.md").read_text()


def test_speedups_come_from_metrics(rendered: tuple[Path, list[Path]], experiments: Path) -> None:
    reports, _ = rendered
    ksweep = pd.read_csv(reports / "tables" / "ksweep.csv").set_index("k")
    metrics = json.loads((experiments / "ksweep" / "k2" / "metrics.json").read_text())
    assert ksweep.loc[2, "speedup"] == pytest.approx(metrics["speedup"])
    assert ksweep.loc[2, "acceptance_rate"] == pytest.approx(metrics["acceptance_rate"])
    shown = (reports / "tables" / "ksweep.md").read_text()
    assert f"{metrics['speedup']:.2f} [{metrics['speedup_ci_low']:.2f}, " in shown


def test_controller_regret(rendered: tuple[Path, list[Path]], experiments: Path) -> None:
    reports, _ = rendered
    table = pd.read_csv(reports / "tables" / "controllers.csv").set_index("configuration")
    speedups = {
        p.parent.name: json.loads(p.read_text())["speedup"]
        for p in experiments.glob("*/*/metrics.json")
        if p.parent.parent.name in ("ksweep", "adaptive")
    }
    best_k = max((1, 2, 4), key=lambda k: speedups[f"k{k}"])
    best = speedups[f"k{best_k}"]
    for name in ("adaptive", "heuristic"):
        row = table.loc[f"adaptive/{name}"]
        assert row["best_fixed_k"] == best_k and row["best_fixed_speedup"] == pytest.approx(best)
        assert row["regret"] == pytest.approx(best / speedups[name] - 1)


def test_categories_pair_with_baseline(rendered: tuple[Path, list[Path]]) -> None:
    reports, _ = rendered
    data = pd.read_csv(reports / "tables" / "categories.csv")
    assert set(data["category"]) == {p.category for p in load_suite("builtin", per_category=1)}
    # One prompt per category: no interval (fewer than 3), the table shows the n instead.
    assert (data["speedup_n"] == 1).all() and data["speedup_ci_low"].isna().all()
    shown = (reports / "tables" / "categories.md").read_text()
    assert shown.count("(n=1)") == len(data) and "[" not in shown.split("\n", 2)[2]


def test_step_breakdown_and_memory(rendered: tuple[Path, list[Path]], experiments: Path) -> None:
    reports, _ = rendered
    table = pd.read_csv(reports / "tables" / "step_breakdown.csv").set_index("configuration")
    item = store.read_item(experiments / "ksweep" / "k2")
    steps = item.steps[item.steps["repetition"] == 0]
    for phase in ("draft_ms", "verify_ms", "accept_ms", "step_ms"):
        assert table.loc["ksweep/k2", phase] == pytest.approx(steps[phase].mean())
    rest = steps["step_ms"] - steps["draft_ms"] - steps["verify_ms"] - steps["accept_ms"]
    assert table.loc["ksweep/k2", "bookkeeping_ms"] == pytest.approx(rest.mean())
    assert table.loc["baseline/target", "draft_ms"] == 0 and table["verify_ms"].gt(0).all()
    assert table.loc["ksweep/k2", "drafter"] == "draft_model"
    memory = pd.read_csv(reports / "tables" / "memory.csv").set_index("stage")
    peaks = [
        json.loads(p.read_text())["peak_rss_mb"] for p in experiments.glob("ksweep/*/metrics.json")
    ]
    assert memory.loc["ksweep", "peak_rss_mb_max"] == pytest.approx(max(peaks))
    assert memory.loc["ksweep", "items"] == 3 and "peak_cuda_mb_max" not in memory


def test_profiled_items_are_named(
    experiments: Path, settings: ReportSettings, tmp_path: Path
) -> None:
    copy = tmp_path / "experiments"
    shutil.copytree(experiments, copy)
    (copy / "ksweep" / "k2" / store.PROFILE).mkdir()
    render(copy, tmp_path / "reports", settings)
    text = (tmp_path / "reports" / "report.md").read_text()
    assert f"`{copy / 'ksweep' / 'k2' / store.PROFILE}`" in text
    assert f"`{copy / 'ksweep' / 'k1' / store.PROFILE}`" not in text


def test_missing_stages_render(experiments: Path, settings: ReportSettings, tmp_path: Path) -> None:
    partial = tmp_path / "experiments"
    shutil.copytree(experiments / "baseline", partial / "baseline")
    shutil.copytree(experiments / "ksweep", partial / "ksweep")
    written = render(partial, tmp_path / "reports", settings)
    text = (tmp_path / "reports" / "report.md").read_text()
    for heading in ("Acceptance policies", "Drafters", "K controllers", "Perplexity", "GPU"):
        section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
        assert section.strip().startswith("_No data:"), heading
    assert (tmp_path / "reports" / "tables" / "ksweep.csv") in written
    assert not (tmp_path / "reports" / "tables" / "policies.csv").exists()
    assert pd.read_csv(tmp_path / "reports" / "plots" / "frontier.csv").empty


def test_main_renders_from_cwd(
    experiments: Path, settings: ReportSettings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shutil.copytree(experiments / "baseline", tmp_path / "experiments" / "baseline")
    monkeypatch.chdir(tmp_path)
    main(settings)
    assert (tmp_path / "reports" / "tables" / "baseline.md").is_file()


def test_empty_experiments_render(settings: ReportSettings, tmp_path: Path) -> None:
    render(tmp_path / "experiments", tmp_path / "reports", settings)
    text = (tmp_path / "reports" / "report.md").read_text()
    assert text.count("_No data:") == len(HEADINGS) - 1  # every section but the methods


def test_rerender_removes_stale_files(
    experiments: Path, settings: ReportSettings, tmp_path: Path
) -> None:
    reports = tmp_path / "reports"
    render(experiments, reports, settings)
    render(tmp_path / "nothing", reports, settings)
    assert not (reports / "tables").exists() and not (reports / "figures").exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"prompts": 6}', "missing metrics"),
        ("[1, 2]", "expected a JSON object"),
    ],
)
def test_malformed_metrics_raise_with_path(
    experiments: Path, settings: ReportSettings, tmp_path: Path, content: str, message: str
) -> None:
    broken = tmp_path / "experiments"
    shutil.copytree(experiments, broken)
    path = broken / "ksweep" / "k2" / "metrics.json"
    path.write_text(content)
    with pytest.raises(ReportError, match=message) as err:
        render(broken, tmp_path / "reports", settings)
    assert str(path) in str(err.value)
    assert not (tmp_path / "reports").exists()  # nothing written before the failure


def test_malformed_steps_raise_with_path(
    experiments: Path, settings: ReportSettings, tmp_path: Path
) -> None:
    broken = tmp_path / "experiments"
    shutil.copytree(experiments / "baseline", broken / "baseline")
    steps = broken / "baseline" / "target" / "steps.csv"
    pd.read_csv(steps).drop(columns=["step_ms"]).to_csv(steps, index=False)
    with pytest.raises(ReportError, match="step_ms") as err:
        render(broken, tmp_path / "reports", settings)
    assert str(steps) in str(err.value)


def test_lossless_table_lists_differences() -> None:
    check = pd.DataFrame(
        {
            "question_id": ["1", "2", "3"],
            "identical": [True, False, True],
            "first_diff": [None, 5, None],
            "logit_margin": [None, 0.0123, None],
            "fork_gap": [None, 0.0123, None],
            "tolerance": [None, 0.0625, None],
            "verdict": ["identical", "numerics", "identical"],
        }
    )
    table = lossless_table({"ksweep/k4": check})
    shown = table.shown.iloc[0]
    assert (shown["identical"], shown["numerics"], shown["violation"]) == ("2", "1", "0")
    assert shown["differing prompts"] == (
        "2 at token 5: numerics (gap 0.012, tolerance 0.062, margin 0.012)"
    )
    assert table.data.iloc[0]["identical"] == 2 and shown["largest tolerance"] == "0.062"


def test_acceptance_by_position_is_conditional() -> None:
    steps = pd.DataFrame({"repetition": 0, "proposed": [2, 2, 1], "accepted": [2, 0, 1]})
    out = stats.acceptance_by_position(steps).set_index("position")
    assert out.loc[1, "acceptance"] == pytest.approx(2 / 3)  # steps 1 and 3 kept position 1
    assert out.loc[2, "acceptance"] == pytest.approx(1 / 2)  # of the two that offered 2


def test_number_formats() -> None:
    assert tables.fmt_ci(1.2345, 1.1, 1.37) == "1.23 [1.10, 1.37]"
    assert [tables.fmt(v) for v in (1234.5, 45.67, 0.456, 0.0123, None, True, 3)] == [
        "1234",
        "45.7",
        "0.46",
        "0.012",
        "n/a",
        "yes",
        "3",
    ]


def test_step_breakdown_by_hand() -> None:
    steps = pd.DataFrame(
        {"draft_ms": [1.0, 3.0], "verify_ms": [2.0, 2.0], "accept_ms": [0.5, 0.5],
         "step_ms": [4.0, 7.0]}
    )  # fmt: skip
    assert stats.step_breakdown(steps) == pytest.approx(
        {"draft_ms": 2.0, "verify_ms": 2.0, "accept_ms": 0.5, "bookkeeping_ms": 1.0, "step_ms": 5.5}
    )


def test_lossless_policies_match_the_registry() -> None:
    # The report keeps its own copy to stay torch-free: a new lossless policy must land there too.
    assert {n for n, spec in POLICIES.items() if spec.lossless} == load.LOSSLESS_POLICIES


def test_noise_floor_and_load_flag(experiments: Path, settings: ReportSettings) -> None:
    results = load_results(experiments)
    base = results.baseline
    assert base is not None and "speedup" in base.metrics  # the A/A pair ran
    # Tiny models time noisily: give every item the same reference speed, then halve one's.
    for item in results.runs:
        item.metrics["reference_tokens_per_s"] = 100.0
    assert not protocol_section(results).tables[0].data["load_changed"].any()
    slowed = results.runs[1]
    slowed.metrics["reference_tokens_per_s"] = 50.0
    section = protocol_section(results)
    assert section.tables[0].data["load_changed"].tolist() == [i is slowed for i in results.runs]
    assert label(slowed) in section.text[1] and "Noise floor" in section.text[-1]
