"""Stage distill: the heads' training data (self-distilled answers, teacher-forced corpus text)."""

from lab.pipeline import heads_stages
from lab.pipeline import params as P
from lab.pipeline.stage import EXPERIMENTS

params = P.load()
heads_stages.run_distill(params.distill, params.models, params.seed, EXPERIMENTS / "distill")
