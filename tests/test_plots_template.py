"""`dvc plots show` renders offline: the committed template inlines the vega bundles."""

from __future__ import annotations

import os
import re
import shutil
import sys
from pathlib import Path

import pytest
import yaml

from lab.report import plots_template
from tests.smoke import ROOT, run


def test_page_inlines_scripts_and_keeps_only_dvc_placeholders() -> None:
    html = plots_template.page({"a@1": "var a = 1;\n//# sourceMappingURL=a.min.js.map\n"})
    assert "<script>var a = 1;</script>" in html and "sourceMappingURL" not in html
    # dvc-render would put its CDN <script src> tags in place of {scripts}.
    assert "{plot_divs}" in html and "{refresh_tag}" in html and "{scripts}" not in html
    with pytest.raises(ValueError, match="b@1"):
        plots_template.page({"b@1": "x = '</script>';"})


def test_committed_template_has_the_pinned_bundles() -> None:
    html = plots_template.TEMPLATE.read_text(encoding="utf-8")
    for bundle in plots_template.BUNDLES:
        assert f"<!-- {bundle.package}@{bundle.version} -->" in html, bundle
    assert html.count("<script>") == len(plots_template.BUNDLES)


def test_dvc_plots_show_writes_html_without_external_scripts(tmp_path: Path) -> None:
    """The plots dvc.yaml declares (it needs params.yaml to resolve) with the templates of
    .dvc/plots/, over the committed data."""
    template = plots_template.TEMPLATE.relative_to(ROOT)
    heads = yaml.safe_load((ROOT / "params.yaml").read_text())["heads"]["names"]
    losses = [f"experiments/heads/{kind}/loss.csv" for kind in heads]
    names: list[str | Path] = ["dvc.yaml", "params.yaml", ".dvc/config", ".dvc/plots", template,
                               "reports/plots"]  # fmt: skip
    for name in names + losses:
        copy = shutil.copytree if (ROOT / name).is_dir() else shutil.copy
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        copy(ROOT / name, tmp_path / name)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}:{os.environ['PATH']}"}
    run(["git", "init", "-q"], tmp_path, env)
    run(["dvc", "plots", "show", "-o", "out"], tmp_path, env)
    html = (tmp_path / "out" / "index.html").read_text(encoding="utf-8")
    assert not re.search(r"<script[^>]*\bsrc\s*=", html), "a script loads from elsewhere"
    assert "cdn.jsdelivr.net" not in html
    # One per plot dvc.yaml declares: the top-level ones and each heads stage's loss curve.
    top_level = [
        next(iter(plot)) for plot in yaml.safe_load((ROOT / "dvc.yaml").read_text())["plots"]
    ]
    expected = top_level + [loss.replace("/", "_").replace(".", "_") for loss in losses]
    assert sorted(re.findall(r"vegaEmbed\('#(\w+)'", html)) == sorted(expected)
    for bundle in plots_template.BUNDLES:
        assert f"<!-- {bundle.package}@{bundle.version} -->" in html
