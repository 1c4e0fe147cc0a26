"""Stage prepare: validate params.yaml, then assemble and convert the models it names (once)."""

import json
from pathlib import Path

from lab.models import packaged
from lab.pipeline import params as P

params = P.load()
roles = {"target": params.models.target, "draft": params.models.draft,
         "scorer": params.models.scorer}  # fmt: skip
out = {}
for role, name in roles.items():
    entry = {"name": name}
    if name in packaged.PACKAGED:
        entry |= {"path": str(packaged.prepare(name)), "sha256": packaged.PACKAGED[name].sha256}
    out[role] = entry
Path("experiments/prepare").mkdir(parents=True, exist_ok=True)
Path("experiments/prepare/models.json").write_text(json.dumps(out, indent=2) + "\n")
