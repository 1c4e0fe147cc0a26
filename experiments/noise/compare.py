"""Side by side: each item's paired speed-up [95% CI] and reference tok/s, quiet and loaded run.

python experiments/noise/compare.py /tmp/demo15-quiet /tmp/demo15-loaded
"""

import json
import sys
from pathlib import Path

import pandas as pd

ITEMS = ["baseline/target", "ksweep/k2", "ksweep/k4", "adaptive/adaptive"]
COLUMNS = ["speedup", "speedup_ci_low", "speedup_ci_high", "reference_tokens_per_s",
           "tokens_per_s", "acceptance_rate"]  # fmt: skip


def item_metrics(root: Path) -> pd.DataFrame:
    """One row per item: the columns above from its metrics.json."""
    rows = {i: json.loads((root / "experiments" / i / "metrics.json").read_text()) for i in ITEMS}
    return pd.DataFrame(rows).T.reindex(columns=COLUMNS)


quiet, loaded = (item_metrics(Path(p)) for p in sys.argv[1:3])
table = pd.DataFrame({
    "quiet speed-up [95% CI]": quiet.apply(
        lambda r: f"{r.speedup:.3f} [{r.speedup_ci_low:.3f}, {r.speedup_ci_high:.3f}]", axis=1),
    "quiet ref tok/s": quiet.reference_tokens_per_s.map("{:.1f}".format),
    "loaded speed-up [95% CI]": loaded.apply(
        lambda r: f"{r.speedup:.3f} [{r.speedup_ci_low:.3f}, {r.speedup_ci_high:.3f}]", axis=1),
    "loaded ref tok/s": loaded.reference_tokens_per_s.map("{:.1f}".format),
    "inside quiet CI": (loaded.speedup >= quiet.speedup_ci_low)
    & (loaded.speedup <= quiet.speedup_ci_high),
    # what a ratio against the quiet baseline stage's speed (unpaired) would have read
    "unpaired vs quiet baseline": (loaded.tokens_per_s
                                   / quiet.loc["baseline/target", "reference_tokens_per_s"]
                                   ).map("{:.3f}".format),
})  # fmt: skip
print(table.to_markdown())
