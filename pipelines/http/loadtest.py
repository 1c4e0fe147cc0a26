"""Stage loadtest: load-benchmark an OpenAI-compatible server (default: `lab serve`, run here)."""

import sys
from pathlib import Path

from lab.pipeline import loadtest
from lab.pipeline import params as P

ROOT = Path(__file__).resolve().parents[2]  # the workspace root (also under dvc exp --temp)

root = P.load(ROOT / "params.yaml")
section = P.load_loadtest(Path(__file__).with_name("params.yaml"))
concurrency = int(sys.argv[1])
out = ROOT / "experiments" / "loadtest" / f"c{concurrency}"
loadtest.run_stage(concurrency, out, section, root)
