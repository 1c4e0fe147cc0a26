"""What every generation stage does: read params, run or reuse one method, write, log to MLflow."""

from __future__ import annotations

import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pandas as pd

from lab import machine, models
from lab.drafting import heads
from lab.drafting.draft_model import DRAFT_STEP_SIZES
from lab.engine import prepack, quantize
from lab.engine.caches import make_engine
from lab.engine.model import LoadedModel
from lab.engine.policies import get_policy
from lab.method import DraftSource, Method
from lab.pipeline import params as P
from lab.pipeline import profiling, store, suite, tracking
from lab.pipeline.lossless import check_verdicts, lossless_check
from lab.stats import summarize

EXPERIMENTS = Path("experiments")
BASELINE = EXPERIMENTS / "baseline" / "target"


def run_config(params: P.Params, method: Method) -> dict[str, Any]:
    """Everything that decides what a generation run produces; equal configs are reused."""
    draft = params.models.draft if method.drafter == "draft_model" else None
    # Only when on, so configs of machines where they do not apply stay as they were.
    packed = {"prepack": True} if prepacked(params) else {}
    # int8: draft changes only runs that load a draft model.
    int8 = {"int8": params.models.int8} if quantized(params) and (draft or _all(params)) else {}
    return {"method": asdict(method), "draft": draft, **params.run_settings(), **packed, **int8}


def prepacked(params: P.Params) -> bool:
    """Whether the models run with prepacked linears (models.prepack; null: where it applies;
    a model that models.int8 quantizes runs int8 instead)."""
    device = models.resolve_device(params.models.device)
    applies = prepack.applies(device, models.resolve_dtype(device, params.models.dtype))
    if params.models.prepack and not applies:
        raise ValueError(
            "models.prepack: true needs a CPU float32 run, or bfloat16 where lab's "
            "kernel runs (set models.prepack: null)"
        )
    if params.models.prepack and _all(params):
        raise ValueError("models.int8: all replaces prepacked linears: set models.prepack: null")
    if _all(params):
        return False
    return applies if params.models.prepack is None else params.models.prepack


def _all(params: P.Params) -> bool:
    return params.models.int8 == "all"


def quantized(params: P.Params) -> bool:
    """Whether models.int8 quantizes a model; refused where it cannot apply."""
    if params.models.int8 is None:
        return False
    device = models.resolve_device(params.models.device)
    dtype = models.resolve_dtype(device, params.models.dtype)
    if not quantize.applies(device, dtype):
        raise ValueError(f"models.int8 needs a CPU float32 or bfloat16 run, not {dtype} on "
                         f"{device}: set models.int8: null")  # fmt: skip
    return True


def _speed_up(params: P.Params, lm: LoadedModel, role: str) -> None:
    """Quantize (models.int8) or prepack (models.prepack) a loaded model's linears in place."""
    if quantized(params) and (_all(params) or role == "draft"):
        quantize.quantize(lm.model, prepack.plan().kernel)
    elif prepacked(params):
        prepack.prepack(lm.model, *prepack.plan())


def machine_config(params: P.Params) -> dict[str, Any]:
    """Where the item ran: CPU, device and the dtype chosen (and why), and from how many rows
    prepacked linears take their packed copy, oneDNN's or lab's kernel; not part of `run`."""
    device = models.resolve_device(params.models.device)
    packed = prepacked(params)
    plan = prepack.plan()
    rows = {"prepack_min_rows": plan.min_rows, "prepack_kernel": plan.kernel} if packed else {}
    return {**machine.describe(), "device": str(device),
            "dtype": models.dtype_choice(device, params.models.dtype), **rows}  # fmt: skip


def _generate(
    params: P.Params, method: Method, desc: str, profile_dir: Path | None
) -> tuple[list[dict[str, Any]], LoadedModel]:
    """Load the models a method needs and run it over the prompt suite (profiled into a dir);
    the rows and the target as it ran."""
    kind = params.models.engine
    if kind != "dynamic" and method.drafter in heads.KINDS:
        raise ValueError(
            f"drafter {method.drafter!r} reads the target's hidden states, which only the "
            f"dynamic engine returns: set models.engine: dynamic (it is {kind!r})"
        )
    target = models.load(params.models.target, **params.models.placement())
    _speed_up(params, target, "target")
    gen, run, prompts = params.generation, params.run, params.prompts.suite()
    k_max = max(method.k, int(method.controller_params.get("max_k", method.k)))
    max_len = suite.positions(prompts, target, gen.max_new_tokens, k_max)
    engine = make_engine(target, kind, max_len, sizes=sorted({1, k_max + 1}))
    draft: DraftSource = None
    if method.drafter == "draft_model":
        models.check_pair(target.name, params.models.draft)
        loaded = models.load(params.models.draft, **params.models.placement())
        # Prepacked too: its catch-up forwards after a verification feed several tokens.
        _speed_up(params, loaded, "draft")
        draft = make_engine(loaded, kind, max_len, sizes=DRAFT_STEP_SIZES)
    elif method.drafter in heads.KINDS:
        draft = heads.load(method.drafter_params["heads"], target, kind=method.drafter)
    rows = suite.run(
        method, engine, draft, prompts, gen.max_new_tokens, gen.sampling(),
        params.seed, run.repetitions, run.warmup, desc=desc, profile_dir=profile_dir,
    )  # fmt: skip
    return rows, target


def _lossless(
    params: P.Params,
    method: Method,
    rows: pd.DataFrame,
    base: store.Item | None,
    name: str,
    target: LoadedModel,
) -> pd.DataFrame | None:
    """Per-prompt verdict against the baseline (lossless methods, greedy); raise on a violation.

    target: the model as the method ran it (prepacked or int8), which scores the forks."""
    greedy = params.generation.sampling().greedy
    if base is None or not get_policy(method.policy).lossless or not greedy:
        return None
    check = lossless_check(target, rows, base.rows)
    # Raised before run() calls store.write_item, on purpose: the item's previous files stay
    # as they were (nothing already written is lost or corrupted), DVC records no new output,
    # and no violating result can reach the report. The message carries what lossless.csv would.
    check_verdicts(name, check)
    return check


def run(
    params: P.Params, stage: str, item: str, method: Method, reuse_from: tuple[str, ...] = ()
) -> Path:
    """Run one stage item (or copy an identical earlier one) and mirror it to MLflow."""
    config = {"stage": stage, "item": item, "run": run_config(params, method),
              "machine": machine_config(params)}  # fmt: skip
    out = EXPERIMENTS / stage / item
    base = None if method.baseline else store.read_item(BASELINE)
    same = store.find_same(config, [EXPERIMENTS / s for s in reuse_from])
    with tracking.stage_run(stage, item, config, device=str(models.resolve_device())) as mlrun:
        lossless, profile_dir, target = None, None, None
        if same is not None:
            # Identical configuration already run by an upstream stage: reuse, never re-run.
            config["reused_from"] = str(same)
            rows = _rows_from(store.read_item(same))
            if (same / store.LOSSLESS).exists():
                lossless = pd.read_csv(same / store.LOSSLESS)
        else:
            profile_dir = _profile_dir(out) if params.profile else None
            rows, target = _generate(params, method, f"{stage}/{item}", profile_dir)
        frame = pd.DataFrame(rows)
        frame["question_id"] = frame["question_id"].astype(str)
        steps = store.step_frame(rows)
        metrics = summarize(frame, steps, params.seed, base.rows if base else None)
        if target is not None:
            lossless = _lossless(params, method, frame, base, f"{stage}/{item}", target)
        if profile_dir is not None:
            profiling.write_breakdown(profile_dir, steps)
        store.write_item(out, config, rows, metrics, lossless, profile_dir)
        log_item(mlrun, store.read_item(out), out)
    return out


def _profile_dir(out: Path) -> Path:
    """An empty folder beside the item to profile into; write_item moves it inside the item."""
    # A dot-folder, like write_item's temporary: a killed run's leftover is never read as results.
    path = out.with_name(f".{out.name}.{store.PROFILE}")
    shutil.rmtree(path, ignore_errors=True)
    return path


def _rows_from(item: store.Item) -> list[dict[str, Any]]:
    """Rows in the shape suite.run returns (steps nested), from files on disk."""
    steps = item.steps.groupby(["question_id", "repetition"])
    rows = []
    for row in item.rows.to_dict("records"):
        key = (str(row["question_id"]), row["repetition"])
        group = steps.get_group(key) if key in steps.groups else item.steps.iloc[:0]
        row["steps"] = group.drop(columns=["question_id", "repetition"]).to_dict("records")
        rows.append(row)
    return rows


def log_item(mlrun: tracking.StageRun, item: store.Item, out: Path) -> None:
    """Every per-step record, per-prompt summary and summary metric, plus the files."""
    steps = item.steps.reset_index(drop=True)
    steps["prompt_index"] = pd.factorize(steps["question_id"])[0]
    steps["global_step"] = range(len(steps))
    numeric = steps.drop(columns=["question_id"])
    mlrun.log_steps(numeric.to_dict("records"), step_key="global_step")
    mlrun.log_prompt_metrics(item.rows.drop(columns=["token_ids", "prompt_ids"]).to_dict("records"))
    mlrun.log_metrics(item.metrics)
    # Files, and the profile/ folder when profiled, under their own names.
    mlrun.log_artifacts(sorted(out.iterdir()))
