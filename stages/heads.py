"""Stage heads@KIND: train Medusa heads or the EAGLE head on the distill stage's data."""

import json
import sys

import pandas as pd

from lab import models
from lab.drafting import distill, heads
from lab.pipeline import params as P
from lab.pipeline import tracking
from lab.pipeline.stage import EXPERIMENTS, load_params

kind = sys.argv[1]
params = load_params()
settings = P.head_settings(params, kind)
target_name = P.model_name(params, "target")
load = {"device": params["models"].get("device"), "dtype": params["models"].get("dtype")}
out = EXPERIMENTS / "heads" / kind
training = heads.settings_dict(settings)
config = {"heads": {kind: training, "heldout": params["heads"]["heldout"]}, "seed": params["seed"],
          "target": target_name, **load}  # fmt: skip
curve: list[dict[str, float]] = []  # per step: loss, lr; per epoch also heldout_loss
with tracking.stage_run("heads", kind, config, device=str(models.resolve_device())) as run:

    def log(row: dict[str, float]) -> None:
        curve.append(row)
        run.log_steps([row])

    data, info = distill.load_data(EXPERIMENTS / "distill")
    if info["target"] != target_name:
        raise ValueError(f"distill data is from {info['target']!r}, not {target_name!r}: rerun it")
    target = models.load(target_name, **load)
    train, heldout = data.split(params["heads"]["heldout"])
    trained = heads.train(target, train, heldout, settings, params["seed"], log=log)
    info = {**heads.describe(trained.head, target_name), "training": training,
            "metrics": trained.metrics}  # fmt: skip
    heads.save(out, trained.head, info)
    (out / "metrics.json").write_text(json.dumps(trained.metrics, indent=2, sort_keys=True) + "\n")
    pd.DataFrame(curve).groupby("step", as_index=False).first().to_csv(
        out / "loss.csv", index=False
    )
    run.log_metrics(trained.metrics)
    run.log_artifacts([out / heads.CONFIG])
