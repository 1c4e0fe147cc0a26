"""The distill and heads stage bodies, shared by the default pipeline and pipelines/heads/."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import pandas as pd

from lab import models
from lab.drafting import corpus, distill, heads, training
from lab.pipeline import params as P
from lab.pipeline import tracking

CURVE = "curve.csv"  # held-out accuracy against training tokens seen, per checkpoint
LOSS = "loss.csv"  # training loss and learning rate per step
# pipelines/heads/'s outputs, under the workspace root: outside every dep of the default pipeline
SCALE = Path("experiments") / "heads_scale"


def run_distill(
    settings: P.Distill, roles: P.Models, seed: int, out: Path, stage: str = "distill"
) -> None:
    """Self-distilled answers plus teacher forcing over the corpus -> out/data.*, metrics.json."""
    target_name = roles.target
    config = {"distill": settings.model_dump(), "target": target_name, "seed": seed,
              "corpus": corpus.version() if settings.corpus_tokens else None,
              **roles.placement()}  # fmt: skip
    device = str(models.resolve_device(roles.device))
    with tracking.stage_run(stage, "target", config, device=device) as run:
        # The corpus first, with the tokenizer alone: too large a corpus_tokens fails in seconds.
        sequences = corpus.sequences(models.load_tokenizer(target_name), settings.corpus_tokens,
                                     settings.sequence_tokens, seed)  # fmt: skip
        target = models.load(target_name, **roles.placement())
        start = time.perf_counter()
        answers = distill.distill(target, settings.suite(), settings.max_new_tokens,
                                  settings.batch_size)  # fmt: skip
        middle = time.perf_counter()
        forced = distill.teacher_force(target, sequences, settings.batch_size)
        end = time.perf_counter()
        data = answers + forced
        metrics = {"sequences": len(data), "generated_tokens": answers.text_tokens(),
                   "corpus_tokens": forced.text_tokens(), "text_tokens": data.text_tokens(),
                   "answer_seconds": middle - start, "corpus_seconds": end - middle,
                   "seconds": end - start,
                   "corpus_prefill_tokens_per_s": _rate(sum(map(len, forced.tokens)), end - middle),
                   "corpus_label_agreement": agreement(forced)}  # fmt: skip
        distill.save_data(out, data, {**config, "metrics": metrics})
        (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
        run.log_metrics(metrics)


def _rate(count: int, seconds: float) -> float | None:
    return count / seconds if count else None


def agreement(data: distill.Distilled) -> float | None:
    """Share of text positions where the target's argmax is the text's own next token."""
    same, total = 0, 0
    for tokens, labels, start in zip(data.tokens, data.labels, data.prompt_lens, strict=True):
        same += int((labels[start - 1 :] == tokens[start:]).sum())
        total += len(tokens) - start
    return same / total if total else None


def run_heads(
    kind: str,
    settings: P.Heads,
    roles: P.Models,
    seed: int,
    data_folder: Path,
    out: Path,
    stage: str = "heads",
) -> None:
    """Train one head kind on data_folder's data -> out/ (head, config, metrics, loss, curve)."""
    training_settings = settings.training(kind)
    target_name = roles.target
    config = {"heads": {kind: training_settings.model_dump(), "heldout": settings.heldout,
                        "checkpoints": settings.checkpoints},
              "seed": seed, "target": target_name, **roles.placement()}  # fmt: skip
    device = str(models.resolve_device(roles.device))
    steps: list[dict[str, float]] = []  # per step: loss, lr
    with tracking.stage_run(stage, kind, config, device=device) as run:

        def log(row: dict[str, float]) -> None:
            if "loss" in row:
                steps.append(row)
            run.log_steps([row])

        data, info = distill.load_data(data_folder)
        if info["target"] != target_name:
            raise ValueError(f"the data in {data_folder} is from {info['target']!r}, not "
                             f"{target_name!r}: rerun its distill stage")  # fmt: skip
        target = models.load(target_name, **roles.placement())
        train, heldout = data.split(settings.heldout)
        trained = training.train(target, train, heldout, training_settings.settings(), seed,
                                 log=log, checkpoints=tuple(settings.checkpoints))  # fmt: skip
        saved = {**heads.describe(trained.head, target_name), "training": config["heads"],
                 "data": _data_summary(info), "metrics": trained.metrics}  # fmt: skip
        heads.save(out, trained.head, saved)
        (out / "metrics.json").write_text(
            json.dumps(trained.metrics, indent=2, sort_keys=True) + "\n"
        )
        pd.DataFrame(steps).to_csv(out / LOSS, index=False)
        pd.DataFrame(trained.curve).to_csv(out / CURVE, index=False)
        run.log_metrics(trained.metrics)
        run.log_artifacts([out / heads.CONFIG, out / CURVE])


def _data_summary(info: dict[str, Any]) -> dict[str, Any]:
    """What the head was trained on: the distill settings, corpus and token counts."""
    keys = ("generated_tokens", "corpus_tokens", "text_tokens", "sequences",
            "corpus_label_agreement")  # fmt: skip
    return {"distill": info.get("distill"), "corpus": info.get("corpus"),
            **{k: info.get("metrics", {}).get(k) for k in keys}}  # fmt: skip
