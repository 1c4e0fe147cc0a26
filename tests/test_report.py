"""reports/ from an experiments/ tree written by the real lab code on tiny random models."""

from __future__ import annotations

import copy
import dataclasses
import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pytest
import torch
import yaml
from dvc_render.vega import VegaRenderer
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.container import ErrorbarContainer

from lab import stats
from lab.engine.model import LoadedModel
from lab.engine.policies import POLICIES
from lab.engine.sampling import SamplingParams
from lab.method import Method
from lab.pipeline import store, suite
from lab.pipeline.lossless import lossless_check
from lab.prompts import CATEGORIES, load_suite
from lab.report import load, tables, vega_specs
from lab.report.figures import (
    MIN_POSITION_STEPS,
    accepted_length_figure,
    ksweep_figure,
    latency_figure,
    position_figure,
    speedup_figure,
)
from lab.report.frames import step_costs
from lab.report.load import ReportError, ReportSettings, label, load_results
from lab.report.plots import PLOTS
from lab.report.render import main, render
from lab.report.sections import gpu_table, lossless_table
from lab.report.sections_speed import drafters_section, predicted_section, protocol_section
from lab.report.sections_trees import trees_section
from lab.report.summary import summary_text
from lab.report.tables import make_table
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
FIGURES = ("speedup", "ksweep", "frontier", "accepted_length", "step_latency",
           "acceptance_by_position", "engine_forward_cost")  # fmt: skip
HEADINGS = (
    "Summary",
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
    gpu = {  # the shape lab bench writes (experiments/gpu/*.json)
        "device": "NVIDIA H100 80GB HBM3",
        "driver": "570.86",
        "torch": "2.11.0",
        "model": "random-qwen2.5-1.5b",
        "dtype": "bfloat16",
        "method": "lab_baseline",
        "cache": "dynamic",
        "k": None,
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
    # A clone where pipelines/trees never ran holds only its items' git-tracked metrics.json.
    # Likewise pipelines/heads' drafters stage.
    for stage, item in (("trees", "medusa-t4"), ("drafters_scale", "eagle")):
        (partial / stage / item).mkdir(parents=True)
        (partial / stage / item / "metrics.json").write_text("{}")
    written = render(partial, tmp_path / "reports", settings)
    text = (tmp_path / "reports" / "report.md").read_text()
    for heading in ("Acceptance policies", "Drafters", "K controllers", "Perplexity", "GPU"):
        section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
        assert section.strip().startswith("_No data:"), heading
    assert "## Tree size" not in text  # shown only where a drafter proposed trees
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
    steps = pd.DataFrame({"repetition": 0, "depth": [2, 2, 1], "accepted": [2, 0, 1]})
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


# --- summary, figures and dvc plots on hand-made frames ----------------------------------------


def _summary_rows(**changes: tuple[float, float]) -> pd.DataFrame:
    """A known table: two lossless K-sweep items below 1, a lossy policy above 1.

    changes: configuration -> (ci_low, ci_high) to move an interval.
    """
    rows = [
        # configuration, lossy, speed-up, CI, predicted, tau, draft, verify, step (decode steps)
        ("ksweep/k2", False, 0.68, 0.58, 0.75, 1.19, 2.42, 0.95, 2.84, 3.80),
        ("ksweep/k4", False, 0.82, 0.70, 0.95, 0.93, 3.26, 1.48, 2.65, 4.13),
        ("policies/typical (lossy)", True, 1.10, 1.02, 1.17, 1.12, 4.23, 1.40, 2.36, 3.78),
    ]
    frame = pd.DataFrame(rows, columns=["configuration", "lossy", "speedup", "speedup_ci_low",
                                        "speedup_ci_high", "predicted_speedup",
                                        "mean_accepted_length", "draft_cost", "verify_cost",
                                        "step_cost"])  # fmt: skip
    frame.insert(5, "speedup_n", 18)
    for name, (low, high) in changes.items():
        frame.loc[frame["configuration"] == name, ["speedup_ci_low", "speedup_ci_high"]] = [
            low,
            high,
        ]
    return frame


FLOOR = (1.0, 0.97, 1.03, 18)


def test_summary_names_the_best_configurations_with_their_intervals() -> None:

    text = summary_text(_summary_rows(), FLOOR)
    assert "The best lossless configuration is ksweep/k4 at a speed-up of 0.82 [0.70, 0.95]" in text
    assert "slower than the baseline" in text
    assert "The best overall is policies/typical (lossy) at 1.10 [1.02, 1.17]" in text
    assert "Only policies/typical (lossy) beats the baseline" in text
    assert "Every lossless configuration (2) is slower than the baseline" in text
    assert "(A/A) gives 1.00 [0.97, 1.03]" in text
    assert "No configuration beats the baseline" not in text


def test_summary_says_when_no_configuration_beats_the_baseline() -> None:

    text = summary_text(_summary_rows(**{"policies/typical (lossy)": (0.98, 1.2)}), FLOOR)
    assert "No configuration beats the baseline" in text
    assert "Only " not in text
    # A lossless configuration whose interval holds 1 is neither slower nor faster.
    text = summary_text(_summary_rows(**{"ksweep/k4": (0.7, 1.05)}), None)
    assert (
        "Of the 2 lossless configurations, 1 is slower (interval below 1) and 1 is within " in text
    )
    assert "No A/A run of the baseline" in text


def test_summary_gives_the_measured_reason_when_prediction_disagrees() -> None:

    text = summary_text(_summary_rows(), FLOOR)
    # k2 (1.19 outside [0.58, 0.75]) and typical (1.12 outside [1.02, 1.17]? no: inside) ...
    assert "disagree for 1 of 3 configurations" in text
    # ... so the reason is read from ksweep/k2, the best lossless one that disagrees.
    assert "for ksweep/k2: a verify step costs 2.84x a decode step" in text
    assert "emits tau = 2.42 tokens, so tau / cost = 0.64 against the measured 0.68" in text
    agree = _summary_rows()
    agree["predicted_speedup"] = agree["speedup"]
    assert "lies within its measured interval" in summary_text(agree, FLOOR)


def _item(stage: str, name: str, steps: pd.DataFrame, rows: pd.DataFrame | None = None) -> Any:
    config = {"run": {"method": {"drafter": "draft_model", "policy": "exact", "k": 4}}}
    rows = pd.DataFrame({"question_id": ["1"], "repetition": [0]}) if rows is None else rows
    return store.Item(Path(stage) / name, config, rows, steps.assign(repetition=0), {})


def test_step_costs_divide_by_the_baselines_decode_step() -> None:

    base = _item("baseline", "target", pd.DataFrame({"verify_ms": [90.0, 110.0]}))
    steps = pd.DataFrame({"draft_ms": [40.0, 60.0], "verify_ms": [250.0, 280.0],
                          "step_ms": [300.0, 350.0]})  # fmt: skip
    costs = step_costs(_item("ksweep", "k4", steps), base)
    assert costs == pytest.approx({"draft_cost": 0.5, "verify_cost": 2.65, "step_cost": 3.25})
    # The item's own interleaved reference, where it has one, is the decode step (as c's).
    rows = pd.DataFrame({"question_id": ["1", "2"], "repetition": 0, "ref_decode_ms": [50.0, 150.0],
                         "new_tokens": 1, "total_ms": 1.0})  # fmt: skip
    assert step_costs(_item("ksweep", "k4", steps, rows), base)["verify_cost"] == pytest.approx(
        2.65
    )
    rows["ref_decode_ms"] = [200.0, 200.0]
    assert step_costs(_item("ksweep", "k4", steps, rows), None)["verify_cost"] == pytest.approx(
        1.325
    )


def _spec_item(name: str, proposed: int, depth: int) -> Any:
    """A speculative item of 2 prompts x 2 steps, tau 2.5, each step draft 20 + verify 230 ms,
    whose interleaved reference decodes a token in 100 ms; speed-up 2.0 in its metrics."""
    steps = pd.DataFrame({"question_id": ["1", "1", "2", "2"], "step": [0, 1, 0, 1],
                          "proposed": proposed, "depth": depth, "accepted": [2, 1, 1, 2],
                          "emitted": [3, 2, 2, 3], "draft_ms": 20.0, "verify_ms": 230.0,
                          "step_ms": 260.0})  # fmt: skip
    rows = pd.DataFrame({"question_id": ["1", "2"], "repetition": 0, "ref_decode_ms": 100.0,
                         "new_tokens": 5, "total_ms": 1.0})  # fmt: skip
    item = _item("drafters", name, steps, rows)
    item.metrics.update(mean_k=depth, acceptance_rate=6 / (4 * depth), mean_accepted_length=2.5,
                        tokens_per_s=1.0, speedup=2.0, speedup_ci_low=1.8, speedup_ci_high=2.2,
                        speedup_n=2, throughput_ratio=2.0, greedy_match_rate=1.0, cost_ratio=0.2,
                        prompts=2, predicted_speedup=1.6)  # fmt: skip
    return item


def test_predicted_section_cost_model_by_hand(settings: ReportSettings) -> None:
    chain, tree = _spec_item("chain", proposed=4, depth=4), _spec_item("tree", proposed=16, depth=3)
    items = {"drafters": [chain, tree]}
    results = load.Results(items, None, None, None, None, None, pd.DataFrame())
    data = predicted_section(results, settings).tables[0].data.set_index("configuration")
    # draft 20 / 100 = 0.2 and verify 230 / 100 = 2.3 decode steps; the whole step 260 / 100 =
    # 2.6 (bookkeeping included): tau / cost = 2.5 / 2.6, and measured 2.0 over that = 2.08
    assert data["draft_cost"].tolist() == pytest.approx([0.2, 0.2])
    assert data["verify_cost"].tolist() == pytest.approx([2.3, 2.3])
    assert data["step_cost"].tolist() == pytest.approx([2.6, 2.6])
    assert data["predicted_from_costs"].tolist() == pytest.approx([2.5 / 2.6] * 2)
    assert data["measured_over_costs"].tolist() == pytest.approx([2.08, 2.08])
    # Leviathan's chain formula: kept for the chain (2.0 / 1.6), none for the tree
    assert data.loc["drafters/chain", "measured_over_predicted"] == pytest.approx(1.25)
    assert pd.isna(data.loc["drafters/tree", "predicted_speedup"])


def test_accepted_length_shares_sum_to_one_per_drafter() -> None:
    from lab.report.frames import accepted_length

    many = _item("drafters", "draft_model", pd.DataFrame({"emitted": [1, 2, 2, 5, 5, 5, 3, 1]}))
    few = _item("drafters", "prompt_lookup", pd.DataFrame({"emitted": [1, 1, 2]}))
    hist = accepted_length([many, few])
    assert hist.groupby("drafter")["share"].sum().tolist() == pytest.approx([1.0, 1.0])
    assert hist.set_index(["drafter", "emitted"]).loc[("drafters/draft_model", 5), "share"] == 3 / 8
    ax = accepted_length_figure(hist).axes[0]
    heights = [sum(bar.get_height() for bar in bars) for bars in ax.containers]
    assert heights == pytest.approx([1.0, 1.0])  # one bar group per drafter, never stacked


def _dvc_plots() -> dict[str, dict[str, Any]]:
    dvc_yaml = yaml.safe_load((Path(__file__).parents[1] / "dvc.yaml").read_text())
    return {name: spec for plot in dvc_yaml["plots"] for name, spec in plot.items()}


def _filled(name: str, definition: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The vega-lite spec dvc-render makes of a dvc.yaml plot over a row of its CSV's columns."""

    ((path, y),) = definition["y"].items()
    columns = list(PLOTS[Path(path).stem])
    row = {c: "1" for c in columns} | {"rev": "workspace"}
    props = {k: v for k, v in definition.items() if k != "y"} | {"y": y}
    renderer = VegaRenderer([row], name, template_dir=str(vega_specs.FOLDER), **props)
    return renderer.get_filled_template(), columns


def test_dvc_plots_read_only_existing_columns_and_carry_labels() -> None:
    for name, definition in _dvc_plots().items():
        spec, columns = _filled(name, definition)
        text = json.dumps(spec)
        assert "<DVC_METRIC" not in text.replace("<DVC_METRIC_DATA>", ""), name
        read = set(re.findall(r"datum\['([^']+)'\]", text))
        assert read and read <= set(columns), (name, read - set(columns))
        for key in ("title", "x_label", "y_label"):
            assert definition.get(key) and definition[key] != "y", (name, key)
        assert definition["x_label"] in text and definition["y_label"] in text, name


def test_speedup_vs_k_draws_the_ci_columns_with_integer_k_ticks() -> None:
    plots = _dvc_plots()
    assert {"speedup", "speedup_ci_low", "speedup_ci_high", "predicted_speedup"} <= set(
        PLOTS["ksweep"]
    )
    for name in ("speedup_vs_k", "acceptance_vs_k"):
        spec, _ = _filled(name, plots[name])
        text = json.dumps(spec)
        y = next(iter(plots[name]["y"].values()))
        assert f"datum['{y}_ci_low']" in text and f"datum['{y}_ci_high']" in text, name
        axes = [layer["encoding"]["x"] for layer in spec["layer"] if "x" in layer["encoding"]]
        assert axes and all(a["axis"] == {"tickMinStep": 1, "format": "d"} for a in axes), name
    spec, _ = _filled("speedup_vs_k", plots["speedup_vs_k"])
    assert "datum['predicted_speedup']" in json.dumps(spec)


def test_every_speedup_plot_shows_its_interval() -> None:
    for name, definition in _dvc_plots().items():
        text = json.dumps(_filled(name, definition)[0])
        if "speedup" in (definition["x"], *definition["y"].values()):
            assert "datum['speedup_ci_low']" in text and "datum['speedup_ci_high']" in text, name
    spec, _ = _filled("accepted_length_histogram", _dvc_plots()["accepted_length_histogram"])
    assert spec["layer"][0]["encoding"]["xOffset"]["field"] == "drafter"  # side by side


def test_committed_vega_templates_match_the_code() -> None:
    for name, spec in vega_specs.templates().items():
        assert (vega_specs.FOLDER / f"{name}.json").read_text() == vega_specs.text(spec), name


def _ksweep_frame() -> pd.DataFrame:
    return pd.DataFrame({"k": [1, 2, 4], "speedup": [0.8, 0.7, 0.6],
                         "speedup_ci_low": [0.65, 0.57, None], "speedup_ci_high": [1.0, 0.8, None],
                         "predicted_speedup": [0.9, 0.7, 0.5], "acceptance_rate": [0.7, 0.6, 0.5],
                         "acceptance_rate_ci_low": [0.5, 0.4, 0.3],
                         "acceptance_rate_ci_high": [0.9, 0.8, 0.7]})  # fmt: skip


def test_ksweep_figure_ticks_integer_k_and_draws_the_interval() -> None:

    fig = ksweep_figure(_ksweep_frame())
    for ax in fig.axes:
        assert list(ax.get_xticks()) == [1, 2, 4]
        assert ax.get_xlabel() and ax.get_ylabel()
    (bars,) = [c for c in fig.axes[0].containers if isinstance(c, ErrorbarContainer)]
    segments = bars.lines[2][0].get_segments()
    assert [tuple(np.round(s[:, 1], 2)) for s in segments[:2]] == [(0.65, 1.0), (0.57, 0.8)]


def test_speedup_figure_shows_each_interval_and_the_noise_floor() -> None:

    ax = speedup_figure(_summary_rows(), (0.97, 1.03)).axes[0]
    bars = [c for c in ax.containers if isinstance(c, ErrorbarContainer)]
    ends = sorted(tuple(np.round(s[:, 0], 2)) for b in bars for s in b.lines[2][0].get_segments())
    assert ends == [(0.58, 0.75), (0.7, 0.95), (1.02, 1.17)]
    assert [t.get_text() for t in ax.get_yticklabels()] == list(_summary_rows()["configuration"])
    assert "noise floor (A/A 95% CI)" in ax.get_legend_handles_labels()[1]


def test_position_figure_styles_apart_and_drops_thin_positions() -> None:

    rows = [
        {"configuration": f"c{n}", "position": i, "proposed": 40 - 10 * i, "acceptance": 0.5}
        for n in range(11)
        for i in (1, 2, 3, 4)
    ]  # proposed 30, 20, 10, 0: position 4 rests on too few steps
    ax = position_figure(pd.DataFrame(rows)).axes[0]
    lines = [line for line in ax.get_lines() if not str(line.get_label()).startswith("_")]
    assert len(lines) == 11
    looks = {(line.get_color(), line.get_marker(), line.get_linestyle()) for line in lines}
    assert len(looks) == 11  # 11 series on a 10-colour cycle, still told apart
    assert all(np.asarray(line.get_xdata()).tolist() == [1, 2, 3] for line in lines)
    assert MIN_POSITION_STEPS == 10


def test_latency_figure_labels_several_log_ticks() -> None:

    # Decade ticks label one (1000) on the first range; 1-2-5 ticks only two (2, 5) on the second.
    for low, high in ((400.0, 2700.0), (1.5, 6.0), (1.2, 1.9), (0.5, 900.0)):
        fig = latency_figure({"a": pd.Series(np.geomspace(low, high, 50))})
        FigureCanvasAgg(fig).draw()
        ax = fig.axes[0]
        lo, hi = ax.get_xlim()
        shown = [t for t in ax.xaxis.get_majorticklocs() if lo <= t <= hi]
        labels = [t.get_text() for t in ax.get_xticklabels() if t.get_text()]
        assert len(shown) >= 3 and len(labels) >= 3, (low, high, labels)


def test_gpu_table_is_one_row_per_method_and_device() -> None:

    base = {"model": "m", "dtype": "bfloat16", "driver": "1", "tokens_per_s": 10.0}
    files = [
        {**base, "device": "H200", "method": "lab_baseline", "cache": "dynamic", "k": None},
        {**base, "device": "H200", "method": "oracle", "cache": "dynamic", "k": 4, "speedup": 3.0},
        {**base, "device": "H200", "method": "oracle", "cache": "static", "k": 4, "speedup": 4.0},
        {**base, "device": "H200", "method": "oracle", "cache": "dynamic", "k": 1, "speedup": 1.7},
        {**base, "device": "H200", "method": "oracle", "cache": "dynamic", "k": 8, "speedup": 6.5},
        {**base, "device": "EPYC", "method": "oracle", "cache": "dynamic", "k": 8, "speedup": 2.0},
        {**base, "device": "EPYC", "method": "oracle", "cache": "dynamic", "k": 4, "speedup": 2.2},
    ]
    table = gpu_table(pd.DataFrame(files))
    keys = list(zip(table["device"], table["method"], table["cache"], strict=True))
    assert keys == [("H200", "lab_baseline", "dynamic"), ("H200", "oracle", "dynamic"),
                    ("H200", "oracle", "static"), ("EPYC", "oracle", "dynamic")]  # fmt: skip
    assert table["speedup"].tolist()[1:] == [3.0, 4.0, 2.2]  # the default K (4), not the sweep
    assert "driver" not in table and table["k"].tolist()[1:] == [4, 4, 4]


def test_gpu_table_counts_verdicts_in_whole_prompts() -> None:
    """Files from before `lab bench` classified forks have no counts: n/a there, integers here."""
    base = {"device": "H200", "model": "m", "dtype": "bfloat16", "cache": "static"}
    files = [
        {**base, "method": "old", "identical": False},
        {**base, "method": "new", "identical": False, "numerics": 6.0, "violation": 0.0},
    ]
    table = make_table("gpu", "GPU", gpu_table(pd.DataFrame(files)))
    assert table.shown["numerics"].tolist() == ["n/a", "6"]
    assert table.shown["violation"].tolist() == ["n/a", "0"]


def test_drafters_section_shows_scaled_heads_beside_the_default(settings: ReportSettings) -> None:
    """pipelines/heads' drafters_scale items are rows of the Drafters table, after the default
    run's own, and only then is the note on them shown."""
    default = _tree_item("drafters", "eagle", 4, proposed=4, depth=3, speedup=1.0)
    scaled = _tree_item("drafters_scale", "eagle", 4, proposed=4, depth=3, speedup=1.3)
    scaled = dataclasses.replace(scaled, path=Path("drafters_scale") / "eagle")
    both = load.Results({"drafters": [default], "drafters_scale": [scaled]}, None, None, None,
                        None, None, pd.DataFrame())  # fmt: skip
    section = drafters_section(both, settings)
    data = section.tables[0].data
    assert data["configuration"].tolist() == ["drafters/eagle-t4", "drafters_scale/eagle"]
    assert data["speedup"].tolist() == pytest.approx([1.0, 1.3])
    assert any("drafters_scale/<kind>" in line for line in section.text)
    alone = drafters_section(load.Results({"drafters": [default]}, None, None, None, None, None,
                                          pd.DataFrame()), settings)  # fmt: skip
    assert alone.tables[0].data["configuration"].tolist() == ["drafters/eagle-t4"]
    assert not any("drafters_scale" in line for line in alone.text)


def test_steps_written_before_trees_read_with_depth(experiments: Path, tmp_path: Path) -> None:
    """A chain's steps.csv without the depth column (written before token trees) reads as depth
    = proposed, so committed results stay readable; a new one keeps its own depth."""
    item = store.read_item(experiments / "ksweep" / "k2")
    old = tmp_path / "k2"
    shutil.copytree(item.path, old)
    item.steps.drop(columns="depth").to_csv(old / store.STEPS, index=False)
    read = store.read_item(old).steps
    assert list(read.columns) == list(item.steps.columns)
    assert (read["depth"] == read["proposed"]).all() and read["proposed"].gt(0).any()
    pd.testing.assert_frame_equal(read, item.steps)


def _tree_item(stage: str, drafter: str, size: int, proposed: int, depth: int, speedup: float,
               reused: bool = False) -> Any:  # fmt: skip
    """A _spec_item (tau 2.5, step 260 ms against a 100 ms decode) of a drafter with a tree."""
    item = _spec_item(f"{drafter}-t{size}", proposed, depth)
    item.config["run"]["method"].update(drafter=drafter, drafter_params={"tree_size": size})
    item.metrics.update(speedup=speedup, speedup_ci_low=speedup - 0.1,
                        speedup_ci_high=speedup + 0.1)  # fmt: skip
    if reused:
        item.config["reused_from"] = "drafters/x"
    return dataclasses.replace(item, path=Path(stage) / item.path.name)


def test_trees_section_by_hand(settings: ReportSettings) -> None:
    items = {
        "drafters": [_tree_item("drafters", "medusa", 16, proposed=16, depth=3, speedup=0.8),
                     _spec_item("draft_model", proposed=4, depth=4)],  # no tree: left out
        "trees": [_tree_item("trees", "medusa", 4, proposed=4, depth=2, speedup=1.1),
                  _tree_item("trees", "eagle", 8, proposed=8, depth=3, speedup=0.9),
                  _tree_item("trees", "medusa", 16, 16, 3, 0.8, reused=True)],  # a copy
    }  # fmt: skip
    results = load.Results(items, None, None, None, None, None, pd.DataFrame())
    section = trees_section(results, settings)
    data = section.tables[0].data
    # by drafter, then size; the reused copy of drafters' medusa-t16 appears once
    assert list(zip(data["drafter"], data["tree_size"], strict=True)) == [
        ("eagle", 8), ("medusa", 4), ("medusa", 16)
    ]  # fmt: skip
    assert data["nodes"].tolist() == [8.0, 4.0, 16.0] and data["depth"].tolist() == [3, 2, 3]
    assert data["speedup"].tolist() == pytest.approx([0.9, 1.1, 0.8])
    # tau 2.5 over a step of 260 / 100 decode steps
    assert data["predicted_from_costs"].tolist() == pytest.approx([2.5 / 2.6] * 3)
    assert [name for name, _, _ in section.figures] == ["trees"]
    empty = trees_section(load.Results({}, None, None, None, None, None, pd.DataFrame()), settings)
    assert not empty.tables and "no drafter with a tree_size" in empty.text[0]
