"""`lab mlflow import DIR`: stage items on disk (experiments/<stage>/<item>/) into MLflow, once."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pandas as pd
from mlflow.tracking import MlflowClient

from lab.pipeline import store, tracking

HASH_TAG = "lab.import.hash"  # parent: the whole tree's digest; child: its item's files' digest
PATH_TAG = "lab.import.path"  # child: the item's folder, relative to the imported root
LOSS = "loss.csv"  # the heads stage's training curve
# The files an item may have (a fresh clone has only metrics.json, and loss.csv for heads):
# they define the item's content, and are what gets logged and uploaded.
FILES = (store.CONFIG, store.METRICS, store.STEPS, store.PROMPTS, store.LOSSLESS, LOSS)
PROMPT_DROP = ("token_ids", "prompt_ids", "text")  # per-prompt fields that are not numbers


@dataclass(frozen=True)
class Imported:
    """What an import did: the parent run, how many items, and whether it was already there."""

    parent_id: str
    items: int
    already: bool


def find_items(root: Path) -> list[Path]:
    """Folders under root holding a metrics.json, skipping dot-folders (half-written items)."""
    found = [p.parent for p in root.rglob(store.METRICS)]
    visible = [
        p for p in found if not any(part.startswith(".") for part in p.relative_to(root).parts)
    ]
    return sorted(visible)


def digest(root: Path, items: list[Path]) -> dict[Path, str]:
    """sha256 per item over its files' names and bytes."""
    hashes = {}
    for item in items:
        sha = hashlib.sha256()
        for name in FILES:
            if (item / name).is_file():
                sha.update(name.encode() + b"\0" + (item / name).read_bytes() + b"\0")
        hashes[item] = sha.hexdigest()
    return hashes


def import_experiments(root: Path) -> Imported:
    """One parent run for the tree, one child per item; a tree imported before is skipped."""
    items = find_items(root)
    if not items:
        raise ValueError(f"{root}: no stage items (folders with {store.METRICS}) to import")
    hashes = digest(root, items)
    tree = hashlib.sha256(
        "".join(f"{p.relative_to(root)}:{h}\n" for p, h in hashes.items()).encode()
    ).hexdigest()
    client = MlflowClient(tracking.tracking_uri())
    experiment_id = tracking.repo_experiment_id()
    done = _previous(client, experiment_id, tree)
    if done is not None:
        return Imported(done, len(items), already=True)
    parent_id = _create_parent(client, experiment_id, root, tree)
    status = "FAILED"
    try:
        for item in items:
            _import_item(client, experiment_id, parent_id, root, item, hashes[item])
        status = "FINISHED"
    finally:
        client.set_terminated(parent_id, status)
    return Imported(parent_id, len(items), already=False)


def _previous(client: MlflowClient, experiment_id: str, tree: str) -> str | None:
    """The finished import of this very tree, if any; unfinished ones (a crash) are deleted."""
    query = f"tags.`{HASH_TAG}` = '{tree}' and tags.`{tracking.ROLE_TAG}` = 'session'"
    finished = None
    for run in tracking.search(client, experiment_id, query):
        if run.info.status == "FINISHED":
            finished = run.info.run_id
            continue
        for child in tracking.child_runs(client, run):
            client.delete_run(child.info.run_id)
        client.delete_run(run.info.run_id)
    return finished


def _create_parent(client: MlflowClient, experiment_id: str, root: Path, tree: str) -> str:
    tags = {**tracking.context_tags(), tracking.ROLE_TAG: "session", HASH_TAG: tree,
            tracking.SESSION_TAG: f"import:{tree[:16]}", "lab.import.root": str(root)}  # fmt: skip
    name = f"import {root.resolve().name} {tree[:8]}"
    return client.create_run(experiment_id, tags=tags, run_name=name).info.run_id


def _import_item(
    client: MlflowClient, experiment_id: str, parent_id: str, root: Path, item: Path, sha: str
) -> None:
    """A finished child run with the item's params, metrics, series and files."""
    rel = item.relative_to(root)
    stage, name = rel.parts[0], "/".join(rel.parts[1:]) or "all"
    config = _json(item / store.CONFIG)
    tags = {**tracking.context_tags(), tracking.ROLE_TAG: "stage", tracking.PARENT_TAG: parent_id,
            "stage": stage, "item": name, PATH_TAG: str(rel), HASH_TAG: sha,
            "device": str(config.get("machine", {}).get("device", "unknown"))}  # fmt: skip
    run_id = client.create_run(experiment_id, tags=tags, run_name=f"{stage}/{name}").info.run_id
    run = tracking.StageRun(client, run_id, parent_id, stage, name)
    status = "FAILED"
    try:
        tracking.log_params(client, run_id, config)
        _log_series(run, item)
        run.log_metrics(_json(item / store.METRICS))
        run.log_artifacts([item / f for f in FILES if (item / f).is_file()])
        run.flush()
        status = "FINISHED"
    finally:
        client.set_terminated(run_id, status)


def _log_series(run: tracking.StageRun, item: Path) -> None:
    """Per-step, per-prompt and training-curve series, from whichever files the item has."""
    if (item / store.STEPS).is_file():
        steps = pd.read_csv(item / store.STEPS, dtype={"question_id": str})
        run.log_steps(step_rows(steps), step_key="global_step")
    if (item / store.PROMPTS).is_file():
        prompts = pd.read_json(item / store.PROMPTS, lines=True)
        run.log_prompt_metrics(_records(prompts.drop(columns=list(PROMPT_DROP), errors="ignore")))
    if (item / LOSS).is_file():
        run.log_steps(_records(pd.read_csv(item / LOSS)), step_key="step")


def step_rows(steps: pd.DataFrame) -> list[dict[str, Any]]:
    """steps.csv rows numbered across prompts (`global_step`), as the pipeline logs them."""
    steps = steps.reset_index(drop=True)
    steps["prompt_index"] = pd.factorize(steps["question_id"])[0]
    steps["global_step"] = range(len(steps))
    return _records(steps.drop(columns=["question_id"]))


def _records(frame: pd.DataFrame) -> list[dict[str, Any]]:
    return [{str(k): v for k, v in row.items()} for row in frame.to_dict("records")]


def _json(path: Path) -> dict[str, Any]:
    """A JSON object file, or {} when the item lacks it (a fresh clone has no config.json)."""
    return json.loads(path.read_text()) if path.is_file() else {}
