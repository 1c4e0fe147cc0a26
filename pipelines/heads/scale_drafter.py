"""Stage drafters@KIND of pipelines/heads: decode with the heads trained at scale.

The root params.yaml's drafters.params.<kind> (tree size, depth, top-k) with heads pointed at
experiments/heads_scale/<kind>, at the root k, exact policy, default prompts and timing protocol:
the row beside drafters@<kind> that shows what the larger training set buys in tau and speed-up.
"""

import sys

from lab.drafting import heads
from lab.drafting.registry import drafter_settings
from lab.method import Method
from lab.pipeline import heads_stages, stage
from lab.pipeline import params as P

kind = sys.argv[1]
if kind not in heads.KINDS:
    raise SystemExit(f"head kind {kind!r}: use one of {', '.join(heads.KINDS)}")
# DVC runs this from the workspace root (wdir), where stage.run reads and writes experiments/.
params = P.load()
folder = str(heads_stages.SCALE / kind)
settings = drafter_settings(kind, **{**params.drafters.params.get(kind, {}), "heads": folder})
method = Method(kind, "exact", params.k, drafter_params=settings)
stage.run(params, "drafters_scale", kind, method)
