"""Stage tree@DRAFTER-SIZE of pipelines/trees: one tree drafter at one tree size."""

import sys
from pathlib import Path

import yaml

from lab.drafting import heads
from lab.drafting.registry import drafter_settings
from lab.method import Method
from lab.pipeline import params as P
from lab.pipeline import stage

# DVC runs this from the workspace root (wdir), where stage.run reads and writes experiments/.
HERE = Path(__file__).resolve().parent


def tree_size(text: str) -> int:
    """A size argument: a positive integer (nodes besides the root)."""
    if not text.isdigit() or int(text) < 1:
        raise SystemExit(f"tree size must be a positive integer, got {text!r}")
    return int(text)


name, size = sys.argv[1], tree_size(sys.argv[2])
listed = yaml.safe_load((HERE / "params.yaml").read_text())["trees"]
if name not in heads.KINDS or name not in listed["drafters"]:
    raise SystemExit(f"drafter {name!r}: use one of {listed['drafters']} (tree drafters)")
params = P.load()
settings = drafter_settings(name, **{**params.drafters.settings(name), "tree_size": size})
method = Method(name, "exact", params.k, drafter_params=settings)
stage.run(params, "trees", f"{name}-t{size}", method, reuse_from=("drafters",))
