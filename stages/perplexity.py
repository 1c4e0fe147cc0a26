"""Stage perplexity: all outputs under the scorer; target and draft on a corpus."""

import json

import pandas as pd

from lab import models
from lab.pipeline import params as P
from lab.pipeline import perplexity as ppl
from lab.pipeline import store, tracking
from lab.pipeline.stage import EXPERIMENTS

STAGES = ("baseline", "ksweep", "policies", "drafters", "adaptive")
params = P.load()
settings, names = params.perplexity, params.models
window, stride = settings.window, settings.stride
out = EXPERIMENTS / "perplexity"
out.mkdir(parents=True, exist_ok=True)
items = [
    store.read_item(p.parent)
    for s in STAGES
    for p in sorted((EXPERIMENTS / s).glob("*/metrics.json"))
]

config = {"perplexity": settings.model_dump(), "models": names.model_dump()}
with tracking.stage_run("perplexity", "all", config, device=str(models.resolve_device())) as run:
    target_tokenizer = models.load_tokenizer(names.target)
    shared = models.load_tokenizer(names.scorer).get_vocab() == target_tokenizer.get_vocab()
    scorer = models.load(names.scorer, **names.placement())
    outputs = ppl.score_outputs(scorer, items, window, stride, None if shared else target_tokenizer)
    corpus = []
    for role, name in (("target", names.target), ("draft", names.draft)):
        lm = scorer if name == names.scorer else models.load(name, **names.placement())
        corpus.append(ppl.score_corpus(lm, role, settings.corpus_chars, window, stride))
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
