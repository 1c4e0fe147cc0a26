"""Stage baseline: the target alone, the reference for every speed-up and the lossless check."""

from lab.method import Method
from lab.pipeline import params as P
from lab.pipeline import stage

stage.run(P.load(), "baseline", "target", Method())
