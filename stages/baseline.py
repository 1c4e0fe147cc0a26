"""Stage baseline: the target alone, the reference for every speed-up and the lossless check."""

from lab import stage
from lab.experiment import Method

stage.run("baseline", "target", Method())
