"""Stage drafters@NAME: one draft mode at the top-level k with the exact policy."""

import sys

from lab import params as P
from lab import stage
from lab.experiment import Method

name = sys.argv[1]
params = stage.load_params()
method = Method(name, "exact", params["k"], drafter_params=P.drafter_params(params, name))
stage.run("drafters", name, method, reuse_from=("ksweep", "policies"))
