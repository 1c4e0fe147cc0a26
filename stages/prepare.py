"""Stage prepare: validate params.yaml, then assemble and convert the models it names (once)."""

import json
from pathlib import Path

from lab.models import packaged
from lab.pipeline import params as P
from lab.pipeline.stage import load_params

params = load_params()
out = {}
for role in ("target", "draft", "scorer"):
    name = P.model_name(params, role)
    entry = {"name": name}
    if name in packaged.PACKAGED:
        entry |= {"path": str(packaged.prepare(name)), "sha256": packaged.PACKAGED[name].sha256}
    out[role] = entry
Path("experiments/prepare").mkdir(parents=True, exist_ok=True)
Path("experiments/prepare/models.json").write_text(json.dumps(out, indent=2) + "\n")
