"""Stage policies@NAME: one acceptance policy at the top-level k (reusing the K sweep's run)."""

import sys

from lab.method import Method
from lab.pipeline import params as P
from lab.pipeline import stage

name = sys.argv[1]
params = P.load()
method = Method("draft_model", name, params.k, policy_params=params.policies.settings(name))
stage.run(params, "policies", name, method, reuse_from=("ksweep",))
