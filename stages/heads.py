"""Stage heads@KIND: train Medusa heads or the EAGLE head on the distill stage's data."""

import json
import sys

import pandas as pd

from lab import models
from lab.drafting import distill, heads, training
from lab.pipeline import params as P
from lab.pipeline import tracking
from lab.pipeline.stage import EXPERIMENTS

kind = sys.argv[1]
params = P.load()
heldout_share = params.heads.heldout
settings = params.heads.training(kind)
target_name = params.models.target
out = EXPERIMENTS / "heads" / kind
config = {"heads": {kind: settings.model_dump(), "heldout": heldout_share}, "seed": params.seed,
          "target": target_name, **params.models.placement()}  # fmt: skip
curve: list[dict[str, float]] = []  # per step: loss, lr; per epoch also heldout_loss
with tracking.stage_run("heads", kind, config, device=str(models.resolve_device())) as run:

    def log(row: dict[str, float]) -> None:
        curve.append(row)
        run.log_steps([row])

    data, info = distill.load_data(EXPERIMENTS / "distill")
    if info["target"] != target_name:
        raise ValueError(f"distill data is from {info['target']!r}, not {target_name!r}: rerun it")
    target = models.load(target_name, **params.models.placement())
    train, heldout = data.split(heldout_share)
    trained = training.train(target, train, heldout, settings.settings(), params.seed, log=log)
    info = {**heads.describe(trained.head, target_name), "training": settings.model_dump(),
            "metrics": trained.metrics}  # fmt: skip
    heads.save(out, trained.head, info)
    (out / "metrics.json").write_text(json.dumps(trained.metrics, indent=2, sort_keys=True) + "\n")
    pd.DataFrame(curve).groupby("step", as_index=False).first().to_csv(
        out / "loss.csv", index=False
    )
    run.log_metrics(trained.metrics)
    run.log_artifacts([out / heads.CONFIG])
