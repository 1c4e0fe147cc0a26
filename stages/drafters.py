"""Stage drafters@NAME: one draft mode at the top-level k with the exact policy."""

import sys

from lab.method import Method
from lab.pipeline import params as P
from lab.pipeline import stage

name = sys.argv[1]
params = P.load()
method = Method(name, "exact", params.k, drafter_params=params.drafters.settings(name))
stage.run(params, "drafters", name, method, reuse_from=("ksweep", "policies"))
