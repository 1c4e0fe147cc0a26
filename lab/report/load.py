"""experiments/ read into what the report needs; a bad file names itself."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from lab.engine.records import STEP_COLUMNS
from lab.pipeline import store
from lab.pipeline.store import Item
from lab.report.heads import HeadRecords, head_records
from lab.report.http import http_frame

# Stages whose items are decoding runs, in report order; drafters_scale (the drafters with the
# heads of pipelines/heads) and trees (pipelines/trees) are optional pipelines'.
STAGES = ("baseline", "ksweep", "policies", "drafters", "drafters_scale", "trees", "adaptive")
# Stages of optional pipelines: an item folder holding only its git-tracked metrics.json (a clone
# where that pipeline has not run) is skipped, not an error.
OPTIONAL_STAGES = frozenset({"drafters_scale", "trees"})

# The policies lab.engine.policies registers as lossless (tests/test_report.py checks that they
# agree): config.json records only the policy's name, and importing the registry would load torch.
# Any other name, unknown ones included, is never claimed lossless.
LOSSLESS_POLICIES = frozenset({"exact", "rejection"})

# What read_item's frames and metrics.json must carry for the report to mean anything.
ROW_COLUMNS = ("question_id", "category", "repetition", "new_tokens", "total_ms",
               "ttft_ms", "token_ids")  # fmt: skip
METRIC_KEYS = ("prompts", "new_tokens", "tokens_per_s", "ttft_ms", "peak_rss_mb",
               "acceptance_rate", "mean_accepted_length", "mean_k")  # fmt: skip
SPEC_METRIC_KEYS = ("speedup", "speedup_ci_low", "speedup_ci_high", "speedup_n",
                    "throughput_ratio", "greedy_match_rate", "cost_ratio")  # fmt: skip
LOSSLESS_COLUMNS = store.LOSSLESS_COLUMNS  # verdict included: older files must be regenerated
OUTPUTS_COLUMNS = ("stage", "item", "question_id", "tokens", "perplexity")
CORPUS_COLUMNS = ("model", "role", "tokens", "perplexity")
# What each experiments/engine/<machine>/*.json (lab.bench.engine) must carry.
ENGINE_KEYS = ("device", "model", "dtype", "engine", "read_bandwidth_bytes_per_s",
               "decode_tokens_per_s", "fraction_of_bandwidth_limit", "verify_over_decode_k4", "c",
               "prefill_tokens_per_s", "forward")  # fmt: skip


class ReportError(ValueError):
    """A file under experiments/ malformed or missing what the report needs."""


@dataclass(frozen=True)
class ReportSettings:
    """The params.yaml values the report uses."""

    seed: int
    bootstrap_samples: int
    draft: str  # models.draft: named when no item records a draft model
    scorer: str  # models.scorer: the perplexity stage's scorer
    planned: dict[str, Any]  # the run settings asked for, in config.json's run shape


@dataclass
class Results:
    """Everything under experiments/ the report reads."""

    items: dict[str, list[Item]]  # stage -> items, in display order
    models: dict[str, Any] | None  # prepare/models.json
    outputs_ppl: pd.DataFrame | None  # perplexity/outputs.csv
    corpus_ppl: pd.DataFrame | None  # perplexity/corpus.csv
    gpu: pd.DataFrame | None  # gpu/*.json, one row per file
    engine: pd.DataFrame | None  # engine/<machine>/*.json (lab bench-engine), one row per file
    http: pd.DataFrame  # loadtest/<item>/, one row per load run (pipelines/http); may be empty
    # heads/<kind>/ and heads_scale/<kind>/ (pipelines/heads): training data, held-out accuracy
    heads: HeadRecords = field(default_factory=HeadRecords)

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
        return [i for i in self.runs if not is_baseline(i)]


# --- reading experiments/ ------------------------------------------------------------------------


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


def _read_item(path: Path) -> Item:
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


def read_csv(path: Path, columns: tuple[str, ...]) -> pd.DataFrame | None:
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
    rows = []
    for path in sorted(folder.glob("*.json")):
        data = _read_json(path)
        if not isinstance(data, dict):
            raise ReportError(f"{path}: expected a JSON object")
        rows.append({"file": path.stem, **pd.json_normalize(data).iloc[0].to_dict()})
    return pd.DataFrame(rows) if rows else None


def _engine(folder: Path) -> pd.DataFrame | None:
    """experiments/engine/<machine>/*.json, one row per file; `forward` stays a list of dicts."""
    rows = []
    for path in sorted(folder.glob("*/*.json")):
        data = _read_json(path)
        if not isinstance(data, dict):
            raise ReportError(f"{path}: expected a JSON object")
        _require(path, data, ENGINE_KEYS, "keys")
        forward = data["forward"]
        if not isinstance(forward, list) or not all(
            isinstance(f, dict) and {"tokens", "ms", "ratio"} <= f.keys() for f in forward
        ):
            raise ReportError(f"{path}: 'forward' must be a list of {{tokens, ms, ratio}} objects")
        rows.append({"file": f"{path.parent.name}/{path.stem}", **data})
    return pd.DataFrame(rows) if rows else None


def load_results(experiments: Path) -> Results:
    """Every item and side file present under experiments/ (absent stages are simply missing)."""
    items: dict[str, list[Item]] = {}
    for stage in STAGES:
        folder = experiments / stage
        if folder.is_dir():
            # Dot-folders are write_item's temporaries and leftovers, never results.
            paths = sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))
            if stage in OPTIONAL_STAGES:
                paths = [p for p in paths if (p / store.CONFIG).exists()]
            items[stage] = sorted((_read_item(p) for p in paths), key=_order)
    models_path = experiments / "prepare" / "models.json"
    models = _read_json(models_path) if models_path.exists() else None
    if models is not None and not isinstance(models, dict):
        raise ReportError(f"{models_path}: expected a JSON object")
    return Results(
        items=items,
        models=models,
        outputs_ppl=read_csv(experiments / "perplexity" / "outputs.csv", OUTPUTS_COLUMNS),
        corpus_ppl=read_csv(experiments / "perplexity" / "corpus.csv", CORPUS_COLUMNS),
        gpu=_gpu(experiments / "gpu"),
        engine=_engine(experiments / "engine"),
        http=http_frame(experiments),
        heads=head_records(experiments),
    )


# --- item properties -------------------------------------------------------------------------


def method(item: Item) -> dict[str, Any]:
    """The item's run.method: drafter, policy, k, controller and its params."""
    found: dict[str, Any] = item.config["run"]["method"]
    return found


def is_baseline(item: Item) -> bool:
    return bool(method(item)["drafter"] == "none")


def _order(item: Item) -> tuple[int, str]:
    """By K, then by name: the K sweep in K order, other stages (one K) by name."""
    return int(method(item)["k"]), item.path.name


def is_lossy(item: Item) -> bool:
    """True unless the policy is a lossless one."""
    return method(item)["policy"] not in LOSSLESS_POLICIES


def stage_item(path: Path) -> str:
    """'stage/item' of an item's folder."""
    return f"{path.parent.name}/{path.name}"


def label(item: Item) -> str:
    """stage/item, marked when the configuration is lossy."""
    name = stage_item(item.path)
    return f"{name} (lossy)" if not is_baseline(item) and is_lossy(item) else name


def first(frame: pd.DataFrame) -> pd.DataFrame:
    """First repetition only: per-step statistics in metrics.json use it too."""
    return frame[frame["repetition"] == 0]
