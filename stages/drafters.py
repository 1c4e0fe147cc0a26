"""Stage drafters@NAME: one draft mode at the top-level k with the exact policy."""

import sys

from lab import stage
from lab.experiment import Method

name = sys.argv[1]
k = stage.load_params()["k"]
stage.run("drafters", name, Method(name, "exact", k), reuse_from=("ksweep", "policies"))
