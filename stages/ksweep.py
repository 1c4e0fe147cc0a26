"""Stage ksweep@K: the draft model with the exact policy at a fixed draft length K."""

import sys

from lab.method import Method
from lab.pipeline import params as P
from lab.pipeline import stage

k = int(sys.argv[1])
stage.run(P.load(), "ksweep", f"k{k}", Method(drafter="draft_model", policy="exact", k=k))
