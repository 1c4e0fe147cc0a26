"""The headline metrics.json: the researcher's table in `dvc exp show` and `dvc metrics show`."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from lab.pipeline import store
from lab.pipeline.store import Item
from lab.report import metrics
from lab.report.load import Results
from tests.smoke import Repo, copy_project, run

NAN = math.nan


def _row(name: str, stage: str, **values: Any) -> dict[str, Any]:
    """A configuration row: unmeasured columns NaN, flags False, unless given."""
    row: dict[str, Any] = dict.fromkeys(metrics.CONFIG_COLUMNS, NAN)
    row |= {"name": name, "stage": stage, "item": name, "baseline": False, "lossy": False}
    return row | values


FRAME = pd.DataFrame(
    [
        _row("baseline", "baseline", item="target", baseline=True, speedup=1.01, ci_low=0.97,
             ci_high=1.04, tau=1.0, tok_s=12.5, ppl=2.0),
        _row("k2", "ksweep", speedup=0.8, ci_low=0.7, ci_high=0.9, acceptance=0.6, tau=2.2,
             tok_s=10.0, ppl=2.0, identical=5.0, numerics=1.0, violation=0.0),
        _row("typical", "policies", lossy=True, speedup=1.1, ci_low=1.02, ci_high=1.2,
             acceptance=0.9, tau=3.5, tok_s=13.8, ppl=2.31),
        # Too few prompts for an interval: the speed-up stands alone.
        _row("medusa", "drafters", speedup=0.7, acceptance=0.4, tau=1.6, tok_s=8.8, ppl=2.0,
             identical=6.0, numerics=0.0, violation=0.0),
    ],
    columns=list(metrics.CONFIG_COLUMNS),
)  # fmt: skip


def test_headline_from_a_hand_made_frame() -> None:
    """Per configuration: speed-up, interval, acceptance, tau, tok/s; perplexity where the
    output may differ; the lossless count."""
    content = metrics.headline(FRAME)
    assert content == {
        "baseline": {"speedup": 1.01, "ci": "[0.970, 1.040]", "tok_s": 12.5, "ppl": 2.0},
        "k2": {
            "speedup": 0.8,
            "ci": "[0.700, 0.900]",
            "acceptance": 0.6,
            "tau": 2.2,
            "tok_s": 10.0,
        },
        "typical": {
            "speedup": 1.1,
            "ci": "[1.020, 1.200]",
            "acceptance": 0.9,
            "tau": 3.5,
            "tok_s": 13.8,
            "ppl": 2.31,
        },
        "medusa": {"speedup": 0.7, "acceptance": 0.4, "tau": 1.6, "tok_s": 8.8},
        "lossless": {"numerics": 1},
    }
    # DVC's columns keep this order: the baseline (noise floor) first, a configuration's together.
    assert metrics.columns(content)[:5] == [
        "baseline.speedup", "baseline.ci", "baseline.tok_s", "baseline.ppl", "k2.speedup"
    ]  # fmt: skip


def _leaves(content: Any) -> list[Any]:
    if isinstance(content, dict):
        return [leaf for value in content.values() for leaf in _leaves(value)]
    return [content]


def test_no_nulls_and_no_lossless_key_when_no_check_ran(tmp_path: Path) -> None:
    """An unmeasured metric is left out, never null or NaN; a configuration with nothing, too."""
    frame = FRAME.copy()
    gone = ["speedup", "acceptance", "tau", "tok_s", "identical", "numerics"]
    frame.loc[frame["name"] == "k2", [*gone, "ci_low"]] = NAN
    frame.loc[frame["name"] == "medusa", gone] = NAN
    content = metrics.headline(frame)
    assert "k2" not in content  # half an interval is no interval
    assert "medusa" not in content and "lossless" not in content
    leaves = _leaves(content)
    assert leaves and all(isinstance(v, float | int | str) for v in leaves)
    assert not any(isinstance(v, float) and math.isnan(v) for v in leaves)
    path = tmp_path / "metrics.json"
    metrics.write(content, path)
    assert "null" not in path.read_text() and "NaN" not in path.read_text()
    with pytest.raises(ValueError):  # a NaN that slipped through fails loudly
        metrics.write({"k2": {"speedup": NAN}}, path)


def _item(root: Path, stage: str, name: str, policy: str, m: dict[str, Any], **config: Any) -> Item:
    """An item folder with its lossless.csv (header-only unless verdicts are given)."""
    path = root / stage / name
    path.mkdir(parents=True)
    verdicts = config.pop("verdicts", [])
    rows = [{"question_id": str(i), "verdict": v} for i, v in enumerate(verdicts)]
    pd.DataFrame(rows, columns=list(store.LOSSLESS_COLUMNS)).to_csv(path / store.LOSSLESS)
    drafter = "none" if stage == "baseline" else "draft_model"
    method = {"drafter": drafter, "policy": policy, "k": 4, "controller": "fixed"}
    empty = pd.DataFrame()
    return Item(path, {"run": {"method": method}, **config}, empty, empty, m)


def _metrics(speedup: float | None, low: float | None, high: float | None) -> dict[str, Any]:
    return {"speedup": speedup, "speedup_ci_low": low, "speedup_ci_high": high,
            "acceptance_rate": 0.5, "mean_accepted_length": 2.0, "tokens_per_s": 9.0}  # fmt: skip


def test_configurations_from_items(tmp_path: Path) -> None:
    """Reused copies appear once, names clash into stage_item, ppl and verdicts per item."""
    items = {
        "baseline": [_item(tmp_path, "baseline", "target", "exact", _metrics(1.0, 0.9, 1.1))],
        "ksweep": [_item(tmp_path, "ksweep", "k4", "exact", _metrics(0.8, 0.7, 0.9),
                         verdicts=["identical", "numerics", "identical"])],
        "policies": [
            _item(tmp_path, "policies", "exact", "exact", _metrics(0.8, 0.7, 0.9),
                  reused_from="experiments/ksweep/k4"),
            _item(tmp_path, "policies", "typical", "typical", _metrics(1.2, None, None)),
        ],
        "adaptive": [_item(tmp_path, "adaptive", "typical", "exact", _metrics(0.9, 0.8, 1.0))],
        # the optional tree-size sweep stays off the headline (dvc exp show)
        "trees": [_item(tmp_path, "trees", "medusa-t4", "exact", _metrics(0.9, 0.8, 1.0))],
    }  # fmt: skip
    outputs = pd.DataFrame({"stage": ["policies", "policies", "ksweep"],
                            "item": ["typical", "typical", "k4"], "question_id": ["1", "2", "1"],
                            "tokens": [4, 4, 4], "perplexity": [2.0, 3.0, 1.5]})  # fmt: skip
    results = Results(items, None, outputs, None, None, None, pd.DataFrame())
    frame = metrics.configurations(results).set_index("name")
    assert list(frame.index) == ["baseline", "k4", "typical", "adaptive_typical"]
    assert frame.loc["baseline", "baseline"] and not frame.loc["k4", "lossy"]
    assert frame.loc["typical", "lossy"] and not frame.loc["adaptive_typical", "lossy"]
    assert frame.loc["typical", "ppl"] == 2.5 and frame.loc["k4", "ppl"] == 1.5
    assert math.isnan(frame.loc["baseline", "ppl"]) and math.isnan(frame.loc["typical", "ci_low"])
    assert frame.loc["k4", ["identical", "numerics", "violation"]].tolist() == [2.0, 1.0, 0.0]
    assert math.isnan(frame.loc["typical", "identical"])  # header-only lossless.csv: no check
    assert frame.loc["k4", "tau"] == 2.0 and frame.loc["k4", "acceptance"] == 0.5


def _dvc(cmd: list[str], path: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return run(["dvc", *cmd], path, env)


def _warnings(result: subprocess.CompletedProcess[str]) -> list[str]:
    """The lines of a DVC command's output that warn or report an error."""
    lines = (result.stdout + result.stderr).splitlines()
    return [line for line in lines if "WARNING" in line or "ERROR" in line or "failed" in line]


def _committed_tree(path: Path) -> Path:
    """The project's tracked (and new, unignored) files as a fresh clone has them, in git."""
    copy_project(path)
    for cmd in (
        ["git", "init", "-q"],
        ["git", "add", "-A"],
        ["git", "-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "clone"],
    ):
        subprocess.run(cmd, cwd=path, check=True, capture_output=True)  # fmt: skip
    return path


def test_metrics_show_on_the_committed_tree_is_clean(tmp_path: Path) -> None:
    """A fresh clone: `dvc metrics show` reads one file, warns about nothing, fits the budget."""
    path = _committed_tree(tmp_path / "clone")
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    shown = _dvc(["metrics", "show", "--json"], path, env)
    assert not _warnings(shown), shown.stderr
    (workspace,) = json.loads(shown.stdout).values()  # keyed "" : the workspace
    data = workspace["data"]
    assert list(data) == [str(metrics.HEADLINE)]  # the only metrics file, the HTTP pipeline's none
    content = data[str(metrics.HEADLINE)]["data"]
    assert 0 < len(metrics.columns(content)) <= metrics.MAX_COLUMNS
    assert all(v is not None for v in _leaves(content))
    assert not _warnings(_dvc(["metrics", "show"], path, env))


def test_smoke_run_headline(smoke: Repo) -> None:
    """After a full `dvc repro`: one column per configuration and metric, within the budget."""
    path, env = smoke
    content = json.loads((path / metrics.HEADLINE).read_text())
    # policies@exact and drafters@draft_model reuse ksweep@k4: they appear once, as k4.
    # In report order: by stage, then K, then name.
    spec = ["k1", "k2", "k4", "typical", "eagle", "medusa", "prompt_lookup", "adaptive"]
    assert list(content) == ["baseline", *spec, "lossless"]
    for name in spec:
        assert {"speedup", "ci", "acceptance", "tau", "tok_s"} <= content[name].keys(), name
    for name in ("baseline", "typical"):
        assert "ppl" in content[name], name
    assert content["lossless"]["numerics"] == 0  # fp32: bit-identical
    k4 = json.loads((path / "experiments/ksweep/k4/metrics.json").read_text())
    assert content["k4"]["speedup"] == k4["speedup"]
    assert content["k4"]["tau"] == k4["mean_accepted_length"]
    assert content["k4"]["ci"] == metrics.interval(k4["speedup_ci_low"], k4["speedup_ci_high"])

    shown = _dvc(["exp", "show", "--json"], path, env)
    assert not _warnings(shown), shown.stderr
    workspace = json.loads(shown.stdout)[0]
    assert workspace["rev"] == "workspace"
    files = workspace["data"]["metrics"]
    assert list(files) == [str(metrics.HEADLINE)]  # per-item metrics.json files are outs
    # Worked out by hand: the baseline's 4, 5 per other configuration, typical's perplexity and the
    # lossless count. The smoke run's extra K (k1) makes it 46: the default grid's 8 give 41.
    assert len(metrics.columns(files[str(metrics.HEADLINE)]["data"])) == 4 + 5 * len(spec) + 2
    assert not _warnings(_dvc(["metrics", "show"], path, env))
