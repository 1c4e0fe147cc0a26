"""Stage ksweep@K: the draft model with the exact policy at a fixed draft length K."""

import sys

from lab import stage
from lab.experiment import Method

k = int(sys.argv[1])
stage.run("ksweep", f"k{k}", Method(drafter="draft_model", policy="exact", k=k))
