"""Stage perplexity: all outputs under the scorer; target and draft on a corpus."""

import json

import pandas as pd

from lab import models
from lab.pipeline import params as P
from lab.pipeline import perplexity as ppl
from lab.pipeline import store, tracking
from lab.pipeline.stage import EXPERIMENTS, load_params

STAGES = ("baseline", "ksweep", "policies", "drafters", "adaptive")
params = load_params()
settings = params["perplexity"]
window, stride = settings["window"], settings["stride"]
ppl.check_window(window, stride)
load = {"device": params["models"].get("device"), "dtype": params["models"].get("dtype")}
out = EXPERIMENTS / "perplexity"
out.mkdir(parents=True, exist_ok=True)
items = [
    store.read_item(p.parent)
    for s in STAGES
    for p in sorted((EXPERIMENTS / s).glob("*/metrics.json"))
]

with tracking.stage_run("perplexity", "all", {"perplexity": settings, "models": params["models"]},
                        device=str(models.resolve_device())) as run:  # fmt: skip
    target_name, scorer_name = P.model_name(params, "target"), P.model_name(params, "scorer")
    target_tokenizer = models.load_tokenizer(target_name)
    shared = models.load_tokenizer(scorer_name).get_vocab() == target_tokenizer.get_vocab()
    scorer = models.load(scorer_name, **load)
    outputs = ppl.score_outputs(scorer, items, window, stride, None if shared else target_tokenizer)
    corpus = []
    for role in ("target", "draft"):
        name = P.model_name(params, role)
        lm = scorer if name == scorer_name else models.load(name, **load)
        corpus.append(ppl.score_corpus(lm, role, settings["corpus_chars"], window, stride))
        del lm
    del scorer
    outputs.to_csv(out / "outputs.csv", index=False)
    pd.DataFrame(corpus).to_csv(out / "corpus.csv", index=False)
    by_item = outputs.groupby(["stage", "item"])["perplexity"].mean()
    metrics = {f"{stage}.{item}.output_ppl": float(v) for (stage, item), v in by_item.items()}
    metrics |= {f"corpus_ppl.{c['role']}": c["perplexity"] for c in corpus}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2, sort_keys=True) + "\n")
    run.log_metrics(metrics)
    run.log_artifacts([out / "outputs.csv", out / "corpus.csv"])
