"""Stage adaptive@NAME: one K controller starting from the top-level k."""

import sys

from lab.method import Method
from lab.pipeline import params as P
from lab.pipeline import stage

name = sys.argv[1]
params = P.load()
method = Method("draft_model", "exact", params.k, name, params.adaptive.settings(name))
stage.run(params, "adaptive", name, method, reuse_from=("ksweep",))
