"""Stage distill: the target's own greedy text on the training prompts, with its hidden states."""

import json
import time

from lab import models
from lab.drafting import distill
from lab.pipeline import params as P
from lab.pipeline import tracking
from lab.pipeline.stage import EXPERIMENTS, load_params

params = load_params()
settings = params["distill"]
prompts = P.distill_prompts(params)
target_name = P.model_name(params, "target")
load = {"device": params["models"].get("device"), "dtype": params["models"].get("dtype")}
out = EXPERIMENTS / "distill"
config = {"distill": settings, "target": target_name, **load}
with tracking.stage_run("distill", "target", config, device=str(models.resolve_device())) as run:
    target = models.load(target_name, **load)
    start = time.perf_counter()
    data = distill.distill(target, prompts, settings["max_new_tokens"], settings["batch_size"])
    seconds = time.perf_counter() - start
    metrics = {"sequences": len(data), "generated_tokens": data.generated_tokens(),
               "seconds": seconds, "tokens_per_s": data.generated_tokens() / seconds}  # fmt: skip
    distill.save_data(out, data, {**config, "metrics": metrics})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    run.log_metrics(metrics)
