"""Tables and figures in reports/ from experiments/ alone: reads records, never loads a model."""

from __future__ import annotations

import json
import math
import platform
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import psutil
from matplotlib.figure import Figure
from matplotlib.ticker import MaxNLocator, NullFormatter, ScalarFormatter

from lab import stats as summary
from lab.engine.policies import POLICIES
from lab.pipeline import params as P
from lab.pipeline import profiling, store
from lab.pipeline.store import Item

# Stages whose items are decoding runs, in report order.
STAGES = ("baseline", "ksweep", "policies", "drafters", "adaptive")
LIBRARIES = ("torch", "transformers", "dvc", "mlflow", "pandas")
MISSING = "n/a"

# What read_item's frames and metrics.json must carry for the report to mean anything.
ROW_COLUMNS = ("question_id", "category", "repetition", "new_tokens", "total_ms",
               "ttft_ms", "token_ids")  # fmt: skip
STEP_COLUMNS = ("question_id", "repetition", "step", "k", "proposed", "accepted",
                "emitted", "draft_ms", "verify_ms", "step_ms")  # fmt: skip
METRIC_KEYS = ("prompts", "new_tokens", "tokens_per_s", "ttft_ms", "peak_rss_mb",
               "acceptance_rate", "mean_accepted_length", "mean_k")  # fmt: skip
SPEC_METRIC_KEYS = ("speedup", "speedup_ci_low", "speedup_ci_high", "throughput_ratio",
                    "greedy_match_rate", "cost_ratio")  # fmt: skip
LOSSLESS_COLUMNS = ("question_id", "identical", "first_diff", "logit_margin")
OUTPUTS_COLUMNS = ("stage", "item", "question_id", "tokens", "perplexity")
CORPUS_COLUMNS = ("model", "role", "tokens", "perplexity")

# Data files for `dvc plots`: always written (header only without data) so DVC finds them.
PLOTS: dict[str, tuple[str, ...]] = {
    "ksweep": ("k", "speedup", "speedup_ci_low", "speedup_ci_high", "acceptance_rate",
               "acceptance_rate_ci_low", "acceptance_rate_ci_high", "mean_accepted_length",
               "predicted_speedup"),
    "speedup": ("configuration", "speedup", "speedup_ci_low", "speedup_ci_high",
                "predicted_speedup"),
    "frontier": ("configuration", "policy", "lossy", "perplexity", "speedup"),
    "accepted_length": ("drafter", "emitted", "steps", "share"),
    "acceptance_by_position": ("configuration", "position", "proposed", "acceptance"),
}  # fmt: skip

# Table headers; raw column names (CSV) not listed here are shown as they are.
HEADERS = {
    "configuration": "configuration",
    "k": "K",
    "mean_k": "mean K",
    "prompts": "prompts",
    "new_tokens": "new tokens",
    "tokens_per_s": "tokens/s",
    "ttft_ms": "TTFT (ms)",
    "step_ms_median": "median step (ms)",
    "step_ms_p90": "p90 step (ms)",
    "peak_rss_mb": "peak RSS (MB)",
    "peak_cuda_mb": "peak CUDA (MB)",
    "acceptance_rate": "acceptance",
    "mean_accepted_length": "tau",
    "speedup": "speed-up",
    "throughput_ratio": "throughput ratio",
    "greedy_match_rate": "greedy match",
    "cost_ratio": "c",
    "predicted_speedup": "predicted",
    "measured_over_predicted": "measured / predicted",
    "perplexity": "perplexity",
    "pooled_perplexity": "pooled perplexity",
    "controller_params": "settings",
    "best_fixed_k": "best fixed K",
    "best_fixed_speedup": "best fixed-K speed-up",
    "regret": "regret",
    "regret_oracle": "regret (per-prompt best K, time)",
    "draft_ms": "draft (ms)",
    "verify_ms": "verify (ms)",
    "accept_ms": "accept + rollback (ms)",
    "bookkeeping_ms": "bookkeeping (ms)",
    "step_ms": "step (ms)",
    "peak_rss_mb_max": "peak RSS, max over items (MB)",
    "peak_cuda_mb_max": "peak CUDA, max over items (MB)",
}


class ReportError(ValueError):
    """A file under experiments/ that is malformed or missing a field the report needs."""


@dataclass
class Table:
    """One table: numbers for the CSV, formatted strings for markdown and LaTeX."""

    name: str
    caption: str
    data: pd.DataFrame
    shown: pd.DataFrame


@dataclass
class Section:
    """One report section: paragraphs, tables and figures (name, figure, caption)."""

    title: str
    text: list[str] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)
    figures: list[tuple[str, Figure, str]] = field(default_factory=list)


@dataclass
class Results:
    """Everything under experiments/ the report reads."""

    items: dict[str, list[Item]]  # stage -> items, in display order
    models: dict[str, Any] | None  # prepare/models.json
    outputs_ppl: pd.DataFrame | None  # perplexity/outputs.csv
    corpus_ppl: pd.DataFrame | None  # perplexity/corpus.csv
    gpu: pd.DataFrame | None  # gpu/*.json, one row per file

    @property
    def baseline(self) -> Item | None:
        found = self.items.get("baseline", [])
        return found[0] if found else None

    @property
    def runs(self) -> list[Item]:
        """Every item that ran its own generations (reused copies would repeat a row)."""
        return [i for s in STAGES for i in self.items.get(s, []) if "reused_from" not in i.config]

    @property
    def speculative(self) -> list[Item]:
        return [i for i in self.runs if not _is_baseline(i)]


@dataclass(frozen=True)
class Settings:
    """The params the report itself uses."""

    seed: int
    bootstrap_samples: int


# --- reading experiments/ ------------------------------------------------------------------------


def _setting(params: dict[str, Any], key: str) -> Any:
    """params['a']['b'] for 'a.b'; a missing key names itself."""
    node: Any = params
    for part in key.split("."):
        if not isinstance(node, dict) or part not in node:
            raise ReportError(f"params: missing key {key!r}")
        node = node[part]
    return node


def _read_json(path: Path) -> Any:
    """Parsed JSON; a parse error names the file."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as err:
        raise ReportError(f"{path}: not valid JSON: {err}") from err


def _require(path: Path, have: Any, keys: tuple[str, ...], what: str) -> None:
    """Fail naming the file and the missing keys or columns."""
    missing = [k for k in keys if k not in have]
    if missing:
        raise ReportError(f"{path}: missing {what} {', '.join(missing)}")


def _check_metrics(path: Path, metrics: Any, speculative: bool) -> None:
    """metrics.json must be an object of numbers (None where a metric does not apply)."""
    if not isinstance(metrics, dict):
        raise ReportError(f"{path}: expected a JSON object, got {type(metrics).__name__}")
    keys = METRIC_KEYS + (SPEC_METRIC_KEYS if speculative else ())
    _require(path, metrics, keys, "metrics")
    for key, value in metrics.items():
        if value is not None and (isinstance(value, bool) or not isinstance(value, int | float)):
            raise ReportError(f"{path}: metric {key!r} must be a number, got {value!r}")
    if speculative and metrics["speedup"] is None:
        raise ReportError(f"{path}: metric 'speedup' is null for a speculative configuration")


def read(path: Path) -> Item:
    """One item via store.read_item, checked so that a malformed file names itself."""
    config = _read_json(path / store.CONFIG)
    if not isinstance(config, dict) or not isinstance(config.get("run"), dict):
        raise ReportError(f"{path / store.CONFIG}: expected an object with a 'run' object")
    method = config["run"].get("method")
    if not isinstance(method, dict):
        raise ReportError(f"{path / store.CONFIG}: missing run.method")
    _require(path / store.CONFIG, method, ("drafter", "policy", "k", "controller"), "keys")
    metrics_path = path / store.METRICS
    _check_metrics(metrics_path, _read_json(metrics_path), method["drafter"] != "none")
    try:
        item = store.read_item(path)
    except (OSError, ValueError) as err:  # pandas parse errors are ValueErrors without the path
        raise ReportError(f"{path}: cannot read item: {err}") from err
    _require(path / store.PROMPTS, item.rows.columns, ROW_COLUMNS, "columns")
    _require(path / store.STEPS, item.steps.columns, STEP_COLUMNS, "columns")
    return item


def _csv(path: Path, columns: tuple[str, ...]) -> pd.DataFrame | None:
    """A CSV with the given columns, or None when the file is absent."""
    if not path.exists():
        return None
    try:
        frame = pd.read_csv(path, dtype={"question_id": str, "item": str})
    except (OSError, ValueError) as err:
        raise ReportError(f"{path}: cannot read CSV: {err}") from err
    _require(path, frame.columns, columns, "columns")
    return frame


def _gpu(folder: Path) -> pd.DataFrame | None:
    """experiments/gpu/*.json flattened, one row per file."""
    files = sorted(folder.glob("*.json"))
    rows = []
    for path in files:
        data = _read_json(path)
        if not isinstance(data, dict):
            raise ReportError(f"{path}: expected a JSON object")
        rows.append({"file": path.stem, **pd.json_normalize(data).iloc[0].to_dict()})
    return pd.DataFrame(rows) if rows else None


def load(experiments: Path) -> Results:
    """Every item and side file present under experiments/ (absent stages are simply missing)."""
    items: dict[str, list[Item]] = {}
    for stage in STAGES:
        folder = experiments / stage
        if folder.is_dir():
            # Dot-folders are write_item's temporaries and leftovers, never results.
            paths = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
            items[stage] = sorted((read(p) for p in paths), key=_order)
    models_path = experiments / "prepare" / "models.json"
    models = _read_json(models_path) if models_path.exists() else None
    if models is not None and not isinstance(models, dict):
        raise ReportError(f"{models_path}: expected a JSON object")
    return Results(
        items=items,
        models=models,
        outputs_ppl=_csv(experiments / "perplexity" / "outputs.csv", OUTPUTS_COLUMNS),
        corpus_ppl=_csv(experiments / "perplexity" / "corpus.csv", CORPUS_COLUMNS),
        gpu=_gpu(experiments / "gpu"),
    )


# --- item properties -------------------------------------------------------------------------


def _method(item: Item) -> dict[str, Any]:
    method: dict[str, Any] = item.config["run"]["method"]
    return method


def _is_baseline(item: Item) -> bool:
    return bool(_method(item)["drafter"] == "none")


def _order(item: Item) -> tuple[int, str]:
    """By K, then by name: the K sweep in K order, other stages (one K) by name."""
    return int(_method(item)["k"]), item.path.name


def is_lossy(item: Item) -> bool:
    """True unless the policy is registered as lossless (unknown ones are never claimed so)."""
    spec = POLICIES.get(_method(item)["policy"])
    return spec is None or not spec.lossless


def label(item: Item) -> str:
    """stage/item, marked when the configuration is lossy."""
    name = _stage_item(item.path)
    return f"{name} (lossy)" if not _is_baseline(item) and is_lossy(item) else name


def _stage_item(path: Path) -> str:
    return f"{path.parent.name}/{path.name}"


def _first(frame: pd.DataFrame) -> pd.DataFrame:
    """First repetition only: per-step statistics in metrics.json use it too."""
    return frame[frame["repetition"] == 0]


# --- formatting ------------------------------------------------------------------------------


def _is_missing(value: Any) -> bool:
    return value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value))


def fmt(value: Any) -> str:
    """A table cell: 2-3 significant decimals for floats, yes/no for flags, n/a when missing."""
    if _is_missing(value):
        return MISSING
    if isinstance(value, bool | np.bool_):
        return "yes" if value else "no"
    if isinstance(value, int | np.integer):
        return str(value)
    if isinstance(value, float | np.floating):
        size = abs(float(value))
        if size >= 100:
            return f"{value:.0f}"
        if size >= 10:
            return f"{value:.1f}"
        return f"{value:.2f}" if size == 0 or size >= 0.1 else f"{value:.2g}"
    return str(value)


def fmt_ci(mid: Any, low: Any, high: Any) -> str:
    """'1.23 [1.10, 1.37]'; n/a when the estimate is missing."""
    if _is_missing(mid):
        return MISSING
    if _is_missing(low) or _is_missing(high):
        return f"{mid:.2f}"
    return f"{mid:.2f} [{low:.2f}, {high:.2f}]"


def ci(column: str) -> list[str]:
    """A column and its 95% interval bounds, which make_table shows as one cell."""
    return [column, f"{column}_ci_low", f"{column}_ci_high"]


def header(column: str, with_ci: bool = False) -> str:
    """The shown header of a raw column, marked when it carries a confidence interval."""
    return HEADERS.get(column, column) + (" [95% CI]" if with_ci else "")


def make_table(name: str, caption: str, data: pd.DataFrame) -> Table:
    """Format a numeric table: x, x_ci_low, x_ci_high become one 'x [low, high]' column."""
    shown = pd.DataFrame(index=data.index)
    for column in data.columns:
        if column.endswith(("_ci_low", "_ci_high")):
            continue
        low, high = f"{column}_ci_low", f"{column}_ci_high"
        if low in data.columns:
            cells = [fmt_ci(*t) for t in zip(data[column], data[low], data[high], strict=True)]
            shown[header(column, with_ci=True)] = cells
        else:
            shown[header(column)] = [fmt(v) for v in data[column]]
    return Table(name, caption, data, shown.reset_index(drop=True))


def _write_table(table: Table, folder: Path) -> list[Path]:
    """tables/<name>.md (pipe table), .tex (booktabs) and .csv (unformatted numbers)."""
    folder.mkdir(parents=True, exist_ok=True)
    md, tex, csv = (folder / f"{table.name}.{ext}" for ext in ("md", "tex", "csv"))
    md.write_text(_markdown(table.shown) + "\n")
    # to_latex renders through Styler with booktabs rules; escape keeps '_' and '%' literal.
    columns = "l" + "r" * (len(table.shown.columns) - 1)  # names left, numbers right
    latex = table.shown.to_latex(
        index=False,
        escape=True,
        column_format=columns,
        caption=table.caption,
        label=f"tab:{table.name}",
    )
    tex.write_text(latex)
    table.data.to_csv(csv, index=False)
    return [md, tex, csv]


def _markdown(shown: pd.DataFrame) -> str:
    """Pipe table; numparse off so tabulate keeps '1.20' as written instead of '1.2'."""
    return shown.to_markdown(index=False, disable_numparse=True)


# --- sections --------------------------------------------------------------------------------


def _none(what: str) -> str:
    """The one line a section without data shows."""
    return f"_No data: {what}._"


def _spec_row(item: Item, settings: Settings) -> dict[str, Any]:
    """The columns every speculative table draws from (metrics.json plus an acceptance CI)."""
    m = item.metrics
    acc = (
        summary.acceptance_ci(item.steps, settings.seed, settings.bootstrap_samples)
        if m["acceptance_rate"] is not None
        else (None, None, None)
    )
    return {
        "configuration": label(item),
        "k": int(_method(item)["k"]),
        "mean_k": m["mean_k"],
        "acceptance_rate": m["acceptance_rate"],
        "acceptance_rate_ci_low": acc[1],
        "acceptance_rate_ci_high": acc[2],
        "mean_accepted_length": m["mean_accepted_length"],
        "tokens_per_s": m["tokens_per_s"],
        "speedup": m["speedup"],
        "speedup_ci_low": m["speedup_ci_low"],
        "speedup_ci_high": m["speedup_ci_high"],
        "throughput_ratio": m["throughput_ratio"],
        "greedy_match_rate": m["greedy_match_rate"],
        "cost_ratio": m["cost_ratio"],
        "predicted_speedup": m.get("predicted_speedup"),
    }


def _spec_frame(items: list[Item], settings: Settings, columns: list[str]) -> pd.DataFrame:
    return pd.DataFrame([_spec_row(i, settings) for i in items])[columns]


def methods_section(results: Results, params: dict[str, Any], settings: Settings) -> Section:
    """Hardware, software, models, prompts, generation settings and metric definitions."""
    items = [i for s in STAGES for i in results.items.get(s, [])]
    ref = results.baseline or (items[0] if items else None)
    run = ref.config["run"] if ref else _params_run(params)
    source = f"experiments/{ref.path.parent.name}/{ref.path.name}" if ref else "params.yaml"
    prompts, gen = run["prompts"], run["generation"]
    count = ref.metrics["prompts"] if ref else MISSING
    text = [
        f"**Hardware and software.** {_hardware()}; runs used device "
        f"{run.get('device') or 'auto'}, dtype {run.get('dtype') or 'default for the device'}. "
        f"Python {platform.python_version()}, {_versions()}.",
        f"**Models.** Target {run['target']}, draft {_draft_name(results, params)}, perplexity "
        f"scorer {_setting(params, 'models.scorer')}.{_prepared(results.models)}",
        f"**Prompts.** Source {prompts['source']}; categories "
        f"{', '.join(prompts['categories'] or ['all'])}; {prompts['per_category']} per category; "
        f"{count} prompts in all.",
        f"**Generation.** Up to {gen['max_new_tokens']} new tokens, temperature "
        f"{gen['temperature']} (0 = greedy), top-k {gen.get('top_k', 0)}, top-p "
        f"{gen.get('top_p', 1.0)}, seed {run['seed']}. Every prompt was timed "
        f"{run['repetitions']} time(s) (median wall time used) after {run['warmup']} discarded "
        f"warm-up generation(s) per configuration. Settings read from {source}.",
        *_mismatches(items, ref),
        *_reused(items),
        "**Metrics.**\n" + "\n".join(f"- {d}" for d in _definitions(settings)),
    ]
    return Section("Methods", text)


def _params_run(params: dict[str, Any]) -> dict[str, Any]:
    """The run settings params.yaml asks for, when no item records them yet."""
    return {
        "target": _setting(params, "models.target"),
        "device": params["models"].get("device"),
        "dtype": params["models"].get("dtype"),
        "prompts": _setting(params, "prompts"),
        "generation": _setting(params, "generation"),
        "seed": _setting(params, "seed"),
        "repetitions": _setting(params, "run.repetitions"),
        "warmup": _setting(params, "run.warmup"),
    }


def _draft_name(results: Results, params: dict[str, Any]) -> str:
    """The draft model(s) the runs used; drafters without one (prompt lookup, heads) record None."""
    drafts = sorted({str(d) for i in results.speculative if (d := i.config["run"]["draft"])})
    return ", ".join(drafts) if drafts else str(_setting(params, "models.draft"))


def _prepared(models: dict[str, Any] | None) -> str:
    """experiments/prepare/models.json: role -> {name, path?, sha256?}."""
    if not models:
        return ""
    parts = [
        f"{role}: {e.get('name', e)}"
        + (f" (sha256 {str(e['sha256'])[:12]}...)" if isinstance(e, dict) and "sha256" in e else "")
        for role, e in models.items()
    ]
    return " Prepared: " + "; ".join(parts) + "."


def _hardware() -> str:
    """CPU model, cores, RAM and any CUDA device of the machine rendering this report."""
    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = [
            ln.split(":", 1)[1].strip()
            for ln in cpuinfo.read_text().splitlines()
            if ln.startswith("model name")
        ]
        cpu = names[0] if names else cpu
    ram = psutil.virtual_memory().total / 2**30
    cores = f"{psutil.cpu_count(logical=False)} cores, {psutil.cpu_count()} threads"
    return f"CPU {cpu} ({cores}), {ram:.0f} GiB RAM (the machine that rendered this report)"


def _versions() -> str:
    found = []
    for lib in LIBRARIES:
        try:
            found.append(f"{lib} {metadata.version(lib)}")
        except metadata.PackageNotFoundError:
            found.append(f"{lib} not installed")
    return ", ".join(found)


def _mismatches(items: list[Item], ref: Item | None) -> list[str]:
    """A warning line when items ran with settings other than the reference's."""
    keys = ("target", "device", "dtype", "prompts", "generation", "seed", "repetitions", "warmup")
    if ref is None:
        return []
    odd = [
        label(i)
        for i in items
        if any(i.config["run"].get(k) != ref.config["run"].get(k) for k in keys)
    ]
    if not odd:
        return []
    return [f"**Warning:** these configurations ran with other settings: {', '.join(odd)}."]


def _reused(items: list[Item]) -> list[str]:
    """Which items copy an identical earlier run: they appear once in cross-configuration views."""
    pairs = [
        f"{label(i)} = {_stage_item(Path(i.config['reused_from']))}"
        for i in items
        if "reused_from" in i.config
    ]
    if not pairs:
        return []
    return [f"**Reused runs** (identical configuration, run once): {'; '.join(pairs)}."]


def _definitions(settings: Settings) -> list[str]:
    return [
        "step: one verification forward of the target (baseline: one decode forward).",
        "proposed: draft tokens offered in a step (the K used); accepted: how many the policy "
        "kept; emitted: tokens added in the step = accepted + 1 (the correction or bonus token), "
        "cut at EOS or max_new_tokens.",
        "acceptance rate a = sum(accepted) / sum(proposed) (first repetition); its 95% CI "
        f"resamples prompts ({settings.bootstrap_samples} bootstrap samples).",
        "mean accepted length tau = sum(emitted) / steps, bonus token included (the convention "
        "of Spec-Bench and vLLM), so the baseline has tau = 1.",
        "tokens/s = new tokens / wall time of generation, prefill included; TTFT (time to first "
        "token) is reported separately.",
        "speed-up = per-prompt baseline time / configuration time on the same prompt (median "
        "over repetitions), summarised as the geometric mean over prompts with a percentile "
        "bootstrap 95% CI; throughput ratio = ratio of total tokens/s.",
        "c = draft time per proposed token / target time per single-token decode step, measured.",
        "predicted speed-up (Leviathan et al. 2023) = (1 - a^(K+1)) / ((1 - a)(cK + 1)) from the "
        "measured a, mean K and c.",
        "regret of a K controller = best fixed-K speed-up / controller speed-up - 1 (best fixed K "
        "in hindsight over the K sweep); the time-based analogue compares total time with the best "
        "fixed K chosen per prompt.",
        "lossless check, per prompt: identical to the greedy baseline or not, index of the first "
        "differing token and the target's top-1/top-2 logit margin there.",
    ]


def baseline_section(results: Results) -> Section:
    """The target alone: the reference every speed-up divides by."""
    section = Section("Baseline")
    base = results.baseline
    if base is None:
        section.text.append(_none("experiments/baseline/ is absent"))
        return section
    m, step_ms = base.metrics, _first(base.steps)["step_ms"]
    row = {
        "configuration": label(base),
        "prompts": m["prompts"],
        "new_tokens": m["new_tokens"],
        "tokens_per_s": m["tokens_per_s"],
        "ttft_ms": m["ttft_ms"],
        "step_ms_median": step_ms.median(),
        "peak_rss_mb": m["peak_rss_mb"],
    }
    if m.get("peak_cuda_mb") is not None:
        row["peak_cuda_mb"] = m["peak_cuda_mb"]
    section.tables.append(make_table("baseline", "Baseline (target alone)", pd.DataFrame([row])))
    return section


def ksweep_section(results: Results, settings: Settings) -> Section:
    """Fixed K: speed-up and acceptance against the draft length."""
    section = Section("K sweep")
    items = results.items.get("ksweep", [])
    if not items:
        section.text.append(_none("experiments/ksweep/ is absent or empty"))
        return section
    columns = [
        "k",
        *ci("acceptance_rate"),
        "mean_accepted_length",
        "tokens_per_s",
        *ci("speedup"),
        "throughput_ratio",
        "cost_ratio",
        "predicted_speedup",
    ]
    data = _spec_frame(items, settings, columns)
    section.tables.append(make_table("ksweep", "Speed-up and acceptance against K", data))
    section.figures.append(("ksweep", ksweep_figure(data), "Speed-up and acceptance against K"))
    return section


def ksweep_figure(data: pd.DataFrame) -> Figure:
    """Speed-up (measured with CI, predicted) and acceptance rate (with CI) against K."""
    fig = Figure(figsize=(9, 3.6), layout="constrained")
    left, right = fig.subplots(1, 2)
    _errorbar(left, data["k"], data, "speedup", "measured")
    left.plot(data["k"], data["predicted_speedup"], "s--", label="predicted (Leviathan)")
    left.axhline(1.0, color="grey", lw=0.8)
    left.set(xlabel="K (draft length)", ylabel="speed-up over baseline", xticks=data["k"])
    left.legend()
    _errorbar(right, data["k"], data, "acceptance_rate", "acceptance rate")
    right.set(xlabel="K (draft length)", ylabel="acceptance rate", ylim=(0, 1.05), xticks=data["k"])
    return fig


def _errorbar(ax: Any, x: pd.Series, data: pd.DataFrame, column: str, name: str) -> None:
    """Points with their bootstrap 95% interval as asymmetric error bars."""
    mid = data[column].astype(float)
    low = (mid - data[f"{column}_ci_low"].astype(float)).clip(lower=0)
    high = (data[f"{column}_ci_high"].astype(float) - mid).clip(lower=0)
    ax.errorbar(x, mid, yerr=[low, high], fmt="o-", capsize=3, label=name)


def _perplexity_by_item(results: Results) -> pd.DataFrame:
    """Mean (as in perplexity/metrics.json) and pooled perplexity per stage/item."""
    outputs = results.outputs_ppl
    if outputs is None:
        return pd.DataFrame(columns=["stage", "item", "tokens", "perplexity", "pooled_perplexity"])
    grouped = outputs.groupby(["stage", "item"], sort=False)
    frame = grouped.agg(tokens=("tokens", "sum"), perplexity=("perplexity", "mean"))
    frame["pooled_perplexity"] = grouped.apply(summary.pooled_perplexity)
    return frame.reset_index()


def _ppl_of(ppl: pd.DataFrame, item: Item) -> float | None:
    """Mean output perplexity of one item, None when not scored."""
    hit = ppl[(ppl["stage"] == item.path.parent.name) & (ppl["item"] == item.path.name)]
    return float(hit["perplexity"].iloc[0]) if len(hit) else None


def policies_section(results: Results, settings: Settings) -> Section:
    """Acceptance rules: speed-up against quality (perplexity, greedy match)."""
    section = Section("Acceptance policies")
    items = results.items.get("policies", [])
    if not items:
        section.text.append(_none("experiments/policies/ is absent or empty"))
        return section
    ppl = _perplexity_by_item(results)
    columns = [
        "configuration",
        *ci("acceptance_rate"),
        "mean_accepted_length",
        *ci("speedup"),
        "greedy_match_rate",
    ]
    data = _spec_frame(items, settings, columns)
    data.insert(1, "policy", [_method(i)["policy"] for i in items])
    data.insert(2, "lossy", [is_lossy(i) for i in items])
    data["perplexity"] = [_ppl_of(ppl, i) for i in items]
    section.tables.append(
        make_table("policies", "Acceptance policies: speed against quality", data)
    )
    if results.outputs_ppl is None:
        section.text.append(_none("experiments/perplexity/outputs.csv is absent, no frontier"))
        return section
    base = _ppl_of(ppl, results.baseline) if results.baseline else None
    section.text.append(f"Baseline output perplexity: {fmt(base)}.")
    fig = frontier_figure(data, base)
    section.figures.append(("frontier", fig, "Speed-quality frontier of the acceptance policies"))
    return section


def frontier_figure(data: pd.DataFrame, baseline_ppl: float | None) -> Figure:
    """Speed-up against output perplexity; lossy policies drawn as crosses."""
    fig = Figure(figsize=(5.5, 4), layout="constrained")
    ax = fig.subplots()
    for lossy, marker, name in ((False, "o", "lossless"), (True, "X", "lossy")):
        part = data[data["lossy"] == lossy]
        if len(part):
            err = [
                (part["speedup"] - part["speedup_ci_low"]).clip(lower=0),
                (part["speedup_ci_high"] - part["speedup"]).clip(lower=0),
            ]
            ax.errorbar(
                part["perplexity"], part["speedup"], yerr=err, fmt=marker, capsize=3, label=name
            )
    for row in data.itertuples():
        ax.annotate(
            str(row.policy),
            (row.perplexity, row.speedup),
            textcoords="offset points",
            xytext=(4, 4),
            fontsize=8,
        )
    if baseline_ppl is not None:
        ax.plot([baseline_ppl], [1.0], "k*", markersize=10, label="baseline")
    ax.set(xlabel="output perplexity under the scorer (lower is better)", ylabel="speed-up")
    ax.legend()
    return fig


def drafters_section(results: Results, settings: Settings) -> Section:
    """Draft sources at the default K: speed-up and tokens per step."""
    section = Section("Drafters")
    items = results.items.get("drafters", [])
    if not items:
        section.text.append(_none("experiments/drafters/ is absent or empty"))
        return section
    columns = [
        "configuration",
        "k",
        *ci("acceptance_rate"),
        "mean_accepted_length",
        "tokens_per_s",
        *ci("speedup"),
        "cost_ratio",
        "predicted_speedup",
    ]
    data = _spec_frame(items, settings, columns)
    data.insert(1, "drafter", [_method(i)["drafter"] for i in items])
    section.tables.append(make_table("drafters", "Drafters", data))
    fig = accepted_length_figure(accepted_length(items))
    section.figures.append(("accepted_length", fig, "Tokens emitted per step, per drafter"))
    return section


def accepted_length(items: list[Item]) -> pd.DataFrame:
    """Share of steps emitting n tokens, per drafter item (first repetition)."""
    frames = []
    for item in items:
        counts = _first(item.steps)["emitted"].value_counts().sort_index()
        frames.append(
            pd.DataFrame(
                {
                    "drafter": label(item),
                    "emitted": counts.index,
                    "steps": counts.to_numpy(),
                    "share": (counts / counts.sum()).to_numpy(),
                }
            )
        )
    return (
        pd.concat(frames, ignore_index=True)
        if frames
        else pd.DataFrame(columns=list(PLOTS["accepted_length"]))
    )


def accepted_length_figure(hist: pd.DataFrame) -> Figure:
    """Grouped bars: share of steps by tokens emitted, one colour per drafter."""
    fig = Figure(figsize=(6, 3.6), layout="constrained")
    ax = fig.subplots()
    wide = hist.pivot(index="emitted", columns="drafter", values="share").fillna(0.0)
    width = 0.8 / max(len(wide.columns), 1)
    for n, name in enumerate(wide.columns):
        ax.bar(
            wide.index + (n - (len(wide.columns) - 1) / 2) * width,
            wide[name],
            width,
            label=str(name),
        )
    ax.set(xlabel="tokens emitted per step (accepted + bonus)", ylabel="share of steps")
    ax.set_xticks(wide.index)
    ax.legend()
    return fig


def controllers_section(results: Results, settings: Settings) -> Section:
    """Adaptive K against the best fixed K in hindsight."""
    section = Section("K controllers")
    items = results.items.get("adaptive", [])
    if not items:
        section.text.append(_none("experiments/adaptive/ is absent or empty"))
        return section
    columns = [
        "configuration",
        "k",
        "mean_k",
        *ci("acceptance_rate"),
        "mean_accepted_length",
        *ci("speedup"),
    ]
    data = _spec_frame(items, settings, columns)
    data.insert(
        1,
        "controller_params",
        [json.dumps(_method(i)["controller_params"], sort_keys=True) for i in items],
    )
    fixed = results.items.get("ksweep", [])
    if fixed:
        best = max(fixed, key=lambda i: float(i.metrics["speedup"]))
        data["best_fixed_k"] = int(_method(best)["k"])
        data["best_fixed_speedup"] = float(best.metrics["speedup"])
        data["regret"] = data["best_fixed_speedup"] / data["speedup"] - 1.0
        data["regret_oracle"] = [
            summary.oracle_regret(i.rows, [f.rows for f in fixed]) for i in items
        ]
    else:
        section.text.append(_none("no K sweep, so no regret against the best fixed K"))
    section.tables.append(make_table("controllers", "K controllers and their regret", data))
    return section


def predicted_section(results: Results, settings: Settings) -> Section:
    """Measured speed-up beside the Leviathan prediction from measured a, K and c."""
    section = Section("Measured vs predicted speed-up")
    items = results.speculative
    if not items:
        section.text.append(_none("no speculative configuration has results"))
        return section
    columns = [
        "configuration",
        "mean_k",
        "acceptance_rate",
        "cost_ratio",
        "predicted_speedup",
        *ci("speedup"),
    ]
    data = _spec_frame(items, settings, columns)
    data["measured_over_predicted"] = data["speedup"] / data["predicted_speedup"].astype(float)
    caption = "Measured speed-up against the prediction from measured a and c"
    section.tables.append(make_table("predicted", caption, data))
    return section


def categories_section(results: Results, settings: Settings) -> Section:
    """Speed-up per prompt category, paired with the baseline on that category's prompts."""
    section = Section("Per-category speed-up")
    base, items = results.baseline, results.speculative
    if base is None or not items:
        section.text.append(_none("needs the baseline and at least one speculative configuration"))
        return section
    frames = [
        summary.category_speedups(i.rows, base.rows, settings.seed).assign(configuration=label(i))
        for i in items
    ]
    data = pd.concat(frames, ignore_index=True)
    data = data[["configuration", "category", "prompts", *ci("speedup")]]
    table = make_table("categories", "Speed-up per prompt category [95% CI]", data)
    # Shown wide (configurations x categories); the CSV stays long, one row per pair.
    table.shown = (
        table.shown.pivot(index="configuration", columns="category", values=header("speedup", True))
        .reindex(index=data["configuration"].unique(), columns=data["category"].unique())
        .fillna(MISSING)
        .reset_index()
    )
    table.shown.columns.name = None
    section.tables.append(table)
    return section


def lossless_table(checks: dict[str, pd.DataFrame]) -> Table:
    """Per configuration: identical prompts / total, and where the others first differ."""
    rows = []
    for name, check in checks.items():
        differing = check[~check["identical"].astype(bool)]
        where = "; ".join(
            f"{r.question_id} at token {fmt(int(r.first_diff))} (margin {fmt(r.logit_margin)})"
            for r in differing.itertuples()
        )
        rows.append(
            {
                "configuration": name,
                "identical": int(check["identical"].sum()),
                "total": len(check),
                "differing": where or "none",
            }
        )
    data = pd.DataFrame(rows)
    table = make_table("lossless", "Lossless check against the greedy baseline", data)
    table.shown.insert(1, "identical / total", [f"{r['identical']}/{r['total']}" for r in rows])
    table.shown = table.shown.drop(columns=["identical", "total"])
    table.shown = table.shown.rename(columns={"differing": "differing prompts: first diff"})
    return table


def lossless_section(results: Results) -> Section:
    """Lossless configurations under greedy must reproduce the baseline token for token."""
    section = Section("Lossless check")
    checks = {
        label(i): _csv(i.path / store.LOSSLESS, LOSSLESS_COLUMNS) for i in results.speculative
    }
    # write_item leaves a header-only lossless.csv where no check ran (lossy or sampled runs).
    present = {name: f for name, f in checks.items() if f is not None and len(f)}
    if not present:
        section.text.append(_none("no lossless check ran (it needs a lossless method, greedy)"))
        return section
    section.tables.append(lossless_table(present))
    unchecked = [name for name in checks if name not in present]
    if unchecked:
        section.text.append(f"Not checked (lossy or sampled): {', '.join(unchecked)}.")
    return section


def perplexity_section(results: Results) -> Section:
    """Output perplexity per configuration and target/draft perplexity on a reference corpus."""
    section = Section("Perplexity")
    if results.outputs_ppl is None and results.corpus_ppl is None:
        section.text.append(_none("experiments/perplexity/ is absent"))
        return section
    if results.outputs_ppl is not None:
        data = _perplexity_by_item(results)
        labels = {
            (i.path.parent.name, i.path.name): label(i) for s in results.items.values() for i in s
        }
        names = [
            labels.get((s, i), f"{s}/{i}") for s, i in zip(data["stage"], data["item"], strict=True)
        ]
        data.insert(0, "configuration", names)
        data = data.drop(columns=["stage", "item"])
        caption = "Perplexity of each configuration's outputs under the scorer"
        section.tables.append(make_table("perplexity_outputs", caption, data))
    if results.corpus_ppl is not None:
        data = results.corpus_ppl[list(CORPUS_COLUMNS)]
        caption = "Perplexity of target and draft on the reference corpus"
        section.tables.append(make_table("perplexity_corpus", caption, data))
    return section


def latency_section(results: Results) -> Section:
    """Distribution of per-step wall time for every configuration."""
    section = Section("Per-step latency")
    if not results.runs:
        section.text.append(_none("no configuration has results"))
        return section
    steps = {label(i): _first(i.steps)["step_ms"] for i in results.runs}
    data = pd.DataFrame(
        {
            "configuration": list(steps),
            "step_ms_median": [s.median() for s in steps.values()],
            "step_ms_p90": [s.quantile(0.9) for s in steps.values()],
            "steps": [len(s) for s in steps.values()],
        }
    )
    section.tables.append(make_table("step_latency", "Per-step wall time (ms)", data))
    section.figures.append(("step_latency", latency_figure(steps), "Per-step wall time"))
    return section


def latency_figure(steps: dict[str, pd.Series]) -> Figure:
    """Horizontal box plots of step_ms, one per configuration, on a log axis."""
    fig = Figure(figsize=(7, 0.4 * len(steps) + 1.5), layout="constrained")
    ax = fig.subplots()
    ax.boxplot(
        [s.to_numpy() for s in steps.values()],
        orientation="horizontal",
        tick_labels=list(steps),
        flierprops={"markersize": 2},
    )
    ax.set_xscale("log")
    ax.xaxis.set_major_formatter(ScalarFormatter())  # 2, 5, 10 ms rather than 10^0 labels
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.invert_yaxis()  # first configuration on top, as in the tables
    ax.set(xlabel="step wall time (ms, log scale)")
    return fig


def breakdown_section(results: Results) -> Section:
    """Where each step's time goes per configuration; peak memory per configuration and stage."""
    section = Section("Step time breakdown and memory")
    if not results.runs:
        section.text.append(_none("no configuration has results"))
        return section
    rows = [
        {
            "configuration": label(i),
            "drafter": _method(i)["drafter"],
            **profiling.step_breakdown(_first(i.steps)),
            "peak_rss_mb": i.metrics["peak_rss_mb"],
            "peak_cuda_mb": i.metrics.get("peak_cuda_mb"),
        }
        for i in results.runs
    ]
    data = _drop_empty(pd.DataFrame(rows), "peak_cuda_mb")
    caption = "Mean ms per step (first repetition) by phase, and peak memory"
    section.tables.append(make_table("step_breakdown", caption, data))
    section.tables.append(make_table("memory", "Peak memory per stage", memory_by_stage(data)))
    profiled = [f"`{i.path / store.PROFILE}`" for i in results.runs if _profiled(i)]
    if profiled:
        section.text.append(
            "Profiled with torch.profiler (timings include its overhead; Chrome traces, top "
            f"operators and per-step phases in): {', '.join(profiled)}."
        )
    return section


def memory_by_stage(breakdown: pd.DataFrame) -> pd.DataFrame:
    """Peak RSS (and CUDA, when measured) per stage: the max over the stage's configurations."""
    stage = breakdown["configuration"].str.split("/").str[0]
    columns = [c for c in ("peak_rss_mb", "peak_cuda_mb") if c in breakdown]
    grouped = breakdown[columns].groupby(stage, sort=False)
    data = grouped.max().add_suffix("_max").reset_index(names="stage")
    data.insert(1, "items", grouped.size().to_numpy())
    return data


def _profiled(item: Item) -> bool:
    return (item.path / store.PROFILE / profiling.TRACE).is_file()


def _drop_empty(data: pd.DataFrame, column: str) -> pd.DataFrame:
    """Without the column when no row has a value (CUDA memory on a CPU run)."""
    return data.drop(columns=column) if data[column].isna().all() else data


def position_section(results: Results) -> Section:
    """How acceptance decays along the draft: P(position i kept | i proposed)."""
    section = Section("Acceptance by draft position")
    data = acceptance_positions(results.speculative)
    if data.empty:
        section.text.append(_none("no speculative configuration has results"))
        return section
    fig = position_figure(data)
    section.figures.append(("acceptance_by_position", fig, "Acceptance by draft position"))
    return section


def acceptance_positions(items: list[Item]) -> pd.DataFrame:
    """acceptance_by_position for every item that proposed anything, long form."""
    frames = [
        summary.acceptance_by_position(i.steps).assign(configuration=label(i))
        for i in items
        if _first(i.steps)["proposed"].sum() > 0
    ]
    if not frames:
        return pd.DataFrame(columns=list(PLOTS["acceptance_by_position"]))
    return pd.concat(frames, ignore_index=True)[list(PLOTS["acceptance_by_position"])]


def position_figure(data: pd.DataFrame) -> Figure:
    """One line per configuration: acceptance probability at each draft position."""
    fig = Figure(figsize=(6.5, 4), layout="constrained")
    ax = fig.subplots()
    for name, part in data.groupby("configuration", sort=False):
        ax.plot(part["position"], part["acceptance"], "o-", label=str(name))
    ax.set(xlabel="draft position i", ylabel="P(accepted | proposed at least i)", ylim=(0, 1.05))
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.legend(fontsize=7)
    return fig


def gpu_section(results: Results) -> Section:
    """GPU measurements (experiments/gpu/*.json), shown as recorded."""
    section = Section("GPU")
    if results.gpu is None:
        section.text.append(_none("experiments/gpu/ has no results"))
        return section
    section.tables.append(make_table("gpu", "GPU measurements", results.gpu))
    return section


# --- dvc plots data --------------------------------------------------------------------------


def plot_data(results: Results, settings: Settings) -> dict[str, pd.DataFrame]:
    """The data behind each figure, for `dvc plots` (header only when a stage has no data)."""
    spec = [_spec_row(i, settings) for i in results.speculative]
    ksweep = [_spec_row(i, settings) for i in results.items.get("ksweep", [])]
    ppl = _perplexity_by_item(results)
    frontier = [
        {
            "configuration": label(i),
            "policy": _method(i)["policy"],
            "lossy": is_lossy(i),
            "perplexity": _ppl_of(ppl, i),
            "speedup": i.metrics["speedup"],
        }
        for i in results.items.get("policies", [])
    ]
    frames = {
        "ksweep": pd.DataFrame(ksweep, columns=list(PLOTS["ksweep"])),
        "speedup": pd.DataFrame(spec, columns=list(PLOTS["speedup"])),
        "frontier": pd.DataFrame(frontier, columns=list(PLOTS["frontier"])),
        "accepted_length": accepted_length(results.items.get("drafters", [])),
        "acceptance_by_position": acceptance_positions(results.speculative),
    }
    return {name: frame[list(PLOTS[name])] for name, frame in frames.items()}


# --- rendering -------------------------------------------------------------------------------


def sections(results: Results, params: dict[str, Any], settings: Settings) -> list[Section]:
    """Every section, in report order."""
    with_settings: list[Callable[[Results, Settings], Section]] = [
        ksweep_section,
        policies_section,
        drafters_section,
        controllers_section,
        predicted_section,
        categories_section,
    ]
    return [
        methods_section(results, params, settings),
        baseline_section(results),
        *(build(results, settings) for build in with_settings),
        lossless_section(results),
        perplexity_section(results),
        latency_section(results),
        breakdown_section(results),
        position_section(results),
        gpu_section(results),
    ]


def _clear(reports: Path) -> None:
    """Remove what an earlier render wrote, so a stage that vanished leaves no stale table."""
    for folder in ("tables", "figures", "plots"):
        shutil.rmtree(reports / folder, ignore_errors=True)
    (reports / "report.md").unlink(missing_ok=True)


def _write_section(section: Section, reports: Path, written: list[Path]) -> list[str]:
    """Write a section's tables and figures; return its markdown."""
    lines = [f"## {section.title}", "", *(f"{t}\n" for t in section.text)]
    for table in section.tables:
        written += _write_table(table, reports / "tables")
        lines += [
            f"**{table.caption}** (`tables/{table.name}.csv`)",
            "",
            _markdown(table.shown),
            "",
        ]
    for name, fig, caption in section.figures:
        path = reports / "figures" / f"{name}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(path, dpi=120)
        written.append(path)
        lines += [f"![{caption}](figures/{name}.png)", ""]
    return lines


def render(experiments: Path, reports: Path, params: dict[str, Any]) -> list[Path]:
    """Regenerate reports/ (report.md, tables, figures, plot data) from experiments/."""
    settings = Settings(
        seed=int(_setting(params, "seed")),
        bootstrap_samples=int(_setting(params, "report.bootstrap_samples")),
    )
    results = load(experiments)  # everything is read and checked before anything is removed
    built = sections(results, params, settings)
    plots = plot_data(results, settings)
    _clear(reports)
    reports.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    lines = ["# Speculative decoding benchmark", ""]
    for section in built:
        lines += _write_section(section, reports, written)
    (reports / "plots").mkdir(parents=True, exist_ok=True)
    for name, frame in plots.items():
        frame.to_csv(reports / "plots" / f"{name}.csv", index=False)
        written.append(reports / "plots" / f"{name}.csv")
    (reports / "report.md").write_text("\n".join(lines).rstrip() + "\n")
    written.append(reports / "report.md")
    return written


def main() -> None:
    """Stage body: params.yaml in the working directory, experiments/ -> reports/."""
    written = render(Path("experiments"), Path("reports"), P.load())
    print(f"report: wrote {len(written)} files under reports/")
