"""The html template `dvc plots show` fills, with vega, vega-lite and vega-embed inlined (offline).

DVC's default page loads the three bundles from a CDN. The versions pinned here are the ones
dvc-render 1.0's default page asks for (dvc_render/vega.py), so DVC's specs render the same.
Run `python -m lab.report.plots_template` (or `make plots-template`) to rebuild the committed
template from the npm registry; each tarball is checked against the registry's sha512 integrity.
Either run also rewrites the vega-lite templates of dvc.yaml's plots (lab/report/vega_specs.py);
`python -m lab.report.plots_template specs` rewrites only those, offline.
"""

from __future__ import annotations

import base64
import hashlib
import io
import re
import sys
import tarfile
import urllib.request
from pathlib import Path
from typing import NamedTuple

from lab.report import vega_specs

# .dvc/config's plots.html_template is relative to .dvc/ (dvc/commands/plots.py).
TEMPLATE = Path(__file__).resolve().parents[2] / ".dvc" / "plots_offline.html"
REGISTRY = "https://registry.npmjs.org"


class Bundle(NamedTuple):
    package: str
    version: str
    file: str  # the package's "jsdelivr" entry: what the CDN URL serves
    integrity: str  # the registry's dist.integrity for the tarball


BUNDLES = (
    Bundle("vega", "5.20.2", "build/vega.min.js",
           "sha512-qmH7aD9GGPpssVdxL1xgcdxTbQzyRUeRR16Os385ymvQhiwCYQNA6+eXUPAZDTVLfk0RXu6Jzj6kUE5jQ80EVw=="),
    Bundle("vega-lite", "5.2.0", "build/vega-lite.min.js",
           "sha512-Yxcg8MvYfxHcG6BbkaKT0oVCIMIcE19UvqIsEwBmyd/7h2nzW7oRnID81T8UrY7hpDrIr6wa2JADOT2dhGNErw=="),
    Bundle("vega-embed", "6.18.2", "build/vega-embed.min.js",
           "sha512-wcDyQPE4J5aiCDc3/suH5RQDvrKkjuLkhzUcbOLwEkNF8/+pp17tS0JghzEvAPNRg+5aG1/N2ydixq8Lk3dOlg=="),
)  # fmt: skip

# No {scripts} placeholder: dvc-render puts its CDN <script src> tags there, so leaving it out
# keeps them out. {plot_divs} is required; {refresh_tag} serves `dvc plots show --open` refresh.
PAGE = """<!DOCTYPE html>
<html>
<head>
    {{refresh_tag}}
    <title>DVC Plot</title>
{scripts}
    <style>
        table {{
            border-spacing: 15px;
        }}
    </style>
</head>
<body>
    {{plot_divs}}
</body>
</html>
"""


def fetch(bundle: Bundle) -> bytes:
    """The package tarball from the npm registry, checked against its pinned sha512."""
    name = bundle.package.rsplit("/", 1)[-1]
    url = f"{REGISTRY}/{bundle.package}/-/{name}-{bundle.version}.tgz"
    with urllib.request.urlopen(url, timeout=60) as response:
        data: bytes = response.read()
    digest = "sha512-" + base64.b64encode(hashlib.sha512(data).digest()).decode()
    if digest != bundle.integrity:
        raise ValueError(f"{url}: integrity {digest} != pinned {bundle.integrity}")
    return data


def extract(tarball: bytes, bundle: Bundle) -> str:
    """The bundle's minified script from an npm tarball (its files sit under package/)."""
    with tarfile.open(fileobj=io.BytesIO(tarball), mode="r:gz") as tar:
        member = tar.extractfile(f"package/{bundle.file}")
        if member is None:
            raise ValueError(f"{bundle.package}@{bundle.version}: no {bundle.file}")
        return member.read().decode("utf-8")


def page(scripts: dict[str, str]) -> str:
    """The template with each script inlined, in order (vega before what builds on it)."""
    tags = []
    for label, code in scripts.items():
        if "</script" in code.lower() or "{plot_divs}" in code or "{scripts}" in code:
            # Either would end the inline tag early or be replaced by dvc-render.
            raise ValueError(f"{label}: cannot be inlined as is")
        # The source map comment would only send devtools looking for a file that is not here.
        code = re.sub(r"^//# sourceMappingURL=.*$", "", code, flags=re.M).rstrip()
        tags.append(f"    <!-- {label} -->\n    <script>{code}</script>")
    return PAGE.format(scripts="\n".join(tags))


def build() -> str:
    """Download the pinned bundles and return the filled template."""
    scripts = {}
    for bundle in BUNDLES:
        scripts[f"{bundle.package}@{bundle.version}"] = extract(fetch(bundle), bundle)
    return page(scripts)


def main(argv: list[str] | None = None) -> None:
    """Rewrite the vega-lite templates (.dvc/plots/); without `specs`, the page too (network)."""
    for path in vega_specs.write():
        print(f"wrote {path}", file=sys.stderr)
    if (sys.argv[1:] if argv is None else argv) == ["specs"]:
        return
    TEMPLATE.write_text(build(), encoding="utf-8")
    print(f"wrote {TEMPLATE} ({TEMPLATE.stat().st_size // 1024} KiB)", file=sys.stderr)


if __name__ == "__main__":
    main()
