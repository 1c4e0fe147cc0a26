"""Stage heads@KIND: train Medusa heads or the EAGLE head on the distill stage's data."""

import sys

from lab.pipeline import heads_stages
from lab.pipeline import params as P
from lab.pipeline.stage import EXPERIMENTS

kind = sys.argv[1]
params = P.load()
heads_stages.run_heads(kind, params.heads, params.models, params.seed, EXPERIMENTS / "distill",
                       EXPERIMENTS / "heads" / kind)  # fmt: skip
