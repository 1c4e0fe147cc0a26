"""Stage heads@KIND of pipelines/heads: train one head kind on the data at scale."""

import sys
from pathlib import Path

from lab.pipeline import heads_stages
from lab.pipeline import params as P

ROOT = Path(__file__).resolve().parents[2]  # the workspace root (also under dvc exp --temp)

kind = sys.argv[1]
root = P.load(ROOT / "params.yaml")
scale = P.load_heads_pipeline(Path(__file__).with_name("params.yaml"))
data, out = ROOT / heads_stages.SCALE / "distill", ROOT / heads_stages.SCALE / kind
heads_stages.run_heads(kind, scale.heads, root.models, root.seed, data, out, stage="heads_scale")
