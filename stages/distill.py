"""Stage distill: the target's own greedy text on the training prompts, with its hidden states."""

import json
import time

from lab import models
from lab.drafting import distill
from lab.pipeline import params as P
from lab.pipeline import tracking
from lab.pipeline.stage import EXPERIMENTS

params = P.load()
settings = params.distill
target_name = params.models.target
out = EXPERIMENTS / "distill"
config = {"distill": settings.model_dump(), "target": target_name, **params.models.placement()}
with tracking.stage_run("distill", "target", config, device=str(models.resolve_device())) as run:
    target = models.load(target_name, **params.models.placement())
    start = time.perf_counter()
    data = distill.distill(target, settings.suite(), settings.max_new_tokens, settings.batch_size)
    seconds = time.perf_counter() - start
    metrics = {"sequences": len(data), "generated_tokens": data.generated_tokens(),
               "seconds": seconds, "tokens_per_s": data.generated_tokens() / seconds}  # fmt: skip
    distill.save_data(out, data, {**config, "metrics": metrics})
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    run.log_metrics(metrics)
