"""Stage policies@NAME: one acceptance policy at the top-level k (reusing the K sweep's run)."""

import sys

from lab import stage
from lab.experiment import Method

name = sys.argv[1]
k = stage.load_params()["k"]
stage.run("policies", name, Method("draft_model", name, k), reuse_from=("ksweep",))
