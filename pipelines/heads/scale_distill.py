"""Stage distill of pipelines/heads: the heads' training data at scale (see params.yaml here)."""

from pathlib import Path

from lab.pipeline import heads_stages
from lab.pipeline import params as P

ROOT = Path(__file__).resolve().parents[2]  # the workspace root (also under dvc exp --temp)

root = P.load(ROOT / "params.yaml")
scale = P.load_heads_pipeline(Path(__file__).with_name("params.yaml"))
out = ROOT / heads_stages.SCALE / "distill"
heads_stages.run_distill(scale.distill, root.models, root.seed, out, stage="heads_scale_distill")
