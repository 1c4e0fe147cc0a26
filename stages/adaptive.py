"""Stage adaptive@NAME: one K controller starting from the top-level k."""

import sys

from lab.method import Method
from lab.pipeline import params as P
from lab.pipeline import stage

name = sys.argv[1]
params = stage.load_params()
settings = P.controller_settings(params, name)
method = Method("draft_model", "exact", params["k"], name, settings)
stage.run("adaptive", name, method, reuse_from=("ksweep",))
