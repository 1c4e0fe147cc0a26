"""Stage loadtest: load-benchmark an OpenAI-compatible server (default: `lab serve`, run here)."""

import sys
from pathlib import Path

from lab.pipeline import loadtest
from lab.pipeline import params as P

ROOT = Path(__file__).resolve().parents[2]  # the workspace root (also under dvc exp --temp)

root = P.load(ROOT / "params.yaml")  # run_stage validates the keys it reads
section = P.load(Path(__file__).with_name("params.yaml")).get("loadtest")
if not isinstance(section, dict):
    raise P.ParamsError("pipelines/http/params.yaml: missing mapping 'loadtest'")
concurrency = int(sys.argv[1])
loadtest.run_stage(concurrency, ROOT / "experiments" / "loadtest" / f"c{concurrency}", section, root)
